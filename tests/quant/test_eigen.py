"""quant.eigen.PartialEigen against a float64 eigendecomposition: values, vectors, the upper triangle only."""

import pytest
import torch

from adamix.quant.eigen import PartialEigen
from adamix.threads import compute_threads


def _symmetric(n: int, seed: int, decay: float = 3.0) -> torch.Tensor:
    """A^T A of a matrix with a decaying spectrum (float64): distinct leading eigenvalues, a tail."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n + 7, n, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, n, dtype=torch.float64)
    return A.T @ A


def _aligned(V: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """V with each column's sign matched to ref's (eigenvectors are defined up to sign)."""
    return V * torch.sign((V * ref).sum(0))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_values_and_vectors_match_a_float64_solve(dtype, tol):
    n, k = 96, 30
    M64 = _symmetric(n, 0)
    lam, V = torch.linalg.eigh(M64)
    lam, V = lam.flip(0), V.flip(1)
    garbage = torch.full((n, n), 1e3, dtype=dtype).tril(-1)  # only the upper triangle may be read
    eig = PartialEigen(M64.to(dtype).triu() + garbage)
    assert eig.values.dtype == dtype and eig.values.shape == (n,)
    assert torch.allclose(eig.values.double(), lam, rtol=0, atol=tol * float(lam[0]))
    Vk = eig.vectors(0, k)
    assert Vk.shape == (n, k) and Vk.dtype == dtype
    # the leading eigenvalues are well separated here, so the vectors themselves must agree
    assert (_aligned(Vk.double(), V[:, :k]) - V[:, :k]).abs().max() < 50 * tol
    assert (Vk.double().T @ Vk.double() - torch.eye(k, dtype=torch.float64)).abs().max() < 10 * tol


def test_vectors_in_pieces_are_the_vectors_at_once():
    n = 64
    M = _symmetric(n, 1, decay=1.0)
    whole = PartialEigen(M.clone()).vectors(0, n)
    eig = PartialEigen(M.clone())
    pieces = torch.cat([eig.vectors(0, 5), eig.vectors(5, 40), eig.vectors(40, n)], dim=1)
    assert torch.allclose(pieces, whole, rtol=0, atol=1e-13)  # the same vectors, to the back-transform's rounding
    assert eig.vectors(7, 7).shape == (n, 0)
    # every vector: M V = V diag(lam), V orthogonal, in float64 to rounding
    assert torch.allclose(M @ whole, whole * eig.values, atol=1e-10 * float(eig.values[0]))
    assert torch.allclose(whole.T @ whole, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_one_by_one_and_two_by_two():
    assert torch.equal(PartialEigen(torch.tensor([[3.0]])).vectors(0, 1), torch.tensor([[1.0]]))
    M = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    eig = PartialEigen(M.clone())
    assert torch.allclose(eig.values, torch.tensor([3.0, 1.0], dtype=torch.float64))
    v = eig.vectors(0, 1)[:, 0]
    assert torch.allclose(v.abs(), torch.full((2,), 0.5 ** 0.5, dtype=torch.float64))


def test_compute_threads_limits_the_blas_pools_and_restores_them():
    threadpoolctl = pytest.importorskip("threadpoolctl")  # scipy's BLAS is loaded: quant.eigen imports its LAPACK

    def blas() -> list[int]:
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before, torch_before = blas(), torch.get_num_threads()
    assert before
    with compute_threads(1):
        assert blas() == [1] * len(before) and torch.get_num_threads() == 1
    assert blas() == before and torch.get_num_threads() == torch_before

"""The SVD algorithms of quant.linalg: the eigendecomposition of the smaller Gram ("gram", the
default) against LAPACK's SVD and a float64 reference, plain and whitened, on both orientations."""

from __future__ import annotations

import pytest
import torch

from adamix.quant.linalg import svd, thin_svd_gram, WHITENING_EPS, whitening_factor


def spectrum_matrix(m, n, rank, seed=0, decay=0.7):
    """A (m x n) float64 of the given rank with a decaying spectrum s_i = (1 + i)^-decay."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    s = (1.0 + torch.arange(rank, dtype=torch.float64)) ** -decay
    return (A * s) @ B.T, s


@pytest.mark.parametrize("m, n", [(96, 40), (40, 96), (64, 64)])
def test_gram_svd_matches_the_float64_reference(m, n):
    A, s_true = spectrum_matrix(m, n, min(m, n))
    U, s, V = thin_svd_gram(A)
    r = min(m, n)
    assert U.shape == (m, r) and s.shape == (r,) and V.shape == (n, r)
    assert torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(s, s_true, rtol=0, atol=1e-12)
    torch.testing.assert_close((U * s) @ V.T, A, rtol=0, atol=1e-12)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-10)
    # the same subspaces as LAPACK's SVD (the spectrum has no repeated values): |u_i . u_i'| = 1
    Uf, _, Vfh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close((U * Uf).sum(0).abs(), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close((V * Vfh.T).sum(0).abs(), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-8)


def test_gram_svd_of_a_rank_deficient_matrix_has_zero_vectors_not_nans():
    A, _ = spectrum_matrix(50, 30, 7)
    U, s, V = thin_svd_gram(A)
    assert torch.isfinite(U).all() and torch.isfinite(s).all()
    torch.testing.assert_close((U * s) @ V.T, A, rtol=0, atol=1e-12)
    assert (s[7:] < 1e-6).all() and (s[:7] > 0.2).all()
    U0, s0, V0 = thin_svd_gram(torch.zeros(20, 10, dtype=torch.float64))
    assert (s0 == 0).all() and (U0 == 0).all() and torch.isfinite(V0).all()


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("m, n", [(48, 32), (32, 48)])
def test_pipeline_svd_gram_and_full_agree(m, n, whiten):
    """svd() as the methods call it (float32 delta in, float64 out), whitened or not: both algorithms give
    the same spectrum and the same reconstruction; whitened, the v_i are H-orthogonal in both."""
    A, _ = spectrum_matrix(m, n, min(m, n), seed=1)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 200, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)[:, None]
    H = (X @ X.T).float()
    D = A.float()
    out = {alg: svd(D, H, whiten, alg) for alg in ("gram", "full")}
    for alg, (U, s, V) in out.items():
        assert U.dtype == torch.float64
        torch.testing.assert_close((U * s) @ V.T, D.double(), rtol=0, atol=1e-10, msg=alg)
        if whiten:
            G = V.T @ H.double() @ V
            off = G - torch.diag(torch.diagonal(G))
            assert off.abs().max() < 1e-6 * torch.diagonal(G).max(), alg
    torch.testing.assert_close(out["gram"][1], out["full"][1], rtol=1e-9, atol=1e-12)


def test_unknown_algorithm_refused():
    with pytest.raises(ValueError, match="unknown SVD algorithm 'qr'"):
        svd(torch.ones(3, 3), algorithm="qr")


def test_factored_error_equals_the_direct_error():
    """E(U V) from D H V^T and V H V^T equals tr((U V - D) H (U V - D)^T) formed directly, in float64."""
    from adamix.quant.linalg import factored_error, output_error
    g = torch.Generator().manual_seed(3)
    m, n, k = 30, 50, 6
    D = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, 80, generator=g, dtype=torch.float64)
    H = X @ X.T
    U, V = torch.randn(m, k, generator=g, dtype=torch.float64), torch.randn(k, n, generator=g, dtype=torch.float64)
    energy = output_error(None, D, H)
    got = factored_error(U, D @ H @ V.T, V @ H @ V.T, energy)
    assert got == pytest.approx(float(torch.trace((U @ V - D) @ H @ (U @ V - D).T)), rel=1e-10)
    assert got == pytest.approx(output_error(U @ V, D, H), rel=1e-10)


@pytest.mark.parametrize("shape,algorithm", [((48, 64), "full"), ((80, 64), "gram"), ((48, 64), "gram")])
def test_whitening_survives_a_singular_float32_gram_and_skips_an_empty_one(shape, algorithm):
    """A Gram of fewer tokens than inputs, accumulated in float32 (as calibration does), is singular
    and slightly indefinite: the ridge grows until the factor exists (the factored route), or no
    factor is needed (the Gram route of a wide D, with the first ridge), and the whitened SVD still
    reproduces D with right vectors orthogonal under the ridged H. A Gram of zeros (no input reached
    the linear) gives the plain SVD."""
    g = torch.Generator().manual_seed(3)
    D = torch.randn(*shape, generator=g)
    X = torch.randn(10, 64, generator=g) * torch.logspace(0, 3, 64)  # 10 tokens, 64 inputs, scales 1 ... 1000
    H = (X.T @ X).float()
    H -= 3e-6 * torch.diagonal(H).mean() * torch.eye(64)  # indefinite by more than the first ridge
    first = H.double() + WHITENING_EPS[0] * torch.diagonal(H.double()).mean() * torch.eye(64, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # the first ridge is not enough for a factor of this one
        torch.linalg.cholesky(first)
    U, s, V = svd(D, H, whiten=True, algorithm=algorithm)
    assert torch.allclose((U * s) @ V.T, D.double(), atol=1e-8 * D.abs().max())
    L = whitening_factor(H.double())
    ridged = first if shape[0] < shape[1] and algorithm == "gram" else L @ L.T
    G = V.T @ ridged @ V  # Gram of the v_i under the ridged H the whitening used: diagonal
    assert (G - torch.diag(torch.diagonal(G))).abs().max() <= 1e-8 * torch.diagonal(G).max()
    plain = svd(D, algorithm=algorithm)
    for a, b in zip(svd(D, torch.zeros(64, 64), whiten=True, algorithm=algorithm), plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whitened_svd_gives_the_drop_errors_without_a_pass_over_H(dtype):
    # e_i = s_w,i^2 - rho s_i^2 equals s_i^2 v_i^T H v_i (float64 reference), and their sum E(0) = tr(D H D^T)
    from adamix.quant.linalg import whitened_svd
    g = torch.Generator().manual_seed(7)
    D = torch.randn(70, 90, generator=g, dtype=torch.float64)
    X = torch.randn(60, 90, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 90, dtype=torch.float64)
    H = (X.T @ X).to(dtype)  # 60 tokens, 90 inputs: singular, the ridge matters
    U, s, V, e = whitened_svd(D, H)
    for a, b in zip((U, s, V), svd(D, H, whiten=True)):
        assert torch.equal(a, b)
    H64 = H.double()
    ref = s.double() ** 2 * ((V.double().T @ H64) * V.double().T).sum(1)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert torch.allclose(e, ref, rtol=tol, atol=tol * float(ref.max()))
    energy = float(torch.trace(D @ H64 @ D.T))
    assert float(e.sum()) == pytest.approx(energy, rel=tol)
    zero = whitened_svd(D, torch.zeros(90, 90, dtype=dtype))
    assert torch.equal(zero[3], torch.zeros(70, dtype=torch.float64))


@pytest.mark.parametrize("n,block", [(7, 512), (600, 128), (515, 256)])
def test_the_gram_from_its_upper_blocks_is_x_transpose_x(n, block):
    # add_gram over several windows, then symmetric_from_upper: X^T X of all of them (float64 reference)
    from adamix.quant.linalg import add_gram, symmetric_from_upper
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(t, n, generator=g) * torch.logspace(-1, 1, n) for t in (40, 13, 64)]
    G = None
    for x in xs:
        G = add_gram(G, x, block)
    G = symmetric_from_upper(G, block)
    X = torch.cat(xs).double()
    ref = X.T @ X
    assert float((G.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    off = torch.ones(n, n, dtype=torch.bool).triu(block)  # blocks above the diagonal band mirror exactly
    assert torch.equal(G[off], G.T[off])


@pytest.mark.parametrize("n,block", [(7, 512), (600, 128), (515, 256)])
def test_triangular_products_skip_the_zero_blocks_and_equal_the_full_ones(n, block):
    # A L and L B for a lower triangular L, band by band: against float64 products of the whole L;
    # add_gram with y: the upper block triangle of x^T y for a symmetric product (x^T y with y = x M, M symmetric)
    from adamix.quant.linalg import add_gram, lower_times, times_lower
    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g).tril()
    A, B = torch.randn(33, n, generator=g), torch.randn(n, 21, generator=g)
    ref_AL, ref_LB = A.double() @ L.double(), L.double() @ B.double()
    AL, LB = times_lower(A, L, block), lower_times(L, B, block)
    assert AL.shape == (33, n) and LB.shape == (n, 21)
    assert float((AL.double() - ref_AL).abs().max() / ref_AL.abs().max()) < 1e-5
    assert float((LB.double() - ref_LB).abs().max() / ref_LB.abs().max()) < 1e-5
    x = torch.randn(40, n, generator=g, dtype=torch.float64)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    y = x @ (M + M.T)
    G = add_gram(None, x, block, y=y)
    ref = x.T @ y
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    assert torch.allclose(G[upper], ref[upper], rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_product64_in_float32_is_the_float64_product_to_float32_rounding():
    from adamix.quant.linalg import product64
    g = torch.Generator().manual_seed(4)
    H = torch.randn(300, 300, generator=g)
    V = torch.randn(300, 12, generator=g, dtype=torch.float64)
    ref = H.double() @ V
    exact = product64(H, V)
    single = product64(H, V, torch.float32)
    assert exact.dtype == single.dtype == torch.float64
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=0.0)
    err = float((single - ref).abs().max() / ref.abs().max())
    assert 0 < err < 1e-5  # rounded as float32 products are, and no worse


def test_gram_sum_gathers_pieces_and_rounds_less_than_one_sum_per_window():
    # GramSum over pieces of any size (one longer than its rows): X^T X of all of them; over 1500 short
    # windows of a Gram that one direction dominates (as a repetitive calibration text gives), its
    # float32 error (spectral norm, what pushes eigenvalues below zero) is a fraction of that of adding
    # each window's X^T X to the sum in turn
    from adamix.quant.linalg import GramSum, add_gram, symmetric_from_upper
    g = torch.Generator().manual_seed(3)
    n = 96
    u = torch.randn(n, generator=g)
    xs = [0.05 * torch.randn(t, n, generator=g) + 30 * torch.randn(t, 1, generator=g) * u for t in [20] * 1500 + [3000, 5]]
    total = GramSum()
    for x in xs:
        total.add(x)
    G = total.result()
    assert torch.equal(G, G.T)
    X = torch.cat(xs).double()
    ref = X.T @ X
    per_window = None
    for x in xs:
        per_window = add_gram(per_window, x)
    per_window = symmetric_from_upper(per_window)

    def spectral_error(A):
        return float(torch.linalg.matrix_norm(A.double() - ref, 2) / torch.linalg.matrix_norm(ref, 2))
    assert spectral_error(G) < 1e-6 and spectral_error(G) < spectral_error(per_window) / 2


@pytest.mark.parametrize("m,n", [(40, 70), (70, 40), (50, 50)])
def test_the_spectrum_grows_its_vectors_as_the_whole_svd_gives_them(m, n):
    # Spectrum.vectors(k) in three steps: the same columns as all at once, which are the whitened SVD
    # (D = U S V^T to rounding, e_i = s_i^2 v_i^T H v_i against float64 products); bound >= e; energy
    # = tr(D H D^T); the columns of a step are computed once (the earlier ones are kept, not redone)
    from adamix.quant.linalg import whitened_spectrum, whitened_svd
    g = torch.Generator().manual_seed(m + 3 * n)
    D = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, n, dtype=torch.float64))
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
    H = X.T @ X
    r = min(m, n)
    sp = whitened_spectrum(D, H)
    assert len(sp) == r and sp.count == 0
    first = sp.vectors(7)
    assert sp.count == 7 and first[0].shape == (m, 7) and first[2].shape == (n, 7)
    sp.vectors(20)
    U, s, V, e = sp.vectors(r)
    assert torch.equal(U[:, :7], first[0]) and torch.equal(V[:, :7], first[2])
    U2, s2, V2, e2 = whitened_svd(D, H)
    for a, b in ((U, U2), (s, s2), (V, V2), (e, e2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    torch.testing.assert_close((U * s) @ V.T, D, rtol=0.0, atol=1e-10 * float(D.abs().max()))
    ref = s ** 2 * ((V.T @ H) * V.T).sum(1)
    torch.testing.assert_close(e, ref, rtol=1e-8, atol=1e-10 * float(ref.max()))
    assert bool((sp.bound >= e * (1 - 1e-12)).all()) and torch.equal(sp.bound, sp.bound.sort(descending=True).values)
    assert sp.energy == pytest.approx(float(torch.trace(D @ H @ D.T)), rel=1e-10)
    assert whitened_spectrum(D, torch.zeros(n, n, dtype=torch.float64)) is None


def test_the_wide_whitened_svd_without_a_factor_is_the_factored_one():
    # D (m < n): eigenpairs of D (H + rho I) D^T against the route through H + rho I = L L^T (full SVD
    # of D L): the same s, e and vectors (up to sign), with a positive definite H (no ridge escalation)
    from adamix.quant.linalg import whitened_svd
    g = torch.Generator().manual_seed(9)
    D = torch.randn(30, 50, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 50, dtype=torch.float64))
    X = torch.randn(200, 50, generator=g, dtype=torch.float64)
    H = X.T @ X
    U1, s1, V1, e1 = whitened_svd(D, H, "gram")
    U2, s2, V2, e2 = whitened_svd(D, H, "full")
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(e1, e2, rtol=1e-9, atol=0.0)
    one = torch.ones(30, dtype=torch.float64)
    torch.testing.assert_close((V1 * V2).sum(0).abs(), one, rtol=0.0, atol=1e-8)  # unit columns, equal up to sign
    torch.testing.assert_close((U1 * U2).sum(0).abs(), one, rtol=0.0, atol=1e-8)

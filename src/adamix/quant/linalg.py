"""Linear algebra shared by the methods: the SVD of a delta (plain or whitened) and the
activation-weighted error E(D^) = tr((D^ - D) H (D^ - D)^T) that every method is judged by."""

from __future__ import annotations

import torch

from ..timing import timed


@timed("svd")
def svd(D: torch.Tensor, H: torch.Tensor | None = None, whiten: bool = False) -> tuple[torch.Tensor, ...]:
    """D = U diag(s) V^T with U (m, r), s (r,), V (n, r) unit columns; float64 (float32 for huge D).

    Plain: the SVD of D. Whitened (H given): the SVD of D L with H + eps I = L L^T, so that
    D L = U S W^T and V = L^-T W (columns rescaled to unit norm, the norms moved into s). Its truncation
    is optimal in the H-weighted error, and the v_i are H-orthogonal, so dropping triplets costs
    exactly the error table's e_i(0) (no cross terms).
    """
    work = D.double() if D.numel() <= 16_000_000 else D.float()
    if not whiten or H is None:
        U, s, Vh = torch.linalg.svd(work, full_matrices=False)
        return U, s, Vh.T
    Hd = H.to(work.dtype)
    L = torch.linalg.cholesky(Hd + 1e-6 * torch.diagonal(Hd).mean() * torch.eye(Hd.shape[0], dtype=Hd.dtype))
    U, s, Wh = torch.linalg.svd(work @ L, full_matrices=False)
    V = torch.linalg.solve_triangular(L.T, Wh.T, upper=True)
    norms = V.norm(dim=0).clamp_min(1e-30)
    return U, s * norms, V / norms


def gram_rows(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor | None, chunk: int = 512) -> torch.Tensor:
    """a_i^T H b_i for the rows of A, B (r, n); float64 (r,). H None means H = I.

    The products run in H's dtype (the pipeline's float32 Gram: float32 products summed in float64,
    callers pass differences, not large terms that cancel) on `chunk` rows at a time, so that the
    work memory is a few chunk x n blocks, not r x n (r = 4096, n = 11008: 180 MB each), and H is
    never copied (a float64 copy of an 11008-wide Gram is 1 GB).
    """
    dtype = H.dtype if H is not None else torch.float64
    out = []
    for i in range(0, A.shape[0], chunk):
        a, b = A[i:i + chunk].to(dtype), B[i:i + chunk].to(dtype)
        out.append(((a if H is None else a @ H) * b).sum(1, dtype=torch.float64))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def matmul64(A: torch.Tensor, B: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """A B in float64 (r, k) for A (r, n) in any dtype (a float32 Gram H, a float32 delta D) and B (n, k):
    rows of A converted to float64 `chunk` at a time, an exact product without a float64 copy of A
    (1 GB for an 11008-wide Gram, 360 MB for a 4096 x 11008 delta)."""
    B = B.double()
    out = torch.empty(A.shape[0], B.shape[1], dtype=torch.float64)
    for i in range(0, A.shape[0], chunk):
        out[i:i + chunk] = A[i:i + chunk].double() @ B
    return out


def output_error(Dhat: torch.Tensor | None, D: torch.Tensor, H: torch.Tensor | None, chunk: int = 1024) -> float:
    """tr((D^ - D) H (D^ - D)^T) (Frobenius norm squared if H is None; D^ None: zero), summed in
    float64, the products in H's dtype (gram_rows).

    Rows of E = D^ - D (formed in float64) in chunks, so the work memory is a few chunk x n blocks."""
    total = 0.0
    for i in range(0, D.shape[0], chunk):
        E = -D[i:i + chunk].double() if Dhat is None else Dhat[i:i + chunk].double() - D[i:i + chunk].double()
        total += float(gram_rows(E, E, H).sum())
    return total


def error_stats(Dhat: torch.Tensor, D: torch.Tensor, H: torch.Tensor | None, predicted: float | None = None,
                energy: float | None = None) -> dict:
    """Relative errors sqrt(E(D^) / E(0)) measured (and predicted, if the method has a model of it);
    energy: E(0) = output_error(None, D, H) if the caller has it."""
    total = output_error(None, D, H) if energy is None else energy
    measured = output_error(Dhat, D, H)
    stats = {"error_measured": (measured / total) ** 0.5 if total > 0 else 0.0}
    if predicted is not None:
        stats["error_predicted"] = (predicted / total) ** 0.5 if total > 0 else 0.0
    stats["energy"] = total
    return stats

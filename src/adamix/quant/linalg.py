"""Linear algebra shared by the methods: the SVD of a delta (plain or whitened) and the
activation-weighted error E(D^) = tr((D^ - D) H (D^ - D)^T) that every method is judged by."""

from __future__ import annotations

import torch

from ..timing import timed
from .eigen import PartialEigen
from .memo import LastGram


SVD_ALGORITHMS = ("gram", "full")


@timed("svd")
def svd(D: torch.Tensor, H: torch.Tensor | None = None, whiten: bool = False,
        algorithm: str = "gram") -> tuple[torch.Tensor, ...]:
    """D = U diag(s) V^T with U (m, r), s (r,) non-increasing, V (n, r) unit columns, r = min(m, n);
    float64 (float32 for huge D), on D's device.

    algorithm "gram" (thin_svd_gram: the eigendecomposition of the smaller Gram) or "full" (LAPACK's
    SVD, torch.linalg.svd). Plain: the SVD of D. Whitened (H given): the SVD of D L with
    H + eps I = L L^T (whitening_factor), so that D L = U S W^T and V = L^-T W (columns rescaled to unit norm, the norms
    moved into s). Its truncation is optimal in the H-weighted error, and the v_i are H-orthogonal, so
    dropping triplets costs exactly the error table's e_i(0) (no cross terms).
    """
    if algorithm not in SVD_ALGORITHMS:
        raise ValueError(f"unknown SVD algorithm {algorithm!r} (choose from {', '.join(SVD_ALGORITHMS)})")
    if whiten and H is not None:
        return whitened_svd(D, H, algorithm)[:3]
    return (thin_svd_gram if algorithm == "gram" else thin_svd_full)(_working(D))


HUGE = 16_000_000  # entries: above this a delta's linear algebra runs in float32 (working_dtype)


def working_dtype(D: torch.Tensor) -> torch.dtype:
    """The dtype of D's linear algebra: float64, float32 for huge D (a float64 n x n is 1 GB at n = 11008)."""
    return torch.float64 if D.numel() <= HUGE else torch.float32


def _working(D: torch.Tensor) -> torch.Tensor:
    """D in its working dtype."""
    return D.to(working_dtype(D))


@timed("svd")
def whitened_svd(D: torch.Tensor, H: torch.Tensor, algorithm: str = "gram") -> tuple[torch.Tensor, ...]:
    """svd(D, H, whiten=True) and, from it without a product with H, e (r,) float64, the output error
    of dropping each triplet, e_i = s_i^2 v_i^T H v_i (allocate.error_table's e_i(0)).

    With H + rho I = L L^T and D L = U S_w W^T: v_i = L^-T w_i / |L^-T w_i| and s_i = s_w,i |L^-T w_i|,
    so s_i^2 v_i^T (L L^T) v_i = s_w,i^2 |w_i|^2 = s_w,i^2 and e_i = s_w,i^2 - rho s_i^2 (|v_i| = 1).
    Where no input reached the linear (H = 0), the plain SVD and e = 0. With the Gram algorithm,
    all the vectors of whitened_spectrum (triplets by decreasing s_w)."""
    work = _working(D)
    if algorithm == "gram":
        spectrum = whitened_spectrum(work, H)
        return _unweighted(work, thin_svd_gram) if spectrum is None else spectrum.vectors(len(spectrum))
    # in D's working dtype; any invertible L gives an exact factorization D = (D L) L^-1, the ridge
    # only bends the weighting
    L, rho = whitening(H, work.dtype, work.device)
    if L is None:  # no input ever reached this linear: nothing to weigh by
        return _unweighted(work, thin_svd_full)
    U, s_w, W = thin_svd_full(times_lower(work, L))
    return (U, *_unwhitened(s_w, W, L, rho))


def _unwhitened(s_w: torch.Tensor, W: torch.Tensor, L: torch.Tensor, rho: float) -> tuple[torch.Tensor, ...]:
    """s (k,), V (n, k), e (k,) of the triplets whose whitened right vectors are W (n, k), whitened
    singular values s_w (k,): V S = L^-T W S_w, unit columns, e = s_w^2 - rho s^2 (whitened_svd)."""
    V = torch.linalg.solve_triangular(L.T, W, upper=True)
    norms = V.norm(dim=0).clamp_min(1e-30)
    s = s_w * norms
    e = (s_w.double() ** 2 - rho * s.double() ** 2).clamp_min(0.0)
    return s, V / norms, e


WHITENING_EPS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # ridges tried in turn, times the mean of diag(H)


def _unweighted(work: torch.Tensor, decompose) -> tuple[torch.Tensor, ...]:
    """whitened_svd where no input reached the linear (H = 0): the plain SVD, and e = 0."""
    U, s, V = decompose(work)
    return U, s, V, torch.zeros(len(s), dtype=torch.float64, device=s.device)


class Spectrum:
    """The whitened SVD of D (m x n, r = min(m, n) triplets by decreasing whitened singular value
    s_w,i) computed to its eigenvalues, the vectors of the leading triplets on demand: the error table
    measures only the triplets that an optimal choice may keep (allocate.error_table's certificates),
    and the vectors of the others would cost a product of the delta's size each (A Z, or D^T U, and
    a triangular solve).

    bound (r,) float64: s_w,i^2 >= e_i(0) = s_w,i^2 - rho s_i^2, what a triplet's drop error is known
    by before its vectors exist (the certificates need upper bounds). energy: E(0) = tr(D H D^T)
    from a trace, exactly, whatever is computed. vectors(k): U (m, k), s (k,), V (n, k), e (k,) of the
    leading k triplets; each column is computed once (a later call adds those not yet computed).

    Built by whitened_spectrum, on one of two eigendecompositions (eigen.PartialEigen: every
    eigenvalue, the eigenvectors z_i back-transformed for the columns asked for only):
    - m >= n: A = D L with H + rho I = L L^T (whitening), A^T A = Z diag(s_w^2) Z^T; then
      u_i = A z_i / s_w,i and V S = L^-T Z S_w (one triangular solve per batch of columns).
    - m < n: M = D (H + rho I) D^T = U diag(s_w^2) U^T (no factor of H); then V S = D^T U.
    """

    def __init__(self, work: torch.Tensor, eigen: PartialEigen, rho: float, energy: float, L: torch.Tensor | None):
        self.work, self.eigen, self.rho, self.energy, self.L = work, eigen, rho, energy, L
        self.bound = eigen.values.double().clamp_min(0.0)
        self.done = self._columns(0, 0)  # U, s, V, e of the columns computed so far

    def __len__(self) -> int:
        return len(self.bound)

    @property
    def count(self) -> int:
        """How many leading triplets have their vectors."""
        return len(self.done[1])

    @timed("svd")
    def vectors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """U (m, k), s (k,), V (n, k), e (k,) float64 of the leading k triplets (k at most len(self))."""
        k = min(k, len(self))
        if k > self.count:
            more = self._columns(self.count, k)
            self.done = more if self.count == 0 else tuple(torch.cat(pair, dim=-1) for pair in zip(self.done, more))
        U, s, V, e = self.done
        return U[:, :k], s[:k], V[:, :k], e[:k]

    def _columns(self, a: int, b: int) -> tuple[torch.Tensor, ...]:
        Z = self.eigen.vectors(a, b)
        if self.L is None:  # m < n: V S = D^T U
            U, VS = Z, self.work.T @ Z
            s = VS.norm(dim=0)
            V = VS / torch.where(s > 0, s, 1.0)
            e = (self.bound[a:b] - self.rho * s.double() ** 2).clamp_min(0.0)
            return U, s, V, e
        AZ = self.work @ Z  # work is A = D L here
        s_w = AZ.norm(dim=0)
        return (AZ / torch.where(s_w > 0, s_w, 1.0), *_unwhitened(s_w, Z, self.L, self.rho))


@timed("svd")
def whitened_spectrum(D: torch.Tensor, H: torch.Tensor) -> Spectrum | None:
    """The Spectrum of D (m x n) weighted by H (n x n), in D's working dtype; None where no input
    reached the linear (diag(H) all zero). For m < n the ridge is the first of WHITENING_EPS (nothing
    is factored); for m >= n the smallest that lets H + rho I factor (whitening). The Grams on their
    upper block triangle (add_gram), read so by the eigensolver."""
    work = _working(D)
    scale = float(torch.diagonal(H).mean())
    if not scale > 0:
        return None
    square = output_error(None, work, None)  # ||D||_F^2, float64
    if work.shape[0] < work.shape[1]:
        rho = WHITENING_EPS[0] * scale
        DH = work @ H.to(work.dtype)
        M = add_gram(None, DH.add_(work, alpha=rho).T, y=work.T)  # its upper block triangle: M is symmetric
        del DH
        L = None
    else:
        L, rho = whitening(H, work.dtype, work.device)
        work = times_lower(work, L)  # A = D L
        M = add_gram(None, work)  # A^T A
    energy = float(torch.diagonal(M).sum(dtype=torch.float64)) - rho * square  # tr(D (H + rho I) D^T) - rho ||D||^2
    return Spectrum(work, PartialEigen(M), rho, max(energy, 0.0), L)  # M is the eigensolver's now


def whitening_factor(H: torch.Tensor, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor | None:
    """Lower Cholesky factor L of H + eps mean(diag H) I = L L^T (n x n), with the smallest
    ridge eps of WHITENING_EPS that makes it positive definite: a Gram of fewer tokens than inputs, or
    one accumulated in float32, is singular or slightly indefinite. None where diag(H) is all zero.
    In `dtype` on `device` (default H's). At most two n x n matrices at a time (the ridged copy and
    the factor)."""
    return whitening(H, dtype, device)[0]


WHITENINGS = LastGram()  # the linears sharing a Gram share its whitening factor


def whitening(H: torch.Tensor, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor | None, float]:
    """whitening_factor's L and the ridge rho = eps mean(diag H) it added (None, 0.0 where diag(H) is all zero);
    computed once for consecutive calls on the same Gram (memo.LastGram)."""
    return WHITENINGS.get(H, (str(dtype), str(device)), lambda: _whitening(H, dtype, device))


def _whitening(H: torch.Tensor, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor | None, float]:
    A = H.to(device=device or H.device, dtype=dtype or H.dtype, copy=True)  # the one copy, raised in place
    scale = float(torch.diagonal(A).mean())
    if not scale > 0:
        return None, 0.0
    added = 0.0
    for eps in WHITENING_EPS:
        A.diagonal().add_(eps * scale - added)
        added = eps * scale
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return L, added
        del L
    raise RuntimeError(f"whitening: the Gram is not positive definite even with a ridge of {eps} x its mean diagonal")


def thin_svd_full(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) of A (m x n) by torch.linalg.svd (LAPACK gesdd on the CPU)."""
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U, s, Vh.T


def thin_svd_gram(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) of A (m x n) from the eigendecomposition of its smaller Gram, in A's dtype.

    For m >= n: A^T A = Z diag(lambda) Z^T (n x n, torch.linalg.eigh), V = Z, and each left vector
    is the image of its right one: s_i = ||A z_i||, u_i = A z_i / s_i (0 where s_i = 0); for m < n
    the same on A^T. One Gram product (m n^2) and one symmetric eigensolver (n^3) replace the SVD's
    bidiagonalisation (the Gram's upper block triangle only, add_gram: half its products). Because Z
    is orthogonal, A = sum_i s_i u_i z_i^T holds to rounding whatever the eigensolver's accuracy; what the Gram costs is the orthogonality of the u_i of small
    singular values, about eps * s_1^2 / (s_i s_j) between u_i and u_j (float64: negligible;
    float32: the stored widths quantize far more coarsely). Triplets are returned by decreasing s.
    """
    if A.shape[0] < A.shape[1]:
        U, s, V = thin_svd_gram(A.T)
        return V, s, U
    _, Z = torch.linalg.eigh(add_gram(None, A), UPLO="U")  # A^T A on its upper block triangle
    AZ = A @ Z
    s = AZ.norm(dim=0)
    order = torch.argsort(s, descending=True, stable=True)
    s, Z, AZ = s[order], Z[:, order], AZ[:, order]
    return AZ / torch.where(s > 0, s, 1.0), s, Z


GRAM_BLOCK = 512  # rows per product of add_gram


def add_gram(G: torch.Tensor | None, x: torch.Tensor, block: int = GRAM_BLOCK,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """G += x^T x (n x n) for inputs x (t, n), in place (G None: a new zero G in x's dtype and device),
    on the upper block triangle only: for each band of `block` rows, G[I, I:] += x[:, I]^T x[:, I:],
    one matrix product, about half the multiply-adds of the whole x^T x. The blocks below the
    diagonal stay as they were until symmetric_from_upper fills them (once, after the last x), or
    are never read (torch.linalg.eigh(G, UPLO="U")). With y (t, n): G += x^T y the same way, for a
    product known to be symmetric (x^T y = y^T x)."""
    n = x.shape[1]
    y = x if y is None else y
    if G is None:
        G = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        G[i:i + block, i:].addmm_(x[:, i:i + block].T, y[:, i:])
    return G


def times_lower(A: torch.Tensor, L: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """A L (m x n) for a lower triangular L (n x n): each band of `block` columns,
    (A L)[:, J] = A[:, j:] L[j:, J], skips L's zero blocks (about half the multiply-adds of A @ L)."""
    out = torch.empty(A.shape[0], L.shape[1], dtype=torch.promote_types(A.dtype, L.dtype), device=A.device)
    for j in range(0, L.shape[1], block):
        torch.matmul(A[:, j:], L[j:, j:j + block], out=out[:, j:j + block])
    return out


def lower_times(L: torch.Tensor, A: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """L A (n x k) for a lower triangular L (n x n): each band of `block` rows,
    (L A)[I] = L[I, :i_end] A[:i_end], skips L's zero blocks (about half the multiply-adds of L @ A)."""
    out = torch.empty(L.shape[0], A.shape[1], dtype=torch.promote_types(A.dtype, L.dtype), device=A.device)
    for i in range(0, L.shape[0], block):
        end = min(i + block, L.shape[0])
        torch.matmul(L[i:end, :end], A[:end], out=out[i:end])
    return out


GRAM_ROWS = 2048  # GramSum: input rows gathered per add_gram


class GramSum:
    """H = X^T X (n x n) of inputs that arrive in pieces x_w (t_w, n), e.g. one calibration window at
    a time, in the pieces' dtype and device. The pieces are copied into one buffer of `rows` rows,
    and each add_gram takes the buffer when the next piece would overflow it, so the running sum is
    rounded once per about `rows` rows rather than once per piece (a piece of `rows` or more is
    added at once). In float32 each rounding adds an error of about eps |H_ij| to every entry; over
    thousands of short windows of a Gram dominated by one direction those errors add up to negative
    eigenvalues larger than GPTQ's damping. Memory: G and the buffer (rows x n)."""

    def __init__(self, rows: int = GRAM_ROWS):
        self.rows, self.G, self.buffer, self.count = rows, None, None, 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs x (t, n)."""
        t = x.shape[0]
        if self.count + t > self.rows:
            self._flush()
        if t >= self.rows:
            self.G = add_gram(self.G, x)
            return
        if self.buffer is None:
            self.buffer = torch.empty(self.rows, x.shape[1], dtype=x.dtype, device=x.device)
        self.buffer[self.count:self.count + t] = x
        self.count += t

    def _flush(self) -> None:
        if self.count:
            self.G = add_gram(self.G, self.buffer[:self.count])
            self.count = 0

    def result(self) -> torch.Tensor:
        """The whole H (n x n), symmetric; the GramSum is spent."""
        self._flush()
        G, self.G, self.buffer = symmetric_from_upper(self.G), None, None
        return G


def symmetric_from_upper(G: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Fill the blocks of G (n x n) below its diagonal blocks with the transposes of those above, in
    place (add_gram's blocks); returns G."""
    n = G.shape[0]
    for i in range(0, n - block, block):
        G[i + block:, i:i + block] = G[i:i + block, i + block:].T
    return G


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
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=A.device)


def matmul64(A: torch.Tensor, B: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """A B in float64 (r, k) for A (r, n) in any dtype (a float32 Gram H, a float32 delta D) and B (n, k):
    rows of A converted to float64 `chunk` at a time, an exact product without a float64 copy of A
    (1 GB for an 11008-wide Gram, 360 MB for a 4096 x 11008 delta). On A's device."""
    B = B.double()
    out = torch.empty(A.shape[0], B.shape[1], dtype=torch.float64, device=A.device)
    for i in range(0, A.shape[0], chunk):
        out[i:i + chunk] = A[i:i + chunk].double() @ B
    return out


def product64(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A B as float64 (r, k), its products in `dtype`: float64 by matmul64, or float32 (a huge delta's
    working_dtype: half the time of float64 products, whose exactness its float32 SVD does not use)."""
    if dtype == torch.float64:
        return matmul64(A, B)
    return (A.to(dtype) @ B.to(dtype)).double()


def output_error(Dhat: torch.Tensor | None, D: torch.Tensor, H: torch.Tensor | None, chunk: int = 1024) -> float:
    """tr((D^ - D) H (D^ - D)^T) (Frobenius norm squared if H is None; D^ None: zero), summed in
    float64, the products in H's dtype (gram_rows).

    Rows of E = D^ - D (formed in float64) in chunks, so the work memory is a few chunk x n blocks."""
    total = 0.0
    for i in range(0, D.shape[0], chunk):
        E = -D[i:i + chunk].double() if Dhat is None else Dhat[i:i + chunk].double() - D[i:i + chunk].double()
        total += float(gram_rows(E, E, H).sum())
    return total


def factored_error(U: torch.Tensor, rhs: torch.Tensor, G: torch.Tensor, energy: float) -> float:
    """E(U V) = tr((U V - D) H (U V - D)^T) for a factored D^ = U V (U (m, k), V (k, n)) without a pass
    over D H D^T, from rhs = D H V^T (m, k), G = V H V^T (k, k) and energy = E(0) = tr(D H D^T):

        E(U V) = E(0) - 2 tr(U^T rhs) + tr(U^T U G),

    float64, O(m k^2). A difference of terms of the size of E(0): its rounding is that of `energy`."""
    U = U.double()
    return max(0.0, energy - 2 * float((U * rhs).sum()) + float(((U @ G) * U).sum()))


def relative_errors(measured: float, energy: float, predicted: float | None = None) -> dict:
    """{"error_measured": sqrt(measured / E(0)), ["error_predicted": sqrt(predicted / E(0)),] "energy": E(0)}."""
    stats = {"error_measured": (measured / energy) ** 0.5 if energy > 0 else 0.0}
    if predicted is not None:
        stats["error_predicted"] = (predicted / energy) ** 0.5 if energy > 0 else 0.0
    stats["energy"] = energy
    return stats


def error_stats(Dhat: torch.Tensor, D: torch.Tensor, H: torch.Tensor | None, predicted: float | None = None,
                energy: float | None = None) -> dict:
    """Relative errors sqrt(E(D^) / E(0)) measured (and predicted, if the method has a model of it);
    energy: E(0) = output_error(None, D, H) if the caller has it."""
    total = output_error(None, D, H) if energy is None else energy
    return relative_errors(output_error(Dhat, D, H), total, predicted)

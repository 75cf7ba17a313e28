"""Mixed-precision GPTQ (Frantar et al., 2022) with a per-vector bit-width.

GPTQ quantizes W (k x n, y = W x) one input column j at a time and pushes the rounding error onto
the columns not yet quantized, so as to minimise the output error ||(Q - W) X||_F^2 =
tr((Q - W) H (Q - W)^T) with H = X X^T (n x n). With the upper Cholesky factor C of H^-1:

    err_j = (w_j - q_j) / C_jj,        W[:, j+1:] -= err_j C_j,j+1:

Two ways of attaching a grid to the vectors, both used by ADAMIX:
- `gptq_rows`: each ROW of W is one vector with its own width (V^T: one row per singular vector);
  grids are per group of `group_size` consecutive columns, fitted when GPTQ reaches the group.
- `gptq_columns`: each COLUMN of W is one vector with its own width (U: one column per singular
  vector); a column's grid (groups of `group_size` rows) is fitted when GPTQ reaches the column.
Both also on the Gaussian grid of quant.normal (grid="normal"): one scale per vector, fitted on the
row before GPTQ starts (`gptq_rows`) or on the column when GPTQ reaches it (`gptq_columns`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import normal
from .grid import expand_groups, fit_grid, n_groups
from .linalg import lower_times, times_lower
from .memo import LastGram
from ..timing import timed


DAMP_STEPS = (1.0, 10.0, 100.0)  # cholesky_inverse_upper: multiples of the damping tried in turn


class Factor(NamedTuple):
    """cholesky_inverse_upper's result: C (n, n) float32 upper, the mask of dead inputs (n,), and the
    damping that C was computed with (the asked one, or a larger step where that failed)."""
    C: torch.Tensor
    dead: torch.Tensor
    damp: float


FACTORS = LastGram()  # the linears sharing a Gram share its factor


def shared_factor(H: torch.Tensor, damp: float) -> Factor:
    """cholesky_inverse_upper of a layer's input Gram H, computed once for consecutive calls on the same
    Gram (memo.LastGram: the error tables of the linears that read the same input)."""
    return FACTORS.get(H, (float(damp), str(H.device)), lambda: cholesky_inverse_upper(H, damp))


def cholesky_inverse_upper(H: torch.Tensor, damp: float) -> Factor:
    """Upper Cholesky factor C of A^-1 = C^T C, A = H + damp * mean(diag H) I; float32 (n x n), on H's device.

    Columns with H_jj == 0 (inputs that never fire) get H_jj = 1; their mask is returned too.
    From one Cholesky factor of the reversed matrix: with J the reversal (J^2 = I), J A J = L L^T
    gives A = (J L J)(J L J)^T with J L J upper triangular, so A^-1 = C^T C for C = (J L J)^-1 =
    J L^-1 J, the reference GPTQ's factor of the inverse (unique: positive diagonal). One factor
    (n^3/3 flops) and one triangular inverse (_invert_lower_, matrix products) replace factor,
    inverse from the factor and factor of the inverse (4 n^3/3). Both run in place on the reversed
    float32 copy, so at most two n x n float32 matrices exist at a time (that copy and C). torch.linalg
    throughout, so the threads are torch's (`--threads`) and it runs on a GPU as well.

    A float32 Gram is positive semi-definite only up to rounding: where one direction holds nearly all
    of its trace, the rounding's negative eigenvalues can exceed the damping, and the factor fails.
    The damping is then raised by the steps of DAMP_STEPS (as GPTQ tools raise theirs); the damping
    used is returned (Factor.damp), for quant_error.
    """
    for step in DAMP_STEPS:
        A = H.to(torch.float32).flip(0, 1)  # a new tensor: H itself is never written
        diag = A.diagonal()
        dead = diag == 0
        diag[dead] = 1.0
        diag.add_(damp * step * diag.mean())
        F = A.T  # column-major view: LAPACK factors it in place, J A J = L L^T lands in A's lower triangle
        _, info = torch.linalg.cholesky_ex(F, upper=True, out=(F, torch.empty((), dtype=torch.int32, device=A.device)))
        if int(info) == 0:
            _invert_lower_(A.tril_())
            return Factor(A.flip(0, 1), dead.flip(0), damp * step)
        del A, F
    raise RuntimeError(f"GPTQ: the Gram is not positive definite even with a damping of {damp * step} x its mean diagonal")


INVERT_LEAF = 256  # _invert_lower_: blocks up to this size by a triangular solve


def _invert_lower_(L: torch.Tensor) -> torch.Tensor:
    """L^-1 of a lower triangular L (n x n, zeros above the diagonal), in place, by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]] (matrix products that skip the zero
    blocks of the triangular A^-1 and C^-1, linalg.times_lower / lower_times: about n^3/3 flops;
    temporaries of at most n^2/2 entries)."""
    n = L.shape[0]
    if n <= INVERT_LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    h = n // 2
    A, B, C = _invert_lower_(L[:h, :h]), L[h:, :h], _invert_lower_(L[h:, h:])
    B.copy_(lower_times(C, times_lower(B, A))).neg_()
    return L


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor],
    block: int = 128,
    damp: float = 0.01,
    factor: Factor | None = None,
    loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generic GPTQ loop. W: (k, n); H: (n, n). Returns the dequantized Q (k, n) float32.

    quantize_column(j, rest) gets the current (error-updated) columns j..end-of-block of W as the
    rows of `rest` (<= block, k): rest[0] is column j, rest[:g] the g columns from j on; it returns
    the dequantized column j (k,). The work runs on W^T (n, k), so that a column is one contiguous
    row: the per-column update is a rank-1 BLAS update (addr_) of the block's later rows, the block's
    push onto the rest one addmm_. factor: cholesky_inverse_upper(H, damp) if the caller has it
    (several calls on the same H). Rows of W are quantized independently of each other: a row's
    result does not depend on the rows beside it, except through rounding (BLAS may round an update
    differently in a batch of another size, so at 8 bits a code at a tie can flip).

    loss (k,) float64, if given, receives sum_j err_j^2 per row, which equals (W' - Q) H' (W' - Q)^T
    exactly (each column's error is final once pushed on): H' = H with H_jj = 1 where H_jj = 0, plus
    the damping, and W' = W with those columns zeroed (quant_error turns it into the error on H).
    """
    Wt = W.T.float().contiguous()  # (n, k), a copy
    n = Wt.shape[0]
    C, dead, _ = cholesky_inverse_upper(H, damp) if factor is None else factor
    Wt[dead] = 0
    Qt = torch.empty_like(Wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wt[i1:i2]  # a view: the block's columns, updated in place
        E1 = torch.empty_like(W1)
        C1 = C[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = quantize_column(i1 + i, W1[i:])
            Qt[i1 + i] = q
            err = E1[i]
            torch.sub(W1[i], q, out=err).div_(C1[i, i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(C1[i, i + 1:], err, alpha=-1)
        if i2 < n:
            Wt[i2:].addmm_(C[i1:i2, i2:].T, E1, alpha=-1)
        if loss is not None:
            loss += (E1.double() ** 2).sum(0)
    return Qt.T


def quant_error(loss: torch.Tensor, W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, damp: float) -> torch.Tensor:
    """(W - Q) H (W - Q)^T per row (k,) float64 from gptq's `loss` on the same W (k, n), Q and H:
    the damping's share, damp * mean(diag H') |W' - Q|^2, and the unit diagonal given to the inputs
    that never fire, sum over those j of Q_j^2, taken off (H is zero in their rows and columns)."""
    diag = H.diagonal().float().clone()
    dead = diag == 0
    diag[dead] = 1.0
    lam = damp * float(diag.mean())
    d = Q.float() - W.float().masked_fill(dead, 0.0)  # float32 (k, n): a float64 copy is 90 MB per 1024 rows at n = 11008
    d2 = d * d
    return loss - lam * d2.sum(1, dtype=torch.float64) - d2[:, dead].sum(1, dtype=torch.float64)


@timed("gptq")
def gptq_rows(W: torch.Tensor, H: torch.Tensor, bits: torch.Tensor, group_size: int,
              damp: float = 0.01, factor: Factor | None = None,
              with_error: bool = False, grid: str = "uniform") -> dict[str, torch.Tensor]:
    """GPTQ where row i of W (k x n) is quantized at bits[i]; grids per group of columns.

    Returns codes (k, n) uint8, scale/offset (k, G) float32 holding fp16 values, deq (k, n), and with
    with_error the output error of each row, error (k,) float64 = (w_i - q_i)^T H (w_i - q_i), from
    GPTQ's own column errors (gptq's loss, quant_error): no product with H.
    factor: cholesky_inverse_upper(H, damp), if already computed. grid "normal": quant.normal's grid,
    scale (k,) instead of scale and offset per group (group_size unused).
    """
    if with_error and factor is None:
        factor = cholesky_inverse_upper(H, damp)  # quant_error needs the damping it used
    if grid == "normal":
        return _gptq_rows_normal(W, H, bits, damp, factor, with_error)
    k, n = W.shape
    g = min(group_size, n)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)  # transposed while GPTQ writes it
    scale = torch.zeros(k, n_groups(n, g), device=W.device)
    offset = torch.zeros_like(scale)
    block = g * max(1, 128 // g)  # a multiple of g: each group is fitted on fully updated values
    maxq = 2.0 ** bits.to(torch.float32) - 1
    zero = torch.zeros_like(maxq)
    grids = {}  # the current group's scale, offset (k,) contiguous

    def quantize_column(j: int, rest: torch.Tensor) -> torch.Tensor:
        # grid.quantize and grid.dequantize of one column, inlined (this runs once per column: on a GPU
        # the number of small operations is its time)
        grp = j // g
        if j % g == 0:
            s, o = fit_grid(rest[:g].T, bits, g)
            scale[:, grp], offset[:, grp] = s[:, 0], o[:, 0]
            grids["s"], grids["o"] = s[:, 0].contiguous(), o[:, 0].contiguous()
        s, o = grids["s"], grids["o"]
        q = torch.sub(rest[0], o).div_(s).round_().clamp_(min=zero, max=maxq)
        codes[j] = q
        return q.mul_(s).add_(o)

    loss = torch.zeros(k, dtype=torch.float64, device=W.device) if with_error else None
    deq = gptq(W, H, quantize_column, block=block, damp=damp, factor=factor, loss=loss)
    out = {"codes": codes.T.contiguous(), "scale": scale, "offset": offset, "deq": deq.contiguous()}
    if with_error:
        out["error"] = quant_error(loss, W, deq, H, factor.damp)
    return out


def _gptq_rows_normal(W: torch.Tensor, H: torch.Tensor, bits: torch.Tensor, damp: float,
                      factor: Factor | None, with_error: bool) -> dict[str, torch.Tensor]:
    """gptq_rows on quant.normal's grid: each row's scale fitted on the row as given, then GPTQ."""
    k, n = W.shape
    book = normal.Codebook(bits, W.device)
    scale = normal.fit_scale(W, bits)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)  # transposed while GPTQ writes it

    def quantize_column(j: int, rest: torch.Tensor) -> torch.Tensor:
        q, deq = book.round(rest[0][:, None], scale)
        codes[j] = q[:, 0]
        return deq[:, 0]

    loss = torch.zeros(k, dtype=torch.float64, device=W.device) if with_error else None
    deq = gptq(W, H, quantize_column, damp=damp, factor=factor, loss=loss)
    out = {"codes": codes.T.contiguous(), "scale": scale, "deq": deq.contiguous()}
    if with_error:
        out["error"] = quant_error(loss, W, deq, H, factor.damp)
    return out


@timed("gptq")
def gptq_columns(W: torch.Tensor, H: torch.Tensor, bits: torch.Tensor, group_size: int,
                 damp: float = 0.01, grid: str = "uniform") -> dict[str, torch.Tensor]:
    """GPTQ where column j of W (m x k) is one vector quantized at bits[j]; grids per group of rows
    (grid "normal": quant.normal's, one scale per column).

    Returns codes (k, m) uint8 (one row per column of W), scale/offset (k, G) (normal: scale (k,)),
    deq (m, k).
    """
    m, k = W.shape
    codes = torch.zeros(k, m, dtype=torch.uint8, device=W.device)
    grids: dict[str, torch.Tensor] = {}  # scale (and offset) per column, allocated at the first one

    def quantize_column(j: int, rest: torch.Tensor) -> torch.Tensor:
        r = normal.rtn_on(grid, rest[0][None, :], bits[j:j + 1], group_size)
        codes[j] = r["codes"][0]
        for key in r.keys() - {"codes", "deq"}:
            grids.setdefault(key, torch.zeros(k, *r[key].shape[1:], device=W.device))[j] = r[key][0]
        return r["deq"][0]

    deq = gptq(W, H, quantize_column, block=128, damp=damp)
    return {"codes": codes, **grids, "deq": deq.contiguous()}


def rtn_columns(W: torch.Tensor, bits: torch.Tensor, group_size: int, grid: str = "uniform") -> dict[str, torch.Tensor]:
    """RTN counterpart of gptq_columns (same outputs), for the data-free mode."""
    r = normal.rtn_on(grid, W.T, bits, group_size)
    return {**r, "deq": r["deq"].T}


__all__ = ["gptq", "gptq_rows", "gptq_columns", "rtn_columns", "cholesky_inverse_upper", "shared_factor", "Factor",
           "expand_groups"]

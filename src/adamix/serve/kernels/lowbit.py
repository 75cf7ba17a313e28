"""Low-bit factors held compactly in memory and multiplied without expanding them (CPU, float32).

A factor F (k, L), each row i quantized at its own width b_i with per-group grids along the row
(groups of g entries, G = ceil(L / g) per row):

    F[i, j] = offset[j // g, i] + scale[j // g, i] * q[i, j]                       (1)

is held in one of two layouts, scale and offset (G, k) float32 in both (group-major: one group's
grids for all rows side by side, as the kernels read them), the codes in blocks of 32 bytes,
interleaved so that shifting and masking a block's eight 32-bit words gives eight consecutive
entries (`pack8`, `pack4`; lowbit.c), which is what makes the kernels fast:
  * `LowBitRows`, for y += t F (the output side, U^T): rows with b_i > 4 one byte per code
    (q8 (k8, 32 ceil(L / 32))), rows with b_i <= 4 two codes per byte (q4 (k - k8, 32 ceil(L / 64)));
  * `LowBitCols`, for t = x F^T (the input side, V^): the 8-bit rows as above, the narrower rows
    transposed (q4 (L, 32 ceil((k - k8) / 64))), so that x F^T is also an accumulation of code rows
    scaled by x_j, the form the kernels run fastest (twice the speed of per-row dot products here).
Rows with b_i > 4 come first (the artifact's order: widest first). About 0.5-0.6 bytes per entry for
ADAMIX's {2, 3, 4, 8}-bit widths, against 4 for float32.

The products read the codes once per call through the C kernels:
    rowdot(V, x)     = x V^T                 (V: LowBitCols (k, n), x (M, n) -> (M, k))
    axpy(U, t, y):     y += t U              (U: LowBitRows (k, m), t (M, k), y (M, m))
    LowRankPair(V, U).addmm(x, y): y += (x V^T) U, for D^ = U^ V^ stored as V^ (k, n) and U^T (k, m)
`reference` is (1) in torch.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from . import native
from ...quant import grid
from ...quant.grid import n_groups


@dataclasses.dataclass(frozen=True)
class LowBitFactor:
    """F (k, L) as in (1): q8 (k8, 32 ceil(L / 32)) the rows wider than 4 bits (`pack8`), q4 the
    narrower rows in the layout of the subclass, scale and offset (G, k) float32."""
    L: int
    g: int
    q8: torch.Tensor
    q4: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def k(self) -> int:
        return self.scale.shape[1]

    @property
    def k8(self) -> int:
        return self.q8.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.q8, self.q4, self.scale, self.offset]


class LowBitRows(LowBitFactor):
    """By rows (for y += t F): q4 (k - k8, 32 ceil(L / 64)), `pack4` of the narrower rows."""


class LowBitCols(LowBitFactor):
    """By columns (for x F^T): q4 (L, 32 ceil((k - k8) / 64)), `pack4` of the narrower rows' codes
    transposed: row j holds entry j of every narrower row."""


def _blocks(codes: torch.Tensor, per_block: int) -> torch.Tensor:
    """Codes (k, L) -> (k, nb, per_block / 8, 8) zero-padded: [row, block, u, w] = entry per_block b + 8 u + w."""
    k, L = codes.shape
    nb = -(-L // per_block)
    q = torch.zeros(k, nb * per_block, dtype=torch.uint8)
    q[:, :L] = codes
    return q.view(k, nb, per_block // 8, 8)


def pack8(codes: torch.Tensor) -> torch.Tensor:
    """Codes (k, L) uint8 -> (k, 32 ceil(L / 32)): byte u of 32-bit word w of block b = entry 32 b + 8 u + w."""
    q = _blocks(codes, 32)
    return q.transpose(2, 3).reshape(codes.shape[0], q.shape[1] * 32).contiguous()  # [block, w, u]


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (k, L) uint8, all < 16 -> (k, 32 ceil(L / 64)): nibble u of 32-bit word w of block b (bits
    4 u .. 4 u + 3, little-endian) = entry 64 b + 8 u + w."""
    q = _blocks(codes, 64).transpose(2, 3)  # [row, block, w, u], u = 0..7
    return (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(codes.shape[0], q.shape[1] * 32).contiguous()


def unpack8(q8: torch.Tensor, L: int) -> torch.Tensor:
    """The inverse of pack8: (k, 32 ceil(L / 32)) -> codes (k, L)."""
    k, nb = q8.shape[0], q8.shape[1] // 32
    return q8.view(k, nb, 8, 4).transpose(2, 3).reshape(k, nb * 32)[:, :L]


def unpack4(q4: torch.Tensor, L: int) -> torch.Tensor:
    """The inverse of pack4: (k, 32 ceil(L / 64)) -> codes (k, L)."""
    k, nb = q4.shape[0], q4.shape[1] // 32
    q = q4.view(k, nb, 8, 4)
    both = torch.stack([q & 15, q >> 4], dim=-1).reshape(k, nb, 8, 8)  # [row, block, w, u]
    return both.transpose(2, 3).reshape(k, nb * 64)[:, :L]


def _split(codes: torch.Tensor, bits: list[int], scale: torch.Tensor, offset: torch.Tensor, g: int) -> int:
    """Check codes (k, L), widths bits (k,) (wider than 4 bits first), grids (k, G); the count of 8-bit rows."""
    k, L = codes.shape
    k8 = sum(1 for b in bits if b > 4)
    if len(bits) != k or any(b > 4 for b in bits[k8:]):
        raise ValueError("rows wider than 4 bits must come first")
    G = n_groups(L, g)
    if scale.shape != (k, G) or offset.shape != (k, G):
        raise ValueError(f"grids of shape {tuple(scale.shape)}, expected {(k, G)}")
    return k8


def from_codes(codes: torch.Tensor, bits: list[int], scale: torch.Tensor, offset: torch.Tensor, g: int) -> LowBitRows:
    """LowBitRows of codes (k, L) uint8 with per-row widths bits (k,) (wider than 4 bits first) and
    grids scale, offset (k, G) (as the artifact stores them; held transposed)."""
    k8 = _split(codes, bits, scale, offset, g)
    return LowBitRows(codes.shape[1], g, pack8(codes[:k8]), pack4(codes[k8:]), scale.float().T.contiguous(),
                      offset.float().T.contiguous())


def cols_from_codes(codes: torch.Tensor, bits: list[int], scale: torch.Tensor, offset: torch.Tensor,
                    g: int) -> LowBitCols:
    """LowBitCols of the same arguments as `from_codes`."""
    k8 = _split(codes, bits, scale, offset, g)
    return LowBitCols(codes.shape[1], g, pack8(codes[:k8]), pack4(codes[k8:].T), scale.float().T.contiguous(),
                      offset.float().T.contiguous())


def codes_of(F: LowBitRows | LowBitCols) -> torch.Tensor:
    """The codes q (k, L) uint8 of F."""
    if isinstance(F, LowBitCols):
        return torch.cat([unpack8(F.q8, F.L), unpack4(F.q4, F.k - F.k8).T])
    return torch.cat([unpack8(F.q8, F.L), unpack4(F.q4, F.L)])


def flipped(F: LowBitRows | LowBitCols) -> LowBitRows | LowBitCols:
    """The same factor in the other layout (LowBitRows <-> LowBitCols)."""
    bits = [8] * F.k8 + [4] * (F.k - F.k8)  # only "wider than 4 bits or not" matters to the layout
    make = from_codes if isinstance(F, LowBitCols) else cols_from_codes
    return make(codes_of(F), bits, F.scale.T, F.offset.T, F.g)


def dequantize(F: LowBitRows | LowBitCols) -> torch.Tensor:
    """F (k, L) float32, equation (1) (the C kernels; `reference` where they are not built). For
    LowBitCols a transposed view of `dequantize_t`."""
    if isinstance(F, LowBitCols):
        return dequantize_t(F).T
    lib = native.lowbit()
    if lib is None:
        return reference(F)
    out = torch.empty(F.k, F.L)
    lib.lowbit_dequantize(F.k, F.L, *_args(F), out.data_ptr(), _threads(F.k * F.L))
    return out


def dequantize_t(F: LowBitCols) -> torch.Tensor:
    """F^T (L, k) float32, contiguous: what x F^T = x @ F^T multiplies by."""
    lib = native.lowbit()
    if lib is None:
        return reference(F).T.contiguous()
    out = torch.empty(F.L, F.k)
    lib.lowbit_dequantize_cols_t(F.k, F.L, *_args(F), out.data_ptr(), _threads(F.k * F.L))
    return out


def reference(F: LowBitRows | LowBitCols) -> torch.Tensor:
    """F (k, L) float32, equation (1), in torch (quant.grid's de-quantization of the codes)."""
    return grid.dequantize(codes_of(F), grid.expand_groups(F.scale.T, F.L, F.g), grid.expand_groups(F.offset.T, F.L, F.g))


def columns(F: LowBitRows, ids: torch.Tensor) -> torch.Tensor:
    """F[:, ids] (k, N) float32 for ids (N,) int64, reading only those entries."""
    r8, r4 = ids % 32, ids % 64
    c8 = F.q8[:, (ids // 32) * 32 + (r8 % 8) * 4 + r8 // 8]
    u = r4 // 8
    c4 = (F.q4[:, (ids // 64) * 32 + (r4 % 8) * 4 + u // 2] >> ((u % 2) * 4).to(torch.uint8)) & 15
    c = ids // F.g
    return F.offset.T[:, c] + F.scale.T[:, c] * torch.cat([c8, c4]).float()


def _check(x: torch.Tensor, L: int, what: str) -> None:
    """x must be a float32 CPU (M, L) matrix whose rows are contiguous (any row stride)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != L \
            or (L > 1 and x.stride(1) != 1):
        raise ValueError(f"{what}: expected a float32 CPU (M, {L}) tensor with contiguous rows, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}, strides {x.stride()}")


def _lib():
    lib = native.lowbit()
    if lib is None:
        raise RuntimeError(f"the low-bit kernels are not available: {native.why_not('lowbit')}")
    return lib


def _args(F: LowBitRows | LowBitCols) -> list:
    """(g, k8, q8, q4, scale, offset) as the kernels take them."""
    return [F.g, F.k8, F.q8.data_ptr(), F.q4.data_ptr(), F.scale.data_ptr(), F.offset.data_ptr()]


def rowdot(F: LowBitCols, x: torch.Tensor) -> torch.Tensor:
    """x F^T: x (M, L) float32 -> (M, k)."""
    if not isinstance(F, LowBitCols):
        raise TypeError("rowdot takes a factor by columns (LowBitCols)")
    _check(x, F.L, "x")
    t = torch.empty(x.shape[0], F.k)
    _lib().lowbit_rowdot(x.shape[0], F.k, F.L, F.g, x.data_ptr(), x.stride(0), *_args(F)[1:], t.data_ptr(),
                         _threads(F.k * F.L * x.shape[0]))
    return t


def axpy(F: LowBitRows, t: torch.Tensor, y: torch.Tensor) -> None:
    """y += t F in place: t (M, k), y (M, L) float32."""
    if not isinstance(F, LowBitRows):
        raise TypeError("axpy takes a factor by rows (LowBitRows)")
    t = t.float().contiguous()
    _check(y, F.L, "y")
    if t.shape != (y.shape[0], F.k):
        raise ValueError(f"t of shape {tuple(t.shape)}, expected {(y.shape[0], F.k)}")
    _lib().lowbit_axpy(y.shape[0], F.k, F.L, F.g, t.data_ptr(), *_args(F)[1:], y.data_ptr(), y.stride(0),
                       _threads(F.k * F.L * y.shape[0]))


DEQUANT_ROWS = 32  # from this many rows on, de-quantizing both factors + one sgemm is faster (docs/results/runtime.md)
PARALLEL_WORK = 1 << 20  # code entries x rows below which a call stays on one thread (a fork costs ~10 us)


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= PARALLEL_WORK else 1


class LowRankPair:
    """D^ = U^ V^ with V (k, n) as LowBitCols and U (k, m) = U^T as LowBitRows; `addmm(x, y)`: y += x D^T = (x V^T) U
    for x (M, n), y (M, m) float32 with contiguous rows. Holds the kernel's view of both factors.
    Below DEQUANT_ROWS rows the fused kernel reads the codes directly; from there on (prefill) the
    factors are de-quantized into temporaries for that call and multiplied by torch."""

    def __init__(self, V: LowBitCols, U: LowBitRows):
        if not (isinstance(V, LowBitCols) and isinstance(U, LowBitRows)):
            raise TypeError("LowRankPair takes V by columns (LowBitCols) and U^T by rows (LowBitRows)")
        if V.k != U.k:
            raise ValueError(f"ranks {V.k} and {U.k} do not match")
        self.V, self.U = V, U
        self._lib = _lib()
        self._pair = native.LowbitPair(V.k, V.L, U.L, V.g, V.k8, *_args(V)[2:], U.g, U.k8, *_args(U)[2:])
        self._ref = ctypes.byref(self._pair)
        self.ptr = ctypes.pointer(self._pair)
        self.entries = V.k * (V.L + U.L)  # code entries read per row of x

    def addmm(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not (x.dtype == y.dtype == torch.float32 and x.dim() == y.dim() == 2 and x.shape[0] == y.shape[0]
                and x.shape[1] == self.V.L and y.shape[1] == self.U.L and x.device.type == y.device.type == "cpu"
                and (x.stride(1) == 1 or self.V.L == 1) and (y.stride(1) == 1 or self.U.L == 1)):
            _check(x, self.V.L, "x")
            _check(y, self.U.L, "y")
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} have different numbers of rows")
        if x.shape[0] >= DEQUANT_ROWS:
            y.addmm_(x @ dequantize_t(self.V), dequantize(self.U))
            return
        self._lib.lowbit_lowrank(x.shape[0], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), self._ref,
                                 _threads(self.entries * x.shape[0]))


class RowJobs:
    """Several (pair, row0, rows) jobs for one module, prepared once: run(x, y) does, in one call of
    the kernels, y[row0:row0 + rows] += x[row0:row0 + rows] D^T for each pair. x (N, n), y (N, m)
    float32 contiguous; every job below DEQUANT_ROWS rows (the runtime builds them so)."""

    def __init__(self, jobs: list[tuple[LowRankPair, int, int]]):
        self.pairs = [p for p, _, _ in jobs]  # keeps the pairs (and their tensors) alive
        self.n = len(jobs)
        self.arr = (native.LowbitJob * self.n)(*[(p.ptr, r0, r) for p, r0, r in jobs])
        self.work = min(p.entries * r for p, _, r in jobs)
        self.lib = jobs[0][0]._lib
        self.shape = (max(r0 + r for _, r0, r in jobs), jobs[0][0].V.L, jobs[0][0].U.L)  # rows needed, n, m
        if any((p.V.L, p.U.L) != self.shape[1:] for p in self.pairs):
            raise ValueError("the jobs of one RowJobs must share the shapes of x and y")

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows, n, m = self.shape
        if not (x.dtype == y.dtype == torch.float32 and x.is_contiguous() and y.is_contiguous()
                and x.dim() == y.dim() == 2 and x.shape[0] == y.shape[0] >= rows and x.shape[1] == n and y.shape[1] == m):
            raise ValueError(f"RowJobs.run takes contiguous float32 x (>= {rows}, {n}) and y (same rows, {m}); "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        self.lib.lowbit_lowrank_many(self.n, self.arr, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                     _threads(self.work))


def addmm_rows(jobs: list[tuple[LowRankPair, int, int]], x: torch.Tensor, y: torch.Tensor) -> None:
    """RowJobs(jobs).run(x, y)."""
    RowJobs(jobs).run(x, y)


def lowrank(V: LowBitCols, U: LowBitRows, x: torch.Tensor, y: torch.Tensor) -> None:
    """y += (x V^T) U in place: V (k, n), U (k, m) (U^T of D^ = U^ V^), x (M, n), y (M, m) float32."""
    LowRankPair(V, U).addmm(x, y)


def available() -> bool:
    """Whether the kernels can run here (a C compiler built them, or they were cached)."""
    return native.lowbit() is not None

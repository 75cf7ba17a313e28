"""Low-bit factors held compactly in memory and multiplied without expanding them (CPU, float32).

A factor F (k, L), each row i quantized at its own width b_i with per-group grids along the row
(groups of g entries, G = ceil(L / g) per row):

    F[i, j] = offset[i, j // g] + scale[i, j // g] * q[i, j]                       (1)

is held as `LowBitRows`: rows with b_i > 4 as one byte per code (q8 (k8, L)), rows with b_i <= 4 as two
codes per byte (q4 (k - k8, G h), h = ceil(g / 2): byte t of group c holds code c g + t in its low nibble
and code c g + h + t in its high one), scale and offset (k, G) float32. The rows with b_i > 4 must come
first (the artifact's order: widest first). About 0.5-0.6 bytes per entry for ADAMIX's {2, 3, 4, 8}-bit
widths, against 4 for a float32 copy.

The products read the codes once per call through the C kernels of csrc/lowbit.c:
    rowdot(F, x)      = x F^T                (x (M, L) -> (M, k))
    axpy(F, t, y):      y += t F             (t (M, k), y (M, L))
    lowrank(V, U, x, y): y += (x V^T) U      for D^ = U^ V^ stored as V^ (k, n) and U^T (k, m)
`dequantize` is the float32 reference of (1).
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from . import native
from .quant.grid import n_groups


@dataclasses.dataclass(frozen=True)
class LowBitRows:
    """F (k, L) as in (1): q8 (k8, L) uint8, q4 (k - k8, G h) uint8, scale and offset (k, G) float32."""
    L: int
    g: int
    q8: torch.Tensor
    q4: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def k(self) -> int:
        return self.scale.shape[0]

    @property
    def k8(self) -> int:
        return self.q8.shape[0]

    @property
    def half(self) -> int:
        return (self.g + 1) // 2

    def tensors(self) -> list[torch.Tensor]:
        return [self.q8, self.q4, self.scale, self.offset]


def nibbles(codes: torch.Tensor, g: int) -> torch.Tensor:
    """Codes (k, L) uint8, all < 16 -> (k, G h) uint8, two per byte as in the module's docstring."""
    k, L = codes.shape
    G, h = n_groups(L, g), (g + 1) // 2
    q = torch.zeros(k, G * g, dtype=torch.uint8)
    q[:, :L] = codes
    q = q.view(k, G, g)
    if g % 2:
        q = torch.cat([q, q.new_zeros(k, G, 1)], dim=2)
    return (q[:, :, :h] | (q[:, :, h:] << 4)).reshape(k, G * h).contiguous()


def from_codes(codes: torch.Tensor, bits: list[int], scale: torch.Tensor, offset: torch.Tensor, g: int) -> LowBitRows:
    """LowBitRows of codes (k, L) uint8 with per-row widths bits (k,) (wider than 4 bits first) and
    grids scale, offset (k, G)."""
    k, L = codes.shape
    k8 = sum(1 for b in bits if b > 4)
    if len(bits) != k or any(b > 4 for b in bits[k8:]):
        raise ValueError("rows wider than 4 bits must come first")
    G = n_groups(L, g)
    if scale.shape != (k, G) or offset.shape != (k, G):
        raise ValueError(f"grids of shape {tuple(scale.shape)}, expected {(k, G)}")
    return LowBitRows(L, g, codes[:k8].clone(), nibbles(codes[k8:], g),  # clone: no view of all the codes
                      scale.float().clone(), offset.float().clone())


def codes_of(F: LowBitRows) -> torch.Tensor:
    """The codes q (k, L) uint8 of F (the inverse of the packing in `from_codes`)."""
    k4, G, h = F.q4.shape[0], n_groups(F.L, F.g), F.half
    q4 = F.q4.view(k4, G, h)
    both = torch.cat([q4 & 15, q4 >> 4], dim=2)[:, :, :F.g].reshape(k4, G * F.g)[:, :F.L]
    return torch.cat([F.q8, both])


def dequantize(F: LowBitRows) -> torch.Tensor:
    """F (k, L) float32, equation (1) (the C kernel; `reference` where the kernels are not built)."""
    lib = native.lowbit()
    if lib is None:
        return reference(F)
    out = torch.empty(F.k, F.L)
    lib.lowbit_dequantize(F.k, F.L, *_args(F), out.data_ptr(), torch.get_num_threads())
    return out


def reference(F: LowBitRows) -> torch.Tensor:
    """F (k, L) float32, equation (1), in torch."""
    def per_entry(p):
        return p.repeat_interleave(F.g, dim=1)[:, :F.L]
    return per_entry(F.offset) + per_entry(F.scale) * codes_of(F).float()


def columns(F: LowBitRows, ids: torch.Tensor) -> torch.Tensor:
    """F[:, ids] (k, N) float32 for ids (N,) int64, reading only those entries."""
    c, r = ids // F.g, ids % F.g
    h = F.half
    byte = c * h + r % h
    q4 = (F.q4[:, byte] >> ((r >= h).to(torch.uint8) * 4)) & 15
    q = torch.cat([F.q8[:, ids], q4])
    return F.offset[:, c] + F.scale[:, c] * q.float()


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


def _args(F: LowBitRows) -> list:
    """(g, k8, q8, q4, scale, offset) as the kernels take them."""
    return [F.g, F.k8, F.q8.data_ptr(), F.q4.data_ptr(), F.scale.data_ptr(), F.offset.data_ptr()]


def rowdot(F: LowBitRows, x: torch.Tensor) -> torch.Tensor:
    """x F^T: x (M, L) float32 -> (M, k)."""
    _check(x, F.L, "x")
    t = torch.empty(x.shape[0], F.k)
    _lib().lowbit_rowdot(x.shape[0], F.k, F.L, F.g, x.data_ptr(), x.stride(0), *_args(F)[1:], t.data_ptr(),
                         torch.get_num_threads())
    return t


def axpy(F: LowBitRows, t: torch.Tensor, y: torch.Tensor) -> None:
    """y += t F in place: t (M, k), y (M, L) float32."""
    t = t.float().contiguous()
    _check(y, F.L, "y")
    if t.shape != (y.shape[0], F.k):
        raise ValueError(f"t of shape {tuple(t.shape)}, expected {(y.shape[0], F.k)}")
    _lib().lowbit_axpy(y.shape[0], F.k, F.L, F.g, t.data_ptr(), *_args(F)[1:], y.data_ptr(), y.stride(0),
                       torch.get_num_threads())


DEQUANT_ROWS = 12  # from this many rows on, de-quantizing both factors and one sgemm is faster (benchmarks/)


class LowRankPair:
    """D^ = U^ V^ with V (k, n) and U (k, m) = U^T as LowBitRows; `addmm(x, y)`: y += x D^T = (x V^T) U
    for x (M, n), y (M, m) float32 with contiguous rows. Holds the kernel's view of both factors.
    Below DEQUANT_ROWS rows the fused kernel reads the codes directly; from there on (prefill) the
    factors are de-quantized into temporaries for that call and multiplied by torch."""

    def __init__(self, V: LowBitRows, U: LowBitRows):
        if V.k != U.k:
            raise ValueError(f"ranks {V.k} and {U.k} do not match")
        self.V, self.U = V, U
        self._lib = _lib()
        self._pair = native.LowbitPair(V.k, V.L, U.L, V.g, V.k8, *_args(V)[2:], U.g, U.k8, *_args(U)[2:])
        self._ref = ctypes.byref(self._pair)
        self.ptr = ctypes.pointer(self._pair)

    def addmm(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not (x.dtype == y.dtype == torch.float32 and x.dim() == y.dim() == 2 and x.shape[0] == y.shape[0]
                and x.shape[1] == self.V.L and y.shape[1] == self.U.L and x.device.type == y.device.type == "cpu"
                and (x.stride(1) == 1 or self.V.L == 1) and (y.stride(1) == 1 or self.U.L == 1)):
            _check(x, self.V.L, "x")
            _check(y, self.U.L, "y")
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} have different numbers of rows")
        if x.shape[0] >= DEQUANT_ROWS:
            y.addmm_(x @ dequantize(self.V).T, dequantize(self.U))
            return
        self._lib.lowbit_lowrank(x.shape[0], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), self._ref,
                                 torch.get_num_threads())


def addmm_rows(jobs: list[tuple[LowRankPair, int, int]], x: torch.Tensor, y: torch.Tensor) -> None:
    """For each (pair, row0, rows): y[row0:row0 + rows] += x[row0:row0 + rows] D^T of that pair, in one
    call of the kernels (the tenants of one module). x (N, n), y (N, m) float32 contiguous; every job
    below DEQUANT_ROWS rows and inside 0..N-1 (not checked: the runtime builds them)."""
    if not (x.dtype == y.dtype == torch.float32 and x.is_contiguous() and y.is_contiguous() and x.dim() == y.dim() == 2):
        raise ValueError("addmm_rows takes contiguous float32 matrices")
    arr = (native.LowbitJob * len(jobs))(*[(p.ptr, r0, r) for p, r0, r in jobs])
    jobs[0][0]._lib.lowbit_lowrank_many(len(jobs), arr, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                        torch.get_num_threads())


def lowrank(V: LowBitRows, U: LowBitRows, x: torch.Tensor, y: torch.Tensor) -> None:
    """y += (x V^T) U in place: V (k, n), U (k, m) (U^T of D^ = U^ V^), x (M, n), y (M, m) float32."""
    LowRankPair(V, U).addmm(x, y)


def available() -> bool:
    """Whether the kernels can run here (a C compiler built them, or they were cached)."""
    return native.lowbit() is not None

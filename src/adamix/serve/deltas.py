"""What one tenant holds for one weight of the base: its delta D (m, n) in the form that serves it
fastest, with the operations the wrapped modules need (serve.modules).

  LowBitDelta        low-bit factors held as their codes, multiplied by the C kernels (kernels.lowbit)
  LowRankDelta       factors de-quantized once (any dtype or device)
  PackedLowRankDelta the stored bytes, de-quantized on every call (least memory)
  RowDelta           a delta that is zero outside a few rows (embedding rows of the tokens seen)
  SumDelta           a kind stored as parts (methods.kinds.register_parts), each held in its own form
  DenseDelta         anything else, as a dense matrix
`matrix_delta` picks the form for one tensor of an artifact; `resolve_factors` the factor mode.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..io.artifact import Artifact
from ..methods.kinds import decode, low_rank_factors, parts, quantized_factors
from ..methods.rows import nonzero_rows
from .kernels import lowbit, native


class MatrixDelta:
    """D (m, n) of one weight, in some orientation. Operations, for x (N, n) and y (N, m):
    `add_linear(y, x)`: y += x D^T in place;  `rows(ids)`: D[ids] (ids any shape -> (*ids.shape, n));
    `t()`: the same delta transposed;  `tensors()`: what is held (for memory accounting)."""

    shape: tuple[int, int]

    def add_linear(self, y: torch.Tensor, x: torch.Tensor) -> None:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t(self) -> "MatrixDelta":
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class LowRankDelta(MatrixDelta):
    """D = U V, U (m, k), V (k, n), held as V^T (n, k) and U^T (k, m), each contiguous: the plain
    row-major product y += (x V^T) U^T reads them in order (faster on CPU than U and V with
    transposed views). 2 k (m + n) flops per row, k (m + n) numbers held."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor):
        self.Vt, self.Ut = V.T.contiguous(), U.T.contiguous()
        self.shape = (U.shape[0], V.shape[1])

    def factors_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V^T (n, k), U^T (k, m))."""
        return self.Vt, self.Ut

    def add_linear(self, y, x):
        Vt, Ut = self.factors_t()
        y.addmm_(x @ Vt, Ut)

    def rows(self, ids):
        Vt, Ut = self.factors_t()
        return Ut.T[ids] @ Vt.T

    def t(self):
        Vt, Ut = self.factors_t()
        return LowRankDelta(Vt, Ut)  # D^T = V^T U^T

    def dense(self):
        Vt, Ut = self.factors_t()
        return Ut.T @ Vt.T

    def tensors(self):
        return [self.Vt, self.Ut]


class PackedLowRankDelta(LowRankDelta):
    """Like LowRankDelta, but holds the stored low-bit tensors and de-quantizes them on every call
    (memory = the artifact's bytes for this tensor; time = one unpack per module call). Kept for
    measurement (benchmarks/runtime_throughput.py) and for memory-starved use; see docs/serving.md."""

    def __init__(self, kind: str, shape: tuple[int, int], meta: dict, stored: dict[str, torch.Tensor],
                 transpose: bool, dtype: torch.dtype):
        self.kind, self.eshape, self.meta, self.stored = kind, shape, meta, stored
        self.transpose, self.dtype = transpose, dtype
        self.shape = shape[::-1] if transpose else shape

    def factors_t(self):
        U, V = low_rank_factors(self.kind, self.eshape, self.meta, self.stored)
        U, V = U.to(self.dtype), V.to(self.dtype)
        # transposed: the delta is (U V)^T = V^T U^T, whose (V^T, U^T) pair is (U, V)
        return (U, V) if self.transpose else (V.T, U.T)

    def t(self):
        return PackedLowRankDelta(self.kind, self.eshape, self.meta, self.stored, not self.transpose, self.dtype)

    def tensors(self):
        return list(self.stored.values())


class LowBitDelta(MatrixDelta):
    """D = U V held as its stored codes and multiplied by the C kernels of csrc/lowbit.c, which read
    each code once per call: y += (x V^T) U with no float copy of the factors. V (k, n) is held by
    columns, U^T (k, m) by rows (kernels.lowbit.LowBitCols / LowBitRows: 4-bit codes two per byte,
    8-bit codes one per byte, float32 grids per group): under a byte per factor entry held, against 4
    for LowRankDelta. Float32 on CPU."""

    def __init__(self, V: "lowbit.LowBitCols", Ut: "lowbit.LowBitRows"):
        self.V, self.Ut = V, Ut
        self.shape = (Ut.L, V.L)
        self.pair = lowbit.LowRankPair(V, Ut)

    def add_linear(self, y, x):
        self.pair.addmm(x if x.is_contiguous() else x.contiguous(), y)

    def rows(self, ids):
        # D[ids] = U[ids] V: the looked-up columns of U^T, times V de-quantized for this call (an
        # embedding lookup happens once per forward pass, its V is small: k x hidden)
        return (lowbit.columns(self.Ut, ids.reshape(-1)).T @ lowbit.dequantize(self.V)).view(*ids.shape, self.shape[1])

    def t(self):
        # D^T = V^T U^T: the factors swap sides, each re-laid out for its new side
        return LowBitDelta(lowbit.flipped(self.Ut), lowbit.flipped(self.V))

    def dense(self):
        return lowbit.dequantize(self.Ut).T @ lowbit.dequantize(self.V)

    def tensors(self):
        return self.V.tensors() + self.Ut.tensors()


class RowDelta(MatrixDelta):
    """D (m, n) that is zero outside rows idx: held as idx (r,) sorted int64 and R (r, n).
    add_linear: y[:, idx] += x R^T;  rows(ids): R at the positions of ids found in idx, 0 elsewhere."""

    def __init__(self, shape: tuple[int, int], idx: torch.Tensor, R: torch.Tensor):
        order = torch.argsort(idx)
        self.shape, self.idx, self.R = tuple(shape), idx[order].long().contiguous(), R[order].contiguous()

    def add_linear(self, y, x):
        if self.idx.numel():
            y.index_add_(1, self.idx, x @ self.R.T)

    def rows(self, ids):
        out = ids.new_zeros(()).to(self.R.dtype).expand(*ids.shape, self.shape[1]).clone()
        if not self.idx.numel():
            return out
        pos = torch.searchsorted(self.idx, ids).clamp_(max=self.idx.numel() - 1)
        hit = self.idx[pos] == ids
        out[hit] = self.R[pos[hit]]
        return out

    def t(self):
        return ColumnDelta(self.shape[::-1], self.idx, self.R.T)

    def dense(self):
        D = self.R.new_zeros(self.shape)
        D[self.idx] = self.R
        return D

    def tensors(self):
        return [self.idx, self.R]


class ColumnDelta(MatrixDelta):
    """D (m, n) that is zero outside columns idx: held as idx (c,) sorted int64 and C (m, c), the
    transpose of a RowDelta (a row-sparse delta of a Conv1D weight, stored transposed).
    add_linear: y += x[:, idx] C^T;  rows(ids): zeros (*ids.shape, n) with C[ids] in the columns idx."""

    def __init__(self, shape: tuple[int, int], idx: torch.Tensor, C: torch.Tensor):
        order = torch.argsort(idx)
        self.shape, self.idx, self.C = tuple(shape), idx[order].long().contiguous(), C[:, order].contiguous()

    def add_linear(self, y, x):
        if self.idx.numel():
            y.addmm_(x.index_select(1, self.idx), self.C.T)

    def rows(self, ids):
        out = self.C.new_zeros(*ids.shape, self.shape[1])
        out[..., self.idx] = self.C[ids]
        return out

    def t(self):
        return RowDelta(self.shape[::-1], self.idx, self.C.T)

    def dense(self):
        D = self.C.new_zeros(self.shape)
        D[:, self.idx] = self.C
        return D

    def tensors(self):
        return [self.idx, self.C]


class DenseDelta(MatrixDelta):
    """D (m, n) held as is: m n numbers (the fallback for kinds without factors or sparse rows)."""

    def __init__(self, D: torch.Tensor):
        self.D = D.contiguous()
        self.shape = tuple(D.shape)

    def add_linear(self, y, x):
        y.addmm_(x, self.D.T)

    def rows(self, ids):
        return self.D[ids]

    def t(self):
        return DenseDelta(self.D.T)

    def dense(self):
        return self.D

    def tensors(self):
        return [self.D]


class SumDelta(MatrixDelta):
    """D = sum of the parts' deltas (each a MatrixDelta of the same shape)."""

    def __init__(self, parts: list[MatrixDelta]):
        self.parts = parts
        self.shape = parts[0].shape

    def add_linear(self, y, x):
        for p in self.parts:
            p.add_linear(y, x)

    def rows(self, ids):
        out = self.parts[0].rows(ids)
        for p in self.parts[1:]:
            out = out + p.rows(ids)
        return out

    def t(self):
        return SumDelta([p.t() for p in self.parts])

    def dense(self):
        D = self.parts[0].dense().clone()
        for p in self.parts[1:]:
            D += p.dense()
        return D

    def tensors(self):
        return [t for p in self.parts for t in p.tensors()]


def dense_to_delta(D: torch.Tensor) -> MatrixDelta:
    """A dense D^ (m, n) as RowDelta when few of its rows are non-zero (methods.rows.nonzero_rows)."""
    nz = nonzero_rows(D)
    return DenseDelta(D) if nz is None else RowDelta(tuple(D.shape), nz, D[nz])


FACTOR_MODES = ("auto", "codes", "float", "packed")


def matrix_delta(art: Artifact, name: str, dtype: torch.dtype, device: torch.device | str,
                 factors: str = "float") -> MatrixDelta:
    """The delta of 2-D tensor `name` in the model's own orientation (the shape in the manifest).

    Kinds with low-rank factors (methods.kinds.register_factors), by `factors`:
      "codes": LowBitDelta for kinds whose factors are codes on grids (register_quantized_factors;
               float32 CPU), else as "float";  "float": LowRankDelta (de-quantized once);
      "packed": PackedLowRankDelta (the stored bytes, de-quantized on every call).
    Kinds stored as parts (methods.kinds.register_parts) -> SumDelta of each part's form.
    Other kinds -> RowDelta / DenseDelta of Artifact.delta(name).
    """
    e = art.entries[name]
    shape = tuple(e["shape"])
    transposed = bool(e.get("transposed"))
    eshape = shape[::-1] if transposed else shape  # the orientation the method saw
    held = kind_delta(e["kind"], eshape, e.get("meta", {}), art.tensors(name), transposed, dtype, device, factors)
    return held if held is not None else dense_to_delta(art.delta(name).to(device=device, dtype=dtype))


def kind_delta(kind: str, eshape: tuple[int, int], meta: dict, stored: dict[str, torch.Tensor], transposed: bool,
               dtype: torch.dtype, device: torch.device | str, factors: str,
               whole: bool = False) -> MatrixDelta | None:
    """matrix_delta's form of one stored entry of `kind` (eshape: the orientation the method saw), or
    None for a kind without factors or parts (the caller decodes it); whole: decode such a kind here."""
    split = parts(kind, eshape, meta, stored)
    if split is not None:
        return SumDelta([kind_delta(k, eshape, m, t, transposed, dtype, device, factors, whole=True) for k, m, t in split])
    if factors == "codes":
        q = quantized_factors(kind, eshape, meta, stored)
        if q is not None:
            V, U = (q.V, q.gv), (q.U, q.gu)
            inp, out = (U, V) if transposed else (V, U)  # transposed: D^T = V^T U^T, the sides swap
            return LowBitDelta(lowbit.cols_from_codes(inp[0]["codes"], q.bits, inp[0]["scale"], inp[0]["offset"], inp[1]),
                               lowbit.from_codes(out[0]["codes"], q.bits, out[0]["scale"], out[0]["offset"], out[1]))
    f = low_rank_factors(kind, eshape, meta, stored)
    if f is not None and factors == "packed":
        return PackedLowRankDelta(kind, eshape, meta, {k: v.to(device) for k, v in stored.items()}, transposed, dtype)
    if f is not None:
        U, V = (t.to(device=device, dtype=dtype) for t in f)
        return LowRankDelta(V.T, U.T) if transposed else LowRankDelta(U, V)
    if not whole:
        return None
    D = decode(kind, eshape, meta, stored)
    return dense_to_delta((D.T if transposed else D).to(device=device, dtype=dtype))


def resolve_factors(factors: str, dtype: torch.dtype, device: torch.device) -> str:
    """The factor mode to use: "auto" is "codes" where the low-bit kernels run (float32 on CPU, a C
    compiler found), else "float". "codes" elsewhere is refused."""
    if factors not in FACTOR_MODES:
        raise AdamixError(f"factors={factors!r}: expected one of {', '.join(FACTOR_MODES)}")
    if factors in ("auto", "codes"):
        fits = dtype == torch.float32 and device.type == "cpu"
        if fits and lowbit.available():
            return "codes"
        if factors == "codes":
            why = ("they run on float32 CPU models only" if not fits
                   else f"they could not be built: {native.why_not('lowbit')}")
            raise AdamixError(f"factors='codes': the low-bit kernels cannot be used ({why}); use factors='float'")
        return "float"
    return factors

"""Serve many fine-tunes from one base model without merging them.

One base model sits in memory; any number of delta artifacts are attached beside it by name. Every
row of a batch names its tenant (or "base"), and one forward pass answers all rows, each with its
own fine-tune. For a linear layer y = W x + b of the base and a row x routed to tenant t whose
artifact stores the delta of W as low-rank factors (D^ = U^ V^, U^ (m, k) with the singular values
folded in, V^ (k, n)) the layer computes

    y = W x + U^ (V^ x) + db_t                                            (1)

which equals (W + D^) x + (b + db_t), the merged fine-tune's layer, to float rounding. The base
weights are shared by all tenants; a tenant costs its factors, k (m + n) numbers per matrix.

What each stored tensor becomes (per tenant, per parameter of the base):
  * kinds registered with `methods.base.register_factors` (svd-mixed, ...): applied as in (1); for
    an embedding the looked-up rows are U^[ids] V^. By default (float32 on CPU) the codes of the
    quantized kinds are held as they are, two 4-bit codes per byte, and multiplied by the C kernels of
    `adamix.lowbit`, which read every code once per call (LowBitDelta, about 1.4x the artifact's
    bytes); otherwise (GPU, other dtypes, no C compiler, or factors="float") the factors are
    de-quantized once at `attach` into the model's dtype (LowRankDelta, 4 bytes per entry in float32).
  * any other kind (rows, raw, future kinds such as bitdelta): the dense D^ (`Artifact.delta`).
    A matrix whose non-zero rows are at most half of its rows (the `rows` kind: embedding rows of
    the tokens the fine-tune saw; a row-sparse LM head) is held as those rows only, idx (r,) and
    R (r, n): an embedding replaces/adds its rows, a linear layer adds x R^T to the outputs idx.
    Other matrices are held dense: m n numbers per tenant, a dense copy of that weight.
  * 1-D deltas of a linear layer's bias: added to the rows of the tenant (db in (1)).
  * every other parameter (norm weights and biases, ...): the tenant's merged parameter
    W + D^ is held (a copy of that small tensor), and the module is run once more on the tenant's
    rows with it swapped in.
Tied parameters (an embedding shared with the LM head) are stored once in the artifact and held
once here; both modules apply the same delta.

Mixed batches: rows are grouped by tenant; each module runs the base once over the whole batch and
then each tenant's update on its own rows only (contiguous row slices when the rows of a tenant are
adjacent, index_select / index_add otherwise; `generate` sorts the batch by tenant and restores the
order of the results). The routing is global state of the model object: one request batch at a
time, not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .artifact import Artifact
from .checkpoint import Checkpoint
from .errors import AdamixError
from .models import config_and_class
from . import lowbit, native
from .methods.base import low_rank_factors, quantized_factors
from .vocab import refuse_new_rows

BASE = "base"  # the tenant name of rows answered by the plain base model
ROW_SPARSE_MAX_FRACTION = 0.5  # dense deltas with at most this fraction of non-zero rows are held as rows


# ---------------------------------------------------------------------------------------------
# Per-tenant deltas of one weight: pure tensor operations
# ---------------------------------------------------------------------------------------------

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
    row-major product y += (x V^T) U^T reads them in order (10-20% faster on CPU than U and V with
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
    measurement (benchmarks/runtime_throughput.py) and for memory-starved use; see README."""

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
    columns, U^T (k, m) by rows (adamix.lowbit.LowBitCols / LowBitRows: 4-bit codes two per byte,
    8-bit codes one per byte, float32 grids per group). About 0.6 bytes per factor entry held,
    against 4 for LowRankDelta. Float32 on CPU."""

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
        return DenseDelta(self.dense().T)

    def dense(self):
        D = self.R.new_zeros(self.shape)
        D[self.idx] = self.R
        return D

    def tensors(self):
        return [self.idx, self.R]


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


def dense_to_delta(D: torch.Tensor) -> MatrixDelta:
    """A dense D^ (m, n) as RowDelta when at most ROW_SPARSE_MAX_FRACTION of its rows are non-zero."""
    nz = torch.nonzero(D.ne(0).any(dim=1)).flatten()
    if nz.numel() <= ROW_SPARSE_MAX_FRACTION * D.shape[0]:
        return RowDelta(tuple(D.shape), nz, D[nz])
    return DenseDelta(D)


FACTOR_MODES = ("auto", "codes", "float", "packed")


def matrix_delta(art: Artifact, name: str, dtype: torch.dtype, device: torch.device | str,
                 factors: str = "float") -> MatrixDelta:
    """The delta of 2-D tensor `name` in the model's own orientation (the shape in the manifest).

    Kinds with low-rank factors (methods.base.register_factors), by `factors`:
      "codes": LowBitDelta for kinds whose factors are codes on grids (register_quantized_factors;
               float32 CPU), else as "float";  "float": LowRankDelta (de-quantized once);
      "packed": PackedLowRankDelta (the stored bytes, de-quantized on every call).
    Other kinds -> RowDelta / DenseDelta of Artifact.delta(name).
    """
    e = art.entries[name]
    shape = tuple(e["shape"])
    transposed = bool(e.get("transposed"))
    eshape = shape[::-1] if transposed else shape  # the orientation the method saw
    meta, stored = e.get("meta", {}), art.tensors(name)
    if factors == "codes":
        q = quantized_factors(e["kind"], eshape, meta, stored)
        if q is not None:
            V, U = (q.V, q.gv), (q.U, q.gu)
            inp, out = (U, V) if transposed else (V, U)  # transposed: D^T = V^T U^T, the sides swap
            return LowBitDelta(lowbit.cols_from_codes(inp[0]["codes"], q.bits, inp[0]["scale"], inp[0]["offset"], inp[1]),
                               lowbit.from_codes(out[0]["codes"], q.bits, out[0]["scale"], out[0]["offset"], out[1]))
    f = low_rank_factors(e["kind"], eshape, meta, stored)
    if f is not None and factors == "packed":
        return PackedLowRankDelta(e["kind"], eshape, meta, {k: v.to(device) for k, v in stored.items()}, transposed, dtype)
    if f is not None:
        U, V = (t.to(device=device, dtype=dtype) for t in f)
        return LowRankDelta(V.T, U.T) if transposed else LowRankDelta(U, V)
    return dense_to_delta(art.delta(name).to(device=device, dtype=dtype))


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


# ---------------------------------------------------------------------------------------------
# Routing: which rows of the batch belong to which tenant
# ---------------------------------------------------------------------------------------------

class Router:
    """The per-row tenant names of the batch being run, grouped once per batch size.

    groups(b) -> [(tenant, rows)], rows a slice when the tenant's rows are adjacent, else an int64
    index. A module seeing b = r * B rows (generate with num_return_sequences / beams repeats
    every row r times in place) gets the names repeated r times each. "base" rows are left out.
    """

    def __init__(self):
        self.names: list[str] | None = None
        self.key: tuple | None = None  # the names as a tuple: modules key what they prepare per batch on it
        self._groups: dict[tuple[int, str], list] = {}

    def set(self, names: list[str] | None) -> None:
        self.names, self._groups = names, {}
        self.key = tuple(names) if names else None

    def groups(self, b: int, device: torch.device) -> list[tuple[str, slice | torch.Tensor]]:
        names = self.names
        if not names:
            return []
        key = (b, str(device))
        if key in self._groups:
            return self._groups[key]
        B = len(names)
        if b % B:
            raise AdamixError(f"a module got {b} rows but the batch has {B} (one tenant name per row is needed)")
        rep = b // B
        rows_of: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n != BASE:
                rows_of.setdefault(n, []).extend(range(i * rep, (i + 1) * rep))
        out = []
        for n, rows in rows_of.items():
            if rows[-1] - rows[0] + 1 == len(rows):
                out.append((n, slice(rows[0], rows[-1] + 1)))
            else:
                out.append((n, torch.tensor(rows, dtype=torch.long, device=device)))
        self._groups[key] = out
        return out


# ---------------------------------------------------------------------------------------------
# Modules that wrap a base module and add each tenant's delta on its rows
# ---------------------------------------------------------------------------------------------

class TenantModule(nn.Module):
    """Wraps one module of the base (kept as `self.base`, its parameters shared, not copied).
    Attribute reads it lacks go to the base module (weight, in_features, ...)."""

    def __init__(self, base: nn.Module, router: Router):
        super().__init__()
        self.base = base
        self.router = router  # plain attribute: not a module
        self.deltas: dict[str, object] = {}
        self._prepared: dict = {}  # per batch layout (router.key, rows, ...): what forward() set up for it

    def changed(self) -> None:
        """Tenants were attached or detached: drop what was prepared for earlier batches."""
        self._prepared.clear()

    def prepared(self, key, build):
        """build() once per key (a few batch layouts kept)."""
        got = self._prepared.get(key)
        if got is None:
            if len(self._prepared) >= 8:
                self._prepared.clear()
            got = self._prepared[key] = build()
        return got

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def active(self, b: int, device: torch.device) -> list:
        if not self.deltas:
            return []
        return [(t, rows) for t, rows in self.router.groups(b, device) if t in self.deltas]


def _rows_view_2d(y: torch.Tensor, rows: slice) -> torch.Tensor:
    """y[rows] of a contiguous (b, ..., m) tensor as a 2-D (N, m) view (in-place updates land in y)."""
    return y[rows].view(-1, y.shape[-1])


class TenantLinear(TenantModule):
    """nn.Linear or GPT-2's Conv1D: y = base(x); rows of tenant t: y += x D_t^T + db_t (equation (1)).
    deltas[t] = (MatrixDelta in the (out, in) orientation or None, bias delta (out,) or None)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.active(x.shape[0], x.device)
        if not groups:
            return y
        if not y.is_contiguous():
            y = y.contiguous()
        n, m = x.shape[-1], y.shape[-1]
        if x.is_contiguous() and y.dtype == torch.float32:
            groups = self._fused(groups, x, y)
        for t, rows in groups:
            D, db = self.deltas[t]
            if isinstance(rows, slice):
                ys = _rows_view_2d(y, rows)
                if D is not None:
                    D.add_linear(ys, x[rows].reshape(-1, n))
                if db is not None:
                    ys += db
            else:
                xs = x.index_select(0, rows)
                upd = torch.zeros(xs.shape[:-1] + (m,), dtype=y.dtype, device=y.device)
                if D is not None:
                    D.add_linear(upd.view(-1, m), xs.reshape(-1, n))
                if db is not None:
                    upd += db
                y.index_add_(0, rows, upd)
        return y

    def _fused(self, groups: list, x: torch.Tensor, y: torch.Tensor) -> list:
        """Apply the LowBitDelta tenants whose rows are a slice (and fewer than lowbit.DEQUANT_ROWS) in
        one call of the kernels; return the groups left to do."""
        per_row = x.numel() // (x.shape[0] * x.shape[-1])  # sequence positions per batch row

        def build():
            jobs, rest = [], []
            for t, rows in groups:
                D, db = self.deltas[t]
                if (isinstance(D, LowBitDelta) and db is None and isinstance(rows, slice)
                        and (rows.stop - rows.start) * per_row < lowbit.DEQUANT_ROWS):
                    jobs.append((D.pair, rows.start * per_row, (rows.stop - rows.start) * per_row))
                else:
                    rest.append((t, rows))
            return (lowbit.RowJobs(jobs) if jobs else None), rest

        jobs, rest = self.prepared(("fused", self.router.key, x.shape[0], per_row), build)
        if jobs is not None:
            jobs.run(x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return rest


class TenantEmbedding(TenantModule):
    """nn.Embedding: y = base(ids); rows of tenant t: y += D_t[ids] (D_t (num_embeddings, dim)).
    An ids tensor with batch dimension 1 (position ids shared by the batch) is expanded first."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        b = len(self.router.names) if self.router.names else ids.shape[0]
        groups = self.active(b if ids.shape[0] == 1 else ids.shape[0], ids.device)
        if not groups:
            return y
        if ids.shape[0] == 1 and b > 1:
            ids = ids.expand(b, *ids.shape[1:])
            y = y.expand(b, *y.shape[1:])
        y = y.contiguous()
        for t, rows in groups:
            D = self.deltas[t]
            if isinstance(rows, slice):
                y[rows] += D.rows(ids[rows])
            else:
                y.index_add_(0, rows, D.rows(ids.index_select(0, rows)))
        return y


class TenantParams(TenantModule):
    """Any other module (norms, ...). deltas[t] = {parameter name: t's merged tensor}.

    A module that is an elementwise affine function of its weight (and bias), y = C(x) + A(x) * w + b
    (LayerNorm, RMSNorm and their kin; checked once on a random input, `is_affine`), is run once more
    for the whole batch, with w = 1 and b = 0, to get A(x) (and once with w = 0 for C(x) where C is
    not zero); each tenant's rows then get y += A(x) * (w_t - w) + (b_t - b). Any other module is run
    again on each tenant's rows with t's merged parameters swapped in."""

    def __init__(self, base: nn.Module, router: Router):
        super().__init__(base, router)
        self._affine: tuple | None = None  # (unit params, zero params or None where C(x) = 0), or () if not affine

    def _run_with(self, params: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        own = self.base._parameters
        saved = {k: own[k] for k in params}
        try:
            own.update(params)
            return self.base(x, *args, **kwargs)
        finally:
            own.update(saved)

    def is_affine(self) -> bool:
        """Whether y = C(x) + A(x) * weight + bias for every weight and bias (same shapes), on a random
        input of shape (2, 3, *weight.shape) with random parameters, to float32 rounding."""
        if self._affine is None:
            self._affine = self._probe_affine()
        return bool(self._affine)

    def _probe_affine(self) -> tuple:
        own = {k: v for k, v in self.base._parameters.items() if v is not None}
        w = own.get("weight")
        if w is None or set(own) - {"weight", "bias"} or ("bias" in own and own["bias"].shape != w.shape):
            return ()
        gen = torch.Generator().manual_seed(0)

        def param(t):
            return nn.Parameter(t.to(device=w.device, dtype=w.dtype), requires_grad=False)

        zeros = {k: param(torch.zeros(v.shape)) for k, v in own.items()}
        unit = dict(zeros, weight=param(torch.ones(w.shape)))
        rand = {k: param(torch.randn(v.shape, generator=gen)) for k, v in own.items()}
        x = torch.randn((2, 3, *w.shape), generator=gen).to(device=w.device, dtype=w.dtype)
        try:
            with torch.no_grad():
                c0 = self._run_with(zeros, x)
                A = self._run_with(unit, x) - c0
                got = self._run_with(rand, x)
                want = c0 + A * rand["weight"] + (rand["bias"] if "bias" in rand else 0)
        except Exception:  # noqa: BLE001 - a module that cannot run on the probe is simply not affine
            return ()
        if got.shape != want.shape or not bool(torch.isfinite(got).all()):
            return ()
        tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 1e-2
        if float((got - want).abs().max()) > tol * max(float(got.abs().max()), 1e-30):
            return ()
        return unit, (None if not bool(c0.any()) else zeros)

    def _row_deltas(self, groups: list, b: int, ndim: int) -> tuple:
        """(w_t - w, b_t - b) of every row's tenant, zero on other rows, shaped (b, 1, ..., *w.shape) to
        broadcast against an output of ndim dimensions; None where no tenant changes that parameter."""
        own = self.base._parameters
        out = []
        for name in ("weight", "bias"):
            if not any(name in self.deltas[t] for t, _ in groups):
                out.append(None)
                continue
            p = own[name]
            full = torch.zeros((b,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            for t, rows in groups:
                if name in self.deltas[t]:
                    full[rows] = self.deltas[t][name] - p
            out.append(full.view((b,) + (1,) * (ndim - 1 - p.dim()) + tuple(p.shape)))
        return tuple(out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        b = x.shape[0]
        groups = self.active(b, x.device)
        if not groups:
            return y
        if not isinstance(y, torch.Tensor) or y.shape[0] != b:
            raise AdamixError(f"{type(self.base).__name__}: cannot route rows through a module whose output "
                              "is not a tensor with the batch first")
        y = y.contiguous()
        if self.is_affine():
            unit, zeros = self._affine
            A = self._run_with(unit, x, *args, **kwargs)
            if zeros is not None:
                A = A - self._run_with(zeros, x, *args, **kwargs)
            dw, db = self.prepared(("affine", self.router.key, b), lambda: self._row_deltas(groups, b, y.dim()))
            if dw is not None:
                y.addcmul_(A, dw)
            if db is not None:
                y += db
            return y
        for t, rows in groups:
            if isinstance(rows, slice):
                y[rows] = self._run_with(self.deltas[t], x[rows], *args, **kwargs)
            else:
                y.index_copy_(0, rows, self._run_with(self.deltas[t], x.index_select(0, rows), *args, **kwargs))
        return y


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


# ---------------------------------------------------------------------------------------------
# The multi-tenant model
# ---------------------------------------------------------------------------------------------

class Tenant:
    """What one attached artifact holds: its deltas per module path, and their bytes. The artifact's
    file is not kept open (its mapped pages would count in the process's memory): `path` and
    `manifest` say where it came from."""

    def __init__(self, name: str, artifact: Artifact, modules: dict[str, object], held_as: dict[str, str]):
        self.name, self.path, self.manifest, self.modules = name, artifact.path, artifact.manifest, modules
        self.held_as = held_as  # tensor name -> LowBitDelta / LowRankDelta / RowDelta / DenseDelta / bias / param

    def held_tensors(self) -> list[torch.Tensor]:
        out = []
        for payload in self.modules.values():
            if isinstance(payload, MatrixDelta):
                out += payload.tensors()
            elif isinstance(payload, tuple):
                for p in payload:
                    if isinstance(p, MatrixDelta):
                        out += p.tensors()
                    elif isinstance(p, torch.Tensor):
                        out.append(p)
            elif isinstance(payload, dict):
                out += list(payload.values())
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this tenant holds (each storage counted once: tied deltas are shared)."""
        seen, total = set(), 0
        for t in self.held_tensors():
            key = (t.untyped_storage().data_ptr(), t.device)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total


def model_class(folder: str | os.PathLike):
    """The transformers class of a model folder: config.architectures[0], else AutoModel."""
    import transformers
    return config_and_class(folder)[1] or transformers.AutoModel


def _load_model(folder: Path, dtype: torch.dtype, model_cls=None) -> nn.Module:
    model_cls = model_cls or model_class(folder)
    try:
        return model_cls.from_pretrained(folder, dtype=dtype).eval()
    except Exception as e:
        raise AdamixError(f"{folder}: transformers cannot load the base model ({e})") from None


class MultiTenantModel:
    """One base model and any number of attached deltas, answered row by row in one batch.

        mt = MultiTenantModel("base/")              # folder or .gguf; loads the HF model once
        mt.attach("alice", "delta-alice/")           # refuses an artifact made for another base
        mt.attach("bob", "delta-bob/")
        out = mt(**enc, tenants=["alice", "base", "bob"])       # one tenant name per row
        seq = mt.generate(**enc, tenants=[...], max_new_tokens=8)

    base: a model folder or .gguf file (its fingerprint is checked against every artifact).
    dtype: the base's compute dtype; de-quantized factors use it too. model_cls: a transformers class
    (default: config.architectures[0], else AutoModel). factors: how low-bit factors are held (see
    README, "Serving many fine-tunes"): "codes" (the codes, 4-bit ones two per byte, multiplied by
    the C kernels; float32 on CPU), "float" (de-quantized once), "packed" (the stored bytes,
    de-quantized on every call: least memory, slow); "auto" = "codes" where it runs, else "float".
    """

    def __init__(self, base: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 model_cls=None, factors: str = "auto"):
        self.dtype, self.device = dtype, torch.device(device)
        self.factors = resolve_factors(factors, dtype, self.device)
        self.checkpoint = Checkpoint(base)
        self.model = _load_model(self.checkpoint.folder, dtype, model_cls).to(device)
        self.router = Router()
        self.tenants: dict[str, Tenant] = {}
        self._fingerprint: str | None = None
        self._wrappers: dict[str, TenantModule] = {}
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        # every (module path, attribute) that holds each parameter object (tied weights: several)
        self._owners: dict[int, list[tuple[str, str]]] = {}
        for mpath, module in self.model.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is not None:
                    self._owners.setdefault(id(p), []).append((mpath, attr))

    # --- tenants ---------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.checkpoint.fingerprint()
        return self._fingerprint

    def _param_name(self, name: str) -> str:
        if name in self._params:
            return name
        prefix = getattr(self.model, "base_model_prefix", "")
        for alt in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if prefix and alt in self._params:
                return alt
        raise AdamixError(f"the delta changes tensor {name}, which the loaded base model has no parameter for")

    def attach(self, name: str, artifact: str | os.PathLike | Artifact) -> Tenant:
        """Load a delta artifact as tenant `name`. Nothing changes if anything is refused."""
        if not isinstance(name, str) or not name or name == BASE:
            raise AdamixError(f"tenant name {name!r} is not allowed ({BASE!r} is the plain base)")
        if name in self.tenants:
            raise AdamixError(f"tenant {name!r} is already attached (detach it first)")
        art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
        refuse_new_rows(art.entries, "the runtime")
        art.check_base(self.fingerprint)
        modules: dict[str, object] = {}
        notes: dict[str, str] = {}
        done: set[int] = set()
        for tname in sorted(art.entries):
            e = art.entries[tname]
            p = self._params[self._param_name(tname)]
            if id(p) in done:  # a tied alias stored twice: the parameter already has its delta
                continue
            done.add(id(p))
            if list(p.shape) != list(e["shape"]):
                raise AdamixError(f"tensor {tname}: base shape {list(p.shape)}, delta shape {e['shape']}")
            owners = self._owners[id(p)]
            mdelta = None
            for mpath, attr in owners:
                module = self._module(mpath)
                kind = self._role(module, attr, p)
                if kind in ("linear", "embedding") and mdelta is None:
                    mdelta = matrix_delta(art, tname, p.dtype, p.device, self.factors)
                if kind == "linear":
                    D = mdelta.t() if is_conv1d(module) else mdelta
                    w, b = modules.get(mpath, (None, None))
                    modules[mpath] = (D, b)
                elif kind == "bias":
                    w, b = modules.get(mpath, (None, None))
                    modules[mpath] = (w, art.delta(tname).to(device=p.device, dtype=p.dtype))
                elif kind == "embedding":
                    modules[mpath] = mdelta
                else:
                    merged = (p.detach().float() + art.delta(tname).to(p.device)).to(p.dtype)
                    modules.setdefault(mpath, {})[attr] = nn.Parameter(merged, requires_grad=False)
                notes[tname] = type(mdelta).__name__ if kind in ("linear", "embedding") else kind
        for mpath, payload in modules.items():
            w = self._wrap(mpath)
            w.deltas[name] = payload
            w.changed()
        tenant = Tenant(name, art, modules, notes)
        self.tenants[name] = tenant
        return tenant

    def detach(self, name: str) -> None:
        """Drop tenant `name`; modules no tenant changes any more are unwrapped."""
        if name not in self.tenants:
            raise AdamixError(f"no tenant {name!r} is attached")
        for mpath in self.tenants.pop(name).modules:
            w = self._wrappers[mpath]
            w.deltas.pop(name, None)
            w.changed()
            if not w.deltas:
                self._set_module(mpath, w.base)
                del self._wrappers[mpath]

    def tenant_nbytes(self, name: str) -> int:
        return self.tenants[name].nbytes

    # --- module surgery --------------------------------------------------------------------------

    def _module(self, mpath: str) -> nn.Module:
        if mpath in self._wrappers:
            return self._wrappers[mpath].base
        return self.model.get_submodule(mpath) if mpath else self.model

    @staticmethod
    def _role(module: nn.Module, attr: str, p: torch.Tensor) -> str:
        if isinstance(module, nn.Linear) or is_conv1d(module):
            return "linear" if attr == "weight" else "bias" if attr == "bias" and p.ndim == 1 else "param"
        if isinstance(module, nn.Embedding) and attr == "weight" and module.max_norm is None:
            return "embedding"
        return "param"

    def _set_module(self, mpath: str, new: nn.Module) -> None:
        parent, _, child = mpath.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    def _wrap(self, mpath: str) -> TenantModule:
        if mpath not in self._wrappers:
            if not mpath:
                raise AdamixError("the delta changes a parameter of the model's top module; cannot route it")
            base = self.model.get_submodule(mpath)
            if isinstance(base, nn.Linear) or is_conv1d(base):
                cls = TenantLinear
            elif isinstance(base, nn.Embedding) and base.max_norm is None:
                cls = TenantEmbedding
            else:
                cls = TenantParams
            self._wrappers[mpath] = cls(base, self.router)
            self._set_module(mpath, self._wrappers[mpath])
        return self._wrappers[mpath]

    # --- running ---------------------------------------------------------------------------------

    def _names(self, tenants: str | Sequence[str], batch: int) -> list[str]:
        names = [tenants] * batch if isinstance(tenants, str) else list(tenants)
        if len(names) != batch:
            raise AdamixError(f"{len(names)} tenant names for a batch of {batch} rows (one name per row)")
        unknown = sorted({n for n in names if n != BASE and n not in self.tenants})
        if unknown:
            raise AdamixError(f"no tenant {unknown[0]!r} is attached (attached: {sorted(self.tenants) or 'none'})")
        return names

    @contextlib.contextmanager
    def route(self, tenants: str | Sequence[str], batch: int | None = None):
        """Within the block, calls of `self.model` answer row i with tenant tenants[i]."""
        names = self._names(tenants, batch if batch is not None else (1 if isinstance(tenants, str) else len(tenants)))
        if self.router.names is not None:
            raise AdamixError("route() blocks cannot be nested")
        self.router.set(names)
        try:
            yield self.model
        finally:
            self.router.set(None)

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int:
        for v in list(args) + [kwargs.get(k) for k in ("input_ids", "inputs_embeds", "attention_mask")]:
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                return v.shape[0]
        raise AdamixError("cannot tell the batch size: pass input_ids (or inputs_embeds)")

    def __call__(self, *args, tenants: str | Sequence[str] = BASE, **kwargs):
        """The base model's forward with per-row tenants (rows of one tenant should be adjacent for
        speed; any order is answered correctly)."""
        B = self._batch_size(args, kwargs)
        with self.route(tenants, B), torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args, tenants: str | Sequence[str] = BASE, **kwargs):
        """The base model's `generate` with per-row tenants. The batch is sorted by tenant for the
        run (contiguous rows per tenant) and the results are returned in the caller's order."""
        B = self._batch_size(args, kwargs)
        names = self._names(tenants, B)
        first = {}
        for n in names:
            first.setdefault(n, len(first))
        order = sorted(range(B), key=lambda i: (first[names[i]], i))
        perm = torch.tensor(order, dtype=torch.long)
        inv = torch.argsort(perm)
        identity = order == list(range(B))

        def permute(v):
            if not identity and isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B:
                return v.index_select(0, perm.to(v.device))
            return v

        args = tuple(permute(a) for a in args)
        kwargs = {k: permute(v) for k, v in kwargs.items()}
        with self.route([names[i] for i in order], B), torch.no_grad():
            out = self.model.generate(*args, **kwargs)
        if identity:
            return out

        def unpermute(v):
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] % B == 0:
                r = v.shape[0] // B
                idx = (inv[:, None] * r + torch.arange(r)).flatten().to(v.device)
                return v.index_select(0, idx)
            if isinstance(v, tuple):
                return tuple(unpermute(x) for x in v)
            return v

        if isinstance(out, torch.Tensor):
            return unpermute(out)
        for k in ("sequences", "scores", "logits"):
            if getattr(out, k, None) is not None:
                setattr(out, k, unpermute(getattr(out, k)))
        return out


__all__ = ["MultiTenantModel", "Tenant", "LowRankDelta", "PackedLowRankDelta", "RowDelta", "DenseDelta",
           "matrix_delta", "model_class", "BASE"]

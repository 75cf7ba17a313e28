"""Modules that wrap a module of the base model and add each tenant's delta on that tenant's rows:
TenantLinear (nn.Linear, Conv1D), TenantEmbedding, TenantParams (norms and any other module)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdamixError
from .deltas import LowBitDelta
from .kernels import lowbit
from .routing import Router


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

"""The multi-tenant model: one base model serving many fine-tunes at once, without merging them.

One base model sits in memory; any number of delta artifacts are attached beside it by name. Every
row of a batch names its tenant (or "base"), and one forward pass answers all rows, each with its
own fine-tune. For a linear layer y = W x + b of the base and a row x routed to tenant t whose
artifact stores the delta of W as low-rank factors (D^ = U^ V^, U^ (m, k) with the singular values
folded in, V^ (k, n)) the layer computes

    y = W x + U^ (V^ x) + db_t                                            (1)

which equals (W + D^) x + (b + db_t), the merged fine-tune's layer, to float rounding. The base
weights are shared by all tenants; a tenant costs its factors, k (m + n) numbers per matrix.

What each stored tensor becomes (per tenant, per parameter of the base):
  * kinds registered with `methods.kinds.register_factors` (svd-mixed, ...): applied as in (1); for
    an embedding the looked-up rows are U^[ids] V^. By default (float32 on CPU) the codes of the
    quantized kinds are held as they are, two 4-bit codes per byte, and multiplied by the C kernels of
    `serve.kernels.lowbit`, which read every code once per call (LowBitDelta, a little more than the
    artifact's bytes); otherwise (GPU, other dtypes, no C compiler, or factors="float") the factors are
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

The pieces: serve.deltas (what a tenant holds per weight), serve.routing (rows to tenants),
serve.modules (the wrapped modules), this module (attaching artifacts, running the model).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import AdamixError
from ..io.artifact import Artifact
from ..io.checkpoint import Checkpoint
from ..io.hf import is_conv1d, is_linear, model_class, param_owners, resolve_name
from ..io.vocab import refuse_new_rows
from .deltas import MatrixDelta, matrix_delta, resolve_factors
from .modules import TenantEmbedding, TenantLinear, TenantModule, TenantParams
from .routing import BASE, Router

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
    docs/serving.md): "codes" (the codes, 4-bit ones two per byte, multiplied by
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
        self._owners = param_owners(self.model)  # tied weights: several (module path, attribute) per parameter

    # --- tenants ---------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.checkpoint.fingerprint()
        return self._fingerprint

    def _param_name(self, name: str) -> str:
        found = resolve_name(name, self._params, getattr(self.model, "base_model_prefix", "") or "")
        if found is not None:
            return found
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
        if is_linear(module):
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
            if is_linear(base):
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


__all__ = ["MultiTenantModel", "Tenant", "BASE"]

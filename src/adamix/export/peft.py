"""Export a delta artifact as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

For every weight whose kind stores low-rank factors (methods.kinds.register_factors: svd-mixed, ...)
D^ = U^ V^ (U^ (m, k) with the singular values folded in, V^ (k, n)) becomes a LoRA pair with
scaling 1:
    nn.Linear / GPT-2 Conv1D:  lora_B = U^ (out, k), lora_A = V^ (k, in)   (W' = W + B A)
    nn.Embedding (vocab, dim): lora_embedding_A = U^^T (k, vocab), lora_embedding_B = V^^T (dim, k)
The adapter's `r` and `lora_alpha` are the largest rank; modules of another rank k are listed in
`rank_pattern` and `alpha_pattern` with k, so that every module's scaling lora_alpha / r is 1
(`uniform_rank=True` instead pads every pair with zeros to the largest rank: no patterns, exact).
Modules whose factors have rank 0 are left out (their delta is zero).

Deltas that are not low-rank (1-D norm weights and biases, the `rows` and `raw` kinds, kinds
without factors such as bitdelta) are listed in `adamix_export.json` and, unless `lora_only`, kept
exactly with what PEFT offers:
  * the bias of a LoRA-targeted linear layer -> `lora_bias` (the delta is lora_B's bias);
  * an embedding whose delta touches at most half of its rows -> `trainable_token_indices`: the new
    rows (base + delta) of those tokens; a tied LM head follows the embedding;
  * anything else -> `modules_to_save`: the whole owning module with its merged parameters
    (W + D^), e.g. a norm; for a large matrix that is a dense copy of the weight.
PEFT does not allow `lora_bias` with LoRA on embeddings: when a bias needs it, embeddings with
factors are kept as trainable tokens or modules_to_save instead.
The export runs in phases, one function each: lora_pairs (which deltas are LoRA pairs), place_rest
(what becomes of the others), cap_ranks, choose_ranks, adapter_tensors, adapter_config and
export_summary.

With `max_rank=R` every pair of rank k > R keeps its R factor pairs of largest gain
(methods.kinds.pair_gains: for svd-mixed the share of the output error each kept triplet removes, as
the allocation predicted it at compress time), and the others' gains add to the predicted error:
    err_after = sqrt(err_predicted^2 + sum of the dropped gains)   (relative, activation-weighted).
The kept triplets' widths stay as the allocation chose them for rank k, so `compress --max-rank R`,
where the cap's freed bits widen the kept triplets and target correction refits U, does better.

With `lora_only=True` the adapter holds lora_A / lora_B only (what vLLM's multi-LoRA serving loads;
it rejects modules_to_save and LoRA biases): the other deltas are dropped and listed, so the adapter
is the fine-tune minus those deltas. A kind stored as parts (token rows beside a low-rank embedding,
methods.token_rows) then keeps its low-rank part as the LoRA pair and drops its rows (listed in
"parts_dropped"); without `lora_only` it is kept whole, like any delta that is not low-rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdamixError
from ..io.artifact import AtomicFolder, Artifact, prepare_output
from ..io.checkpoint import Checkpoint
from ..io.hf import is_conv1d, model_skeleton, param_owners
from ..io.vocab import refuse_new_rows
from ..methods.kinds import factor_rank, low_rank_factors, pair_gains, part_metas, parts
from ..methods.rows import nonzero_rows
from .vllm import VLLM_RANKS, export_dtype, slot_rank

PREFIX = "base_model.model."
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lora_entry(art: Artifact, name: str, low_rank_part: bool = False) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(kind, meta, stored tensors) that a LoRA pair of tensor `name` is made from: the entry itself,
    or with `low_rank_part` the low-rank part of a kind stored as parts (methods.kinds.parts: the
    token rows beside it are then left out)."""
    e = art.entries[name]
    shape = tuple(e["shape"])
    kind, meta, stored = e["kind"], e.get("meta", {}), art.tensors(name)
    split = parts(kind, shape[::-1] if e.get("transposed") else shape, meta, stored) if low_rank_part else None
    for part in split or ():
        if factor_rank(part[0], part[1]) is not None:
            return part
    return kind, meta, stored


def model_factors(art: Artifact, name: str, low_rank_part: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (m, k), V (k, n)) float32 with U V = D^ in the tensor's own (model) orientation, or None;
    low_rank_part: those of lora_entry's low-rank part."""
    e = art.entries[name]
    shape = tuple(e["shape"])
    transposed = bool(e.get("transposed"))
    kind, meta, stored = lora_entry(art, name, low_rank_part)
    f = low_rank_factors(kind, shape[::-1] if transposed else shape, meta, stored)
    if f is None:
        return None
    U, V = f
    return (V.T.contiguous(), U.T.contiguous()) if transposed else (U, V)


class Tree:
    """The base model's module tree (meta device): modules and parameters by name, and the owners
    (module path, attribute) of each parameter (several for tied weights)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self._owners = param_owners(model)

    def owners_of(self, name: str) -> list[tuple[str, str]]:
        if name not in self.params:
            raise AdamixError(f"the delta changes tensor {name}, which the base model has no parameter for")
        return self._owners[id(self.params[name])]


@dataclass
class Plan:
    """What the adapter holds. lora: module -> (role "linear" | "embedding", B-like (out, k), A-like
    (k, in)) with D^ = B A; lora_source: module -> tensor name; rest: tensors that are not LoRA pairs;
    bias_deltas: module -> bias delta (lora_bias); tokens: embedding module -> (tensor name, row
    indices) (trainable tokens); to_save: module -> tensor names (modules_to_save); dropped: tensors
    left out (lora_only)."""
    lora: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_source: dict[str, str] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    to_save: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    parts_dropped: list[str] = field(default_factory=list)


def lora_pairs(art: Artifact, tree: Tree, lora_only: bool = False) -> Plan:
    """Phase 1: every stored tensor of a Linear / Conv1D / Embedding weight whose kind has low-rank
    factors becomes a LoRA pair on each module that holds it; the others go to `rest`. lora_only: a
    kind stored as parts with a low-rank one (token rows beside a low-rank embedding) becomes the
    pair of that part, its other parts listed in `parts_dropped`; otherwise it is kept whole (rest)."""
    plan = Plan()
    for name in sorted(art.entries):
        e = art.entries[name]
        own = tree.owners_of(name)
        if list(tree.params[name].shape) != list(e["shape"]):
            raise AdamixError(f"tensor {name}: base shape {list(tree.params[name].shape)}, delta shape {e['shape']}")
        f = None
        if all(attr == "weight" and (isinstance(tree.modules[m], (nn.Linear, nn.Embedding)) or is_conv1d(tree.modules[m]))
               for m, attr in own) and len(e["shape"]) == 2:
            f = model_factors(art, name, low_rank_part=lora_only)
            if f is not None and lora_only and part_metas(e["kind"], e.get("meta", {})) is not None:
                plan.parts_dropped.append(name)
        if f is None:
            plan.rest.append(name)
            continue
        U, V = f  # D^ = U V in the model's orientation
        for mpath, _ in own:
            module = tree.modules[mpath]
            if isinstance(module, nn.Embedding):
                plan.lora[mpath] = ("embedding", U, V)
            elif is_conv1d(module):  # weight (in, out): the linear map is D^T = V^T U^T
                plan.lora[mpath] = ("linear", V.T.contiguous(), U.T.contiguous())
            else:
                plan.lora[mpath] = ("linear", U, V)
            plan.lora_source[mpath] = name
    return plan


def place_rest(art: Artifact, tree: Tree, plan: Plan, lora_only: bool) -> None:
    """Phase 2: what becomes of the deltas that are not LoRA pairs (module doc), in place in `plan`."""
    if lora_only:
        plan.dropped = list(plan.rest)
        return
    lora, rest = plan.lora, plan.rest
    for name in rest:
        own = tree.owners_of(name)
        m0, attr0 = own[0]
        if (len(own) == 1 and attr0 == "bias" and m0 in lora and lora[m0][0] == "linear"
                and len(art.entries[name]["shape"]) == 1):
            plan.bias_deltas[m0] = art.delta(name)
    if plan.bias_deltas:  # peft: lora_bias is not supported on embeddings; keep those some other way
        for mpath in [m for m, v in lora.items() if v[0] == "embedding"]:
            name = plan.lora_source[mpath]
            if name not in rest:
                rest.append(name)
            for m, _ in tree.owners_of(name):
                lora.pop(m, None)
    for name in rest:
        own = tree.owners_of(name)
        if any(m in plan.bias_deltas and attr == "bias" for m, attr in own):
            continue
        emb = [m for m, attr in own if attr == "weight" and isinstance(tree.modules[m], nn.Embedding)]
        if emb and len(art.entries[name]["shape"]) == 2:
            rows = nonzero_rows(art.delta(name))
            if rows is not None:
                plan.tokens[emb[0]] = (name, rows)  # tied heads follow the embedding in peft
                continue
        for m, _ in own:
            plan.to_save.setdefault(m, []).append(name)
    for m in sorted(set(plan.to_save) & set(lora)):  # a module saved whole carries its weight delta too
        lora.pop(m)
        plan.to_save[m].append(plan.lora_source[m])


def top_pairs(gains: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices (ascending) of the `rank` largest gains (k,); ties go to the earlier pair."""
    order = torch.sort(-gains.double(), stable=True).indices
    return torch.sort(order[:rank]).values


def cap_ranks(art: Artifact, plan: Plan, max_rank: int) -> dict[str, dict]:
    """Phase 2b: every LoRA pair of rank > max_rank cut to its max_rank pairs of largest gain, in
    place in `plan` (module doc). Returns, per tensor cut, {"rank", "kept", "gain_dropped",
    "error_predicted", "error_after", "energy"} (errors relative, as in the manifest's stats)."""
    cut: dict[str, dict] = {}
    for mpath, (role, B, A) in list(plan.lora.items()):
        name = plan.lora_source[mpath]
        k = B.shape[1]
        if k <= max_rank:
            continue
        if name not in cut:
            e = art.entries[name]
            shape = tuple(e["shape"])
            kind, meta, stored = lora_entry(art, name, name in plan.parts_dropped)
            gains = pair_gains(kind, shape[::-1] if e.get("transposed") else shape, meta, stored)
            if gains is None:
                raise AdamixError(f"tensor {name} ({e['kind']}, rank {k}) records no gains to choose {max_rank} of its "
                                  f"pairs by: compress with --max-rank {max_rank} instead")
            if len(gains) != k or not bool(torch.isfinite(gains).all()) or bool((gains < 0).any()):
                raise AdamixError(f"tensor {name}: its stored gains are not {k} finite values >= 0")
            keep = top_pairs(gains, max_rank)
            dropped = float(gains.double().sum() - gains[keep].double().sum())
            stats = e.get("stats", {})
            before = stats.get("error_predicted")  # gains relative to E(0) come with the allocation's prediction
            cut[name] = {"rank": k, "kept": max_rank, "gain_dropped": dropped, "error_predicted": before,
                         "error_after": None if before is None else (float(before) ** 2 + dropped) ** 0.5,
                         "energy": float(stats.get("energy", 0.0)), "keep": keep}
        keep = cut[name]["keep"]
        plan.lora[mpath] = (role, B[:, keep].contiguous(), A[keep].contiguous())
    for c in cut.values():
        c.pop("keep")
    return cut


def cap_summary(cut: dict[str, dict]) -> dict:
    """The cut tensors' predicted relative error before and after, pooled by their energy, over the
    tensors that have a prediction (kinds whose gains are shares of the allocation's E(0))."""
    known = [c for c in cut.values() if c["error_after"] is not None]
    energy = sum(c["energy"] for c in known)

    def pooled(key: str) -> float:
        return (sum(c[key] ** 2 * c["energy"] for c in known) / energy) ** 0.5 if energy > 0 else 0.0
    return {"tensors": len(cut), "predicted": len(known), "error_predicted": pooled("error_predicted"),
            "error_after": pooled("error_after")}


def choose_ranks(plan: Plan, uniform_rank: bool = False, max_rank: int | None = None) -> tuple[dict[str, int], list[str], int]:
    """Phase 3: (rank per LoRA module, modules dropped for rank 0, the adapter's r): the largest rank,
    or with uniform_rank the smallest rank vLLM accepts that holds it (every pair is padded to it),
    refused where that exceeds max_rank."""
    ranks = {m: v[1].shape[1] for m, v in plan.lora.items()}
    zero = sorted(m for m, k in ranks.items() if k == 0)
    for m in zero:
        plan.lora.pop(m)
        ranks.pop(m)
    r = max(ranks.values(), default=0)
    if r == 0 and not (plan.tokens or plan.to_save or plan.bias_deltas):
        raise AdamixError("the delta has nothing to export as LoRA (every low-rank delta has rank 0)")
    if uniform_rank and slot_rank(r) is None:
        raise AdamixError(f"--uniform-rank pads to a rank vLLM accepts ({', '.join(map(str, VLLM_RANKS))}), but the "
                          f"largest rank is {r}: compress with --max-rank {VLLM_RANKS[-1]} or lower")
    if uniform_rank and max_rank is not None and slot_rank(max(r, 1)) > max_rank:
        below = max(v for v in VLLM_RANKS if v <= max_rank)
        raise AdamixError(f"--uniform-rank pads rank {r} to {slot_rank(r)}, above --max-rank {max_rank}: use a rank "
                          f"vLLM accepts as the cap ({below} or {slot_rank(r)})")
    return ranks, zero, slot_rank(max(r, 1)) if uniform_rank else max(r, 1)


def adapter_tensors(plan: Plan, r: int, uniform_rank: bool, dtype: torch.dtype, tree: Tree, art: Artifact,
                    base_ck: Checkpoint) -> dict[str, torch.Tensor]:
    """Phase 4: the adapter's tensors under PEFT's names."""
    tensors: dict[str, torch.Tensor] = {}
    for mpath, (role, B, A) in plan.lora.items():
        k = B.shape[1]
        if uniform_rank and k < r:
            B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
            A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0)
        A, B = A.to(dtype), B.to(dtype)
        if role == "embedding":  # D^ = U V = (lora_embedding_B lora_embedding_A)^T
            tensors[f"{PREFIX}{mpath}.lora_embedding_A"] = B.T.contiguous()
            tensors[f"{PREFIX}{mpath}.lora_embedding_B"] = A.T.contiguous()
        else:
            tensors[f"{PREFIX}{mpath}.lora_A.weight"] = A.contiguous()
            tensors[f"{PREFIX}{mpath}.lora_B.weight"] = B.contiguous()
    if plan.bias_deltas:  # lora_bias gives every LoRA linear a bias: the delta where there is one, else 0
        for mpath, (role, B, _) in plan.lora.items():
            if role == "linear":
                db = plan.bias_deltas.get(mpath)
                db = db if db is not None else B.new_zeros(B.shape[0])
                tensors[f"{PREFIX}{mpath}.lora_B.bias"] = db.to(dtype).contiguous()

    def merged(name: str) -> torch.Tensor:
        w = base_ck.get(name)
        return (w.float() + art.delta(name)).to(w.dtype) if name in art.entries else w

    def base_name(mpath: str, attr: str) -> str:
        for n, p in tree.params.items():
            if p is tree.modules[mpath]._parameters[attr] and n in base_ck:
                return n
        raise AdamixError(f"the base checkpoint has no tensor for {mpath}.{attr}")

    for emb, (name, rows) in plan.tokens.items():
        tensors[f"{PREFIX}{emb}.token_adapter.trainable_tokens_delta"] = merged(name)[rows].contiguous()
    for mpath in plan.to_save:
        for attr, p in tree.modules[mpath]._parameters.items():
            if p is not None:
                tensors[f"{PREFIX}{mpath}.{attr}"] = merged(base_name(mpath, attr)).contiguous()
    return tensors


def adapter_config(plan: Plan, ranks: dict[str, int], r: int, uniform_rank: bool, tree: Tree, base) -> dict:
    """Phase 5a: adapter_config.json (rank and alpha patterns keep every module's scaling at 1)."""
    model = tree.model
    arch = (model.config.architectures or [""])[0] if getattr(model, "config", None) else ""
    patterns = {} if uniform_rank else {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if arch.endswith(CAUSAL_SUFFIXES) else None,
        "base_model_name_or_path": str(base),
        "r": r, "lora_alpha": r, "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "target_modules": sorted(plan.lora), "modules_to_save": sorted(plan.to_save) or None,
        "trainable_token_indices": {m: rows.tolist() for m, (_, rows) in plan.tokens.items()} or None,
        "lora_bias": bool(plan.bias_deltas), "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": any(is_conv1d(tree.modules[m]) for m in plan.lora), "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }


def export_summary(plan: Plan, ranks: dict[str, int], zero: list[str], r: int, art: Artifact, base, delta,
                   lora_only: bool, uniform_rank: bool, dtype: str, max_rank: int | None = None,
                   cut: dict[str, dict] | None = None) -> dict:
    """Phase 5b: adamix_export.json: the LoRA modules and ranks, what every other delta became, and
    what a rank cap cut (cap_ranks)."""
    cut = cut or {}
    return {
        "base": str(base), "delta": str(delta), "lora_only": lora_only, "uniform_rank": uniform_rank, "dtype": dtype,
        "max_rank": max_rank, "capped": {"pooled": cap_summary(cut), "tensors": cut} if max_rank is not None else None,
        "rank_max": max(ranks.values(), default=0), "r": r, "lora": {m: ranks[m] for m in sorted(plan.lora)},
        "zero_rank": zero,
        "lora_bias": sorted(plan.bias_deltas),
        "trainable_tokens": {m: {"tensor": n, "rows": int(rows.numel())} for m, (n, rows) in plan.tokens.items()},
        "modules_to_save": {m: sorted(set(v)) for m, v in sorted(plan.to_save.items())},
        "dropped": sorted(plan.dropped),
        "parts_dropped": {n: "token rows (only the low-rank part is a LoRA pair)" for n in sorted(plan.parts_dropped)},
        "not_lora": {n: art.entries[n]["kind"] + (" 1-D" if len(art.entries[n]["shape"]) == 1 else "")
                     for n in sorted(set(plan.rest) | set(plan.dropped))},
    }


def export_peft(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
                lora_only: bool = False, uniform_rank: bool = False, dtype: str | None = None,
                max_rank: int | None = None, overwrite: bool = False) -> dict:
    """Write the PEFT LoRA adapter folder `out` for BASE + DELTA; returns the summary that is also
    written to out/adamix_export.json (LoRA modules and ranks, what every other delta became).

    dtype: of the LoRA tensors; None: the base's floating dtype (export.vllm.export_dtype; float32
    is exact, float16 / bfloat16 halve the file and round the factors); merged modules keep the
    base's dtype. uniform_rank: every pair padded with zeros to the smallest rank vLLM accepts.
    max_rank: every pair cut to at most this rank (cap_ranks; the summary's "capped" says what that
    adds to the predicted error)."""
    if dtype is not None and dtype not in DTYPES:
        raise AdamixError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise AdamixError(f"--max-rank must be a positive integer, got {max_rank!r}")
    out = prepare_output(out, overwrite)
    art = Artifact(delta)
    refuse_new_rows(art.entries, "export-peft")
    base_ck = Checkpoint(base)
    art.check_base(base_ck.fingerprint())
    tree = Tree(model_skeleton(base_ck.folder))
    plan = lora_pairs(art, tree, lora_only)
    place_rest(art, tree, plan, lora_only)
    cut = cap_ranks(art, plan, max_rank) if max_rank is not None else {}
    ranks, zero, r = choose_ranks(plan, uniform_rank, max_rank)
    dtype = dtype or export_dtype([art.entries[plan.lora_source[m]].get("dtype", "") for m in plan.lora])
    tensors = adapter_tensors(plan, r, uniform_rank, DTYPES[dtype], tree, art, base_ck)
    config = adapter_config(plan, ranks, r, uniform_rank, tree, base)
    summary = export_summary(plan, ranks, zero, r, art, base, delta, lora_only, uniform_rank, dtype, max_rank, cut)
    with AtomicFolder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "adamix_export.json").write_text(json.dumps(summary, indent=2))
    summary["bytes"] = (out / "adapter_model.safetensors").stat().st_size
    return summary

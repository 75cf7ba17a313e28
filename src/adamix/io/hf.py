"""Hugging Face models around a Checkpoint: the config and class, the module tree on the meta device,
the names that tie parameters to checkpoint tensors and modules, the transformer blocks and their
linears, and materialised models.

Layer discovery is generic: the blocks are the longest nn.ModuleList of identical modules; the
linears are nn.Linear (y = W x) and transformers' Conv1D (GPT-2 style, y = x W, W stored transposed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import AdamixError
from .checkpoint import Checkpoint


def config_and_class(folder) -> tuple[object, type | None]:
    """A model folder's transformers config and class (config.json's `architectures`; None if the
    class is unknown to this transformers, so that callers fall back to AutoModel)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise AdamixError(f"{folder}: transformers cannot read config.json ({e})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    return config, (getattr(transformers, arch, None) if arch else None)


def model_class(folder) -> type:
    """The transformers class of a model folder: config.architectures[0], else AutoModel."""
    import transformers
    return config_and_class(folder)[1] or transformers.AutoModel


def model_skeleton(folder) -> nn.Module:
    """The folder's model class (config.json's `architectures`, else AutoModel) with its parameters
    on the meta device (no weights read; buffers such as rotary tables are real): names, module
    types, tied weights."""
    import transformers
    from accelerate import init_empty_weights

    config, cls = config_and_class(folder)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # tied parameters are one object (an LM head that shares the embedding)
    except Exception as e:
        raise AdamixError(f"{folder}: transformers cannot build the model ({e})") from None
    return model.eval()


def resolve_name(name: str, names: Iterable[str] | dict, prefix: str) -> str | None:
    """`name` as spelled among `names`: itself, without the model's base prefix (e.g. 'bert.'), or
    with it; None if none of these is there."""
    for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}" if prefix else name):
        if cand in names:
            return cand
    return None


def state_name_map(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Parameter name -> checkpoint tensor name, for the parameters found among `keys`."""
    keys = set(keys)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        cand = resolve_name(name, keys, prefix)
        if cand is not None:
            out[name] = cand
    return out


def param_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """id(parameter) -> every (module path, attribute) that holds it (several for tied weights)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mpath, attr))
    return owners


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): y = x W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or Conv1D: a layer whose weight is a matrix that multiplies its input."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source, tie: bool = False,
               complete: bool = True) -> None:
    """Assign `state` (names relative to `module`) to its parameters; tie: tie the model's weights
    after (e.g. lm_head to embed_tokens); complete: refuse, naming `source`, a module left with
    parameters that the checkpoint did not supply."""
    module.load_state_dict(state, strict=False, assign=True)
    if tie and hasattr(module, "tie_weights"):
        module.tie_weights()
    if complete and (missing := [n for n, p in module.named_parameters() if p.device.type == "meta"]):
        raise AdamixError(f"{source}: checkpoint lacks tensors the model needs: {', '.join(missing[:3])}")


def build_model(ckpt: Checkpoint, tensor: Callable[[str], torch.Tensor] | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """`ckpt`'s model in float32 on `device`, eval mode. tensor(name) supplies each checkpoint tensor
    (default: ckpt.get), e.g. W_base + D^ for a restored fine-tune."""
    model = model_skeleton(ckpt.folder)
    get = tensor or ckpt.get
    state = {p: get(c).float().to(device) for p, c in state_name_map(model, ckpt.keys()).items()}
    load_state(model, state, ckpt.source, tie=True)
    return model.eval()


@dataclass
class LinearInfo:
    name: str          # weight tensor name in the checkpoint, e.g. "encoder.layer.0.attention.self.query.weight"
    module: nn.Module
    transposed: bool   # Conv1D stores W as (in, out)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest nn.ModuleList whose children all have the same type (the transformer blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise AdamixError("cannot find the model's transformer blocks (no nn.ModuleList of layers)")
    return best


def linears(block: nn.Module, prefix: str) -> list[LinearInfo]:
    """The linear layers of `block`, with their weights' checkpoint names (`prefix` + path)."""
    return [LinearInfo(f"{prefix}{name}.weight", mod, is_conv1d(mod))
            for name, mod in block.named_modules() if is_linear(mod)]

"""Hugging Face models built from a Checkpoint's tensors: the skeleton of the right class, the map
from its parameter names to the checkpoint's tensor names, and a materialised model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import AdamixError


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


def model_skeleton(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's model class (config.json's `architectures`, else AutoModel) with meta weights."""
    import transformers
    from accelerate import init_empty_weights

    config, cls = config_and_class(ckpt.folder)
    with init_empty_weights(include_buffers=False):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def state_name_map(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Parameter name -> checkpoint tensor name (prefix differences such as 'bert.' resolved)."""
    keys = set(ckpt.keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if cand in keys:
                out[name] = cand
                break
    return out


def build_model(ckpt: Checkpoint, tensor: Callable[[str], torch.Tensor] | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """`ckpt`'s model in float32 on `device`, eval mode. tensor(name) supplies each checkpoint tensor
    (default: ckpt.get), e.g. W_base + D^ for a restored fine-tune."""
    model = model_skeleton(ckpt)
    get = tensor or ckpt.get
    state = {p: get(c).float().to(device) for p, c in state_name_map(model, ckpt).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if missing := [n for n, p in model.named_parameters() if p.device.type == "meta"]:
        raise AdamixError(f"{ckpt.source}: checkpoint lacks tensors the model needs: {', '.join(missing[:3])}")
    return model.eval()

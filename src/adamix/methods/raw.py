"""Raw storage: the delta in fp16 as is (1-D tensors such as norms and biases, tiny matrices)."""

from __future__ import annotations

import torch

from ..errors import AdamixError
from .kinds import Encoded, register_decoder


def encode_raw(D: torch.Tensor) -> Encoded:
    """Store D (any shape) as an fp16 tensor."""
    return Encoded("raw", tuple(D.shape), {}, {"delta": D.to(torch.float16).contiguous()})


@register_decoder("raw", {"delta": "F16"}, raw=True)
def decode_raw(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    d = tensors["delta"]
    if tuple(d.shape) != tuple(shape) or d.dtype != torch.float16:
        raise AdamixError(f"raw delta has shape {tuple(d.shape)} {d.dtype}, manifest says {tuple(shape)} float16")
    return d.float()

"""Writing a safetensors file one tensor at a time (the artifact's delta.safetensors), so that a
model-sized set of tensors never sits in memory at once."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from .dtypes import FILE_ORDER, ITEMSIZE, NAME


def save_streaming(path: Path, tensors: Mapping[str, torch.Tensor | Path], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time: the same bytes as safetensors.torch.save_file,
    without holding every tensor in memory.

    tensors: name -> a tensor, or the path of a safetensors file that holds a tensor of that name.
    File layout: u64 little-endian header length N, N bytes of JSON header ({"__metadata__", name:
    {dtype, shape, data_offsets}}) padded with spaces to a multiple of 8, then the tensors' bytes.
    """
    handles: dict[Path, object] = {}

    def source(name: str):
        src = tensors[name]
        if isinstance(src, torch.Tensor):
            return src
        if src not in handles:
            handles[src] = safe_open(str(src), framework="pt")
        return handles[src]

    specs = {}
    for name, src in tensors.items():
        if isinstance(src, torch.Tensor):
            specs[name] = (NAME[src.dtype], list(src.shape))
        else:
            sl = source(name).get_slice(name)
            specs[name] = (sl.get_dtype(), list(sl.get_shape()))
    order = sorted(specs, key=lambda n: (FILE_ORDER.index(specs[n][0]), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            src = source(name)
            t = src if isinstance(src, torch.Tensor) else src.get_tensor(name)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

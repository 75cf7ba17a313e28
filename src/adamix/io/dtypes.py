"""The safetensors dtypes, in one table: the names the format writes, their torch dtypes and bytes
per element, and the order in which safetensors.torch.save_file lays tensors out (widest first, then
by name, so that every tensor stays aligned in a memory map)."""

from __future__ import annotations

import torch

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
         "BOOL": torch.bool}
NAME = {t: name for name, t in TORCH.items()}
ITEMSIZE = {name: t.itemsize for name, t in TORCH.items()}
FILE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
FLOAT = frozenset({"F64", "F32", "F16", "BF16"})

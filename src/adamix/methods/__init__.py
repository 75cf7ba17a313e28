"""Compression methods behind one protocol (registry.Method), and the stored kinds they write.

Importing the package registers every method and the decoder of every stored kind. Each line below
is one method's registration: a new method is a new module plus one line here (docs/adding-a-method.md).
"""

from __future__ import annotations

import torch

from . import raw, rows, svd_mixed, svd_rotated, token_rows  # noqa: F401  (stored kinds shared by several methods)
# one line per method: importing its module registers it (the first is the default)
from . import adamix  # noqa: F401
from . import deltacome  # noqa: F401
from . import lowrank  # noqa: F401
from . import bitdelta  # noqa: F401
from . import direct  # noqa: F401  (rtn and gptq)
from . import dare  # noqa: F401
from . import impart  # noqa: F401
from . import deltadct  # noqa: F401
from . import ultradelta  # noqa: F401
from .kinds import Encoded, decode
from .registry import Method, ModelContext, Settings, budget_bits, get, names

__all__ = ["Encoded", "Method", "ModelContext", "Settings", "budget_bits", "compress_with", "decode", "get", "names"]


def compress_with(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
                  factors: tuple[torch.Tensor, ...] | None = None, analysis=None) -> Encoded:
    """Encode one delta D (m x n, y = W x) with input Gram H (n x n, None = data-free) by the
    registered method settings.method, within budget_bits(m, n, settings.alpha, overhead_bits)."""
    return get(settings.method).compress(D, H, settings, overhead_bits, factors, analysis)

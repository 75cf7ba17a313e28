"""Compression methods, one module each, behind one call: `compress_with(D, H, settings, overhead)`.

Importing the package registers the decoder of every stored kind.
"""

from __future__ import annotations

import torch

from . import bitdelta, deltacome, direct, lowrank, raw, rows  # noqa: F401  (register decoders)
from . import factors as _svd_mixed  # noqa: F401  (registers "svd-mixed")
from .adamix import Analysis, budget_bits, compress_matrix
from .base import Encoded, Settings

METHODS = ("adamix", "deltacome", "lowrank", "bitdelta", "rtn", "gptq")


def compress_with(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
                  factors: tuple[torch.Tensor, ...] | None = None, analysis: Analysis | None = None) -> Encoded:
    """Encode one delta D (m x n, y = W x) with input Gram H (n x n, None = data-free) by
    settings.method, within budget_bits(m, n, settings.alpha, overhead_bits) (bitdelta: 1 bit each).

    factors (svd(D)) and analysis (adamix.analyse with the method's widths) may be passed in when
    already computed, e.g. by a benchmark that compresses one delta at several ratios."""
    m, n = D.shape
    budget = budget_bits(m, n, settings.alpha, overhead_bits)
    method = settings.method
    if method == "adamix":
        return compress_matrix(D, H, settings, overhead_bits, analysis)
    if method == "deltacome":
        return deltacome.compress_deltacome(D, H, settings, overhead_bits, analysis)
    if method == "lowrank":
        return lowrank.compress_lowrank(D, H, settings, budget, factors)
    if method == "bitdelta":
        return bitdelta.compress_bitdelta(D, H)
    if method in ("rtn", "gptq"):
        return direct.compress_direct(D, H, settings, budget, use_gptq=method == "gptq")
    raise ValueError(f"unknown method {method!r}")

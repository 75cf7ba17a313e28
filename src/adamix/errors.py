"""The one error type that user mistakes raise (the CLI prints it as one line, no traceback), and the
finiteness check that inputs go through."""

from __future__ import annotations

import torch


class AdamixError(Exception):
    """A problem with the user's input (files, options, models), not a bug in adamix."""


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or Inf in t. `chunk` elements at a time: torch.isfinite makes temporaries of 1.8x the
    tensor (0.9 GB for an 11008-wide float32 Gram); this holds 1.8x one chunk (30 MB)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))

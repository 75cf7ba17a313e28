"""Where adamix caches what it derives once (de-quantized GGUF models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ADAMIX_CACHE, default ~/.cache/adamix."""
    return Path(os.environ.get("ADAMIX_CACHE", Path.home() / ".cache" / "adamix"))

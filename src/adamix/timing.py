"""Where a compression's time goes: wall-clock seconds per phase (calibration, SVD, error table, ILP,
GPTQ, reading, writing), accumulated by `phase` sections and `timed` functions.

Nested sections count towards the outermost one of their thread only. Within one thread the phases
add up to at most the wall time; what no section covers (target correction, decoding, bookkeeping)
is the remainder. A phase run in a worker thread (the ILP, overlapped with the next matrix's linear
algebra: compression.encode) overlaps the others, so the phases of a run may add up to more than its
wall time. A section ends with torch.cuda.synchronize() when CUDA is in use, so that the device's
queued work counts towards the phase that queued it.
"""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch

SECONDS: dict[str, float] = {}
_lock = threading.Lock()
_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "open"):
        _local.open = []
    return _local.open


@contextmanager
def phase(name: str) -> Iterator[None]:
    stack = _stack()
    if stack:
        yield
        return
    stack.append(name)
    t = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        with _lock:
            SECONDS[name] = SECONDS.get(name, 0.0) + time.perf_counter() - t
        stack.pop()


def timed(name: str):
    """Decorator: every call of the function counts towards phase `name`."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return inner
    return wrap


def reset() -> None:
    with _lock:
        SECONDS.clear()


def snapshot() -> dict[str, float]:
    with _lock:
        return {k: round(v, 3) for k, v in SECONDS.items()}

"""Where a compression's time goes: wall-clock seconds per phase (calibration, SVD, error table, ILP,
GPTQ, reading, writing), accumulated by `phase` sections and `timed` functions.

Nested sections count towards the outermost one only, so the phases add up to at most the wall
time; what no section covers (target correction, decoding, bookkeeping) is the remainder.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Iterator

SECONDS: dict[str, float] = {}
_open: list[str] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    if _open:
        yield
        return
    _open.append(name)
    t = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[name] = SECONDS.get(name, 0.0) + time.perf_counter() - t
        _open.pop()


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
    SECONDS.clear()


def snapshot() -> dict[str, float]:
    return {k: round(v, 3) for k, v in SECONDS.items()}

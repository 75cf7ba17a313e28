"""Handing freed memory back to the operating system between tensors.

A compression allocates and frees tensors of every size, tensor after tensor. glibc keeps freed
blocks below its mmap threshold in the heap, and the holes they leave add up over blocks, so that
the peak memory would grow with the model's depth. `malloc_trim(0)` after each tensor returns those
pages (benchmarks/bounded_memory.py measures the peak against the depth; docs/results/). Elsewhere
(macOS, musl, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the free pages of the malloc heap to the OS (glibc malloc_trim); no-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

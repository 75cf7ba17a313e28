"""memory.release_freed_memory: freed heap pages go back to the OS (glibc only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adamix.memory import _libc, release_freed_memory


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon")


@pytest.mark.skipif(_libc() is None or not Path("/proc/self/status").exists(), reason="needs glibc and /proc")
def test_freed_heap_pages_are_returned():
    # 2000 tensors of 64 KiB (below glibc's mmap threshold: they live in the heap), each followed by
    # a small one that stays alive, so that freeing the big ones leaves 125 MiB of holes inside the
    # heap, which free() never returns by itself (it trims only the heap's top)
    many, pins = [], []
    for _ in range(2000):
        many.append(torch.ones(16384))
        pins.append(torch.ones(256))
    before = rss_anon_mib()
    del many
    held = rss_anon_mib()
    release_freed_memory()
    after = rss_anon_mib()
    assert held > before - 40, "glibc returned the pages by itself: the test shows nothing"
    assert after < held - 80
    del pins

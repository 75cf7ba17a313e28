"""Value-independent random masks regenerated from a stored seed, so their positions cost no bits.

DARE and ImPart drop entries at random, independently of their values: the reader needs only the
seed (a 63-bit integer in the entry's metadata) and the count kept to find the same positions.
The random keys are SplitMix64 (Steele et al., 2014) of a counter, a fixed integer function that
numpy evaluates the same way on every machine and version (no library RNG stream is relied on):

    x_i = seed + (i + 1) * 0x9E3779B97F4A7C15  (mod 2^64)
    key_i = mix(x_i),  mix(z) = z3 ^ (z3 >> 31), z2 = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9,
                                                  z3 = (z2 ^ (z2 >> 27)) * 0x94D049BB133111EB

mix is a bijection of 64-bit integers and the x_i are distinct, so the keys are distinct: "the k
entries of smallest key" is a uniformly random k-subset with no ties to break.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
CHUNK = 1 << 22  # keys per step: bounded work memory for large tensors


def keys(seed: int, count: int, start: int = 0) -> np.ndarray:
    """key_i for i in [start, start + count): (count,) uint64."""
    i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + i * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * M1
        z = (z ^ (z >> np.uint64(27))) * M2
    return z ^ (z >> np.uint64(31))


def subset(seed: int, total: int, k: int) -> torch.Tensor:
    """The k indices (ascending, int64) of smallest key among 0..total-1: a uniform random k-subset."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if k >= total:
        return torch.arange(total)
    best_keys = np.zeros(0, dtype=np.uint64)
    best_idx = np.zeros(0, dtype=np.int64)
    for start in range(0, total, CHUNK):  # keep the k smallest seen so far: memory O(k + CHUNK)
        kc = keys(seed, min(CHUNK, total - start), start)
        cand_keys = np.concatenate([best_keys, kc])
        cand_idx = np.concatenate([best_idx, np.arange(start, start + len(kc), dtype=np.int64)])
        if len(cand_keys) > k:
            part = np.argpartition(cand_keys, k - 1)[:k]
            cand_keys, cand_idx = cand_keys[part], cand_idx[part]
        best_keys, best_idx = cand_keys, cand_idx
    return torch.from_numpy(np.sort(best_idx))


def column_subsets(seed: int, rows: int, counts: list[int]) -> list[torch.Tensor]:
    """For column j a subset of counts[j] of `rows` row indices, column j's keys being those of
    i in [j * rows, (j + 1) * rows)."""
    out = []
    for j, k in enumerate(counts):
        if k >= rows:
            out.append(torch.arange(rows))
        elif k <= 0:
            out.append(torch.zeros(0, dtype=torch.int64))
        else:
            kc = keys(seed, rows, j * rows)
            out.append(torch.from_numpy(np.sort(np.argpartition(kc, k - 1)[:k]).astype(np.int64)))
    return out


def seed_for(D: torch.Tensor, seed: int) -> int:
    """A 63-bit seed of the delta's bytes and the run's seed: a different mask for every tensor,
    the same for the same inputs (the result is deterministic)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(np.ascontiguousarray(D.detach().float().cpu().numpy()).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1

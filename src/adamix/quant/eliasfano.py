"""Elias-Fano coding of a sorted set of positions: what value-dependent masks cost to store.

K distinct positions 0 <= x_1 < ... < x_K < U are split at l = floor(log2(U / K)) bits (0 if U < 2K):
  low:  the l low bits of each x_i, packed (K l bits, least significant bit first);
  high: a bit vector of K + (U >> l) + 1 bits with bit (x_i >> l) + i set, packed.
The total, 8 ceil(K l / 8) + 8 ceil((K + (U >> l) + 1) / 8) bits, is within 2 bits per position of
the information-theoretic log2 C(U, K) (Elias 1974, Fano 1971). Decoding is vectorised: the set
bits of `high` give x_i >> l = (position of the i-th set bit) - i.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def low_bits(universe: int, count: int) -> int:
    """l for `count` positions in [0, universe)."""
    return int(math.floor(math.log2(universe / count))) if count and universe >= 2 * count else 0


def high_length(universe: int, count: int) -> int:
    return count + (universe >> low_bits(universe, count)) + 1


def nbytes(universe: int, count: int) -> tuple[int, int]:
    """(bytes of low, bytes of high) for `count` positions in [0, universe)."""
    if count == 0:
        return 0, 0
    return math.ceil(count * low_bits(universe, count) / 8), math.ceil(high_length(universe, count) / 8)


def encode(positions: torch.Tensor, universe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct positions (K,) int64 in [0, universe) -> (low, high) packed uint8."""
    x = positions.numpy().astype(np.int64)
    K = len(x)
    if K == 0:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)
    if np.any(np.diff(x) <= 0) or x[0] < 0 or x[-1] >= universe:
        raise ValueError("positions must be sorted, distinct and in [0, universe)")
    l = low_bits(universe, K)
    bits = ((x[:, None] >> np.arange(l, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1) if l else np.zeros(0, np.uint8)
    vec = np.zeros(high_length(universe, K), dtype=np.uint8)
    vec[(x >> l) + np.arange(K)] = 1
    return (torch.from_numpy(np.packbits(bits, bitorder="little")),
            torch.from_numpy(np.packbits(vec, bitorder="little")))


def decode(low: torch.Tensor, high: torch.Tensor, universe: int, count: int) -> torch.Tensor:
    """Inverse of encode; raises ValueError where the streams do not hold `count` positions."""
    if (low.numel(), high.numel()) != nbytes(universe, count):
        raise ValueError(f"{low.numel()} + {high.numel()} bytes cannot hold {count} positions of [0, {universe})")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    l = low_bits(universe, count)
    vec = np.unpackbits(high.numpy(), bitorder="little")[:high_length(universe, count)]
    ones = np.flatnonzero(vec)
    if len(ones) != count:
        raise ValueError(f"the high bits mark {len(ones)} positions, not {count}")
    x = (ones - np.arange(count)).astype(np.int64) << l
    if l:
        bits = np.unpackbits(low.numpy(), bitorder="little")[:count * l].reshape(count, l).astype(np.int64)
        x |= bits @ (1 << np.arange(l, dtype=np.int64))
    if np.any(np.diff(x) <= 0) or x[-1] >= universe:
        raise ValueError("the decoded positions are not increasing within the universe")
    return torch.from_numpy(x)

"""Seeded random Hadamard rotations: R = B diag(s), an orthogonal n x n matrix applied in O(n log k).

s (n,) are random signs from a seed, B = blockdiag(H_k / sqrt(k), ..., H_k / sqrt(k)) with H_k the
Sylvester Hadamard matrix of order k, the largest power of two that divides n (k = n for n = 4096,
k = 128 for n = 384, k = 256 for n = 11008; k = 1 for odd n, where R is only the signs). A vector's
rotated entries (R v)_j are sums of k of its entries with random signs: close to Gaussian whatever
the original distribution, which is what a grid made for the Gaussian (quant.normal) needs.

The signs come from BLAKE2b of (seed, n), so a reader derives the same R from the seed stored in
the metadata on any machine and any version of torch or numpy.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch


def block_size(n: int) -> int:
    """k: the largest power of two that divides n."""
    return n & -n


@functools.lru_cache(maxsize=64)
def _signs(n: int, seed: int) -> np.ndarray:
    out = bytearray()
    counter = 0
    while len(out) * 8 < n:
        out += hashlib.blake2b(b"adamix-hadamard" + seed.to_bytes(8, "little", signed=True) + n.to_bytes(8, "little")
                               + counter.to_bytes(8, "little"), digest_size=64).digest()
        counter += 1
    bits = np.unpackbits(np.frombuffer(bytes(out), dtype=np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


def signs(n: int, seed: int) -> torch.Tensor:
    """s (n,) float64 in {-1, +1}, a pure function of (n, seed)."""
    return torch.from_numpy(_signs(n, seed).copy())


def fwht(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., n) times blockdiag(H_k / sqrt(k)) along the last dimension (H_k symmetric: its own
    inverse once normalised); n a multiple of k, k a power of two. A new tensor."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // k, k)
    h = 1
    while h < k:
        y = y.reshape(y.shape[0], y.shape[1], k // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(shape) / k ** 0.5) if k > 1 else y.reshape(shape).clone()


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each row of x (..., n) rotated: x R^T, i.e. R v for every row v."""
    n = x.shape[-1]
    return fwht(x * signs(n, seed).to(x), block_size(n))


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """The inverse of rotate: y R, i.e. R^T v' for every row v' of y (..., n)."""
    n = y.shape[-1]
    return fwht(y, block_size(n)) * signs(n, seed).to(y)


def rotate_matrix(D: torch.Tensor, seed: int) -> torch.Tensor:
    """R_m D R_n^T for D (m, n): both sides rotated, so that D = R_m^T D' R_n."""
    return rotate(rotate(D, seed).T, seed).T


def rotate_gram(H: torch.Tensor, seed: int) -> torch.Tensor:
    """R H R^T for a symmetric H (n, n): the Gram of the rotated inputs R x."""
    return rotate_matrix(H, seed)

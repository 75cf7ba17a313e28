"""Bit packing of b-bit codes (1 <= b <= 8) into a dense uint8 stream.

Code j occupies bits [j*b, (j+1)*b) of the stream, least significant bit first (little-endian
within each byte), so N codes take exactly ceil(N * b / 8) bytes whatever b is.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    return math.ceil(count * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes (values < 2**bits) -> packed uint8 tensor of packed_nbytes(N, bits) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit-width must be in 1..8, got {bits}")
    c = codes.reshape(-1).to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(c.copy())
    if c.size and int(c.max()) >= 1 << bits:
        raise ValueError(f"code {int(c.max())} does not fit in {bits} bits")
    planes = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]  # (N, bits)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack: the first `count` codes of the stream, uint8 (count,)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit-width must be in 1..8, got {bits}")
    p = packed.reshape(-1).to(torch.uint8).numpy()
    if p.size != packed_nbytes(count, bits):
        raise ValueError(f"{p.size} packed bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(p.copy())
    planes = np.unpackbits(p, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((planes.astype(np.uint16) @ weights).astype(np.uint8))

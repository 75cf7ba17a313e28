"""Asymmetric uniform grids per group of entries, and round-to-nearest (RTN).

A vector x of length L is cut into ceil(L / g) groups of g entries (the last one may be shorter).
Each group has its own grid of 2**b points: x^ = offset + scale * q, q in {0, ..., 2**b - 1}.
`scale` and `offset` are rounded to fp16 before the codes are chosen, because fp16 is what is stored:
what is reconstructed from disk is then bit-for-bit what was optimised in memory.

The grid range is [p * min(x), p * max(x)] with the shrink p in SHRINKS chosen per group to minimise
the squared error (clipping the extremes helps a lot at 2-3 bits).
"""

from __future__ import annotations

import math

import torch

SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
PARAM_BITS = 32  # what one group's grid takes on disk: an fp16 scale and an fp16 offset


def n_groups(length: int, group_size: int) -> int:
    """Number of groups a vector of `length` entries is cut into."""
    return math.ceil(length / group_size)


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """(k, L) -> (k, G, g), padding the last group by repeating the vector's last entry."""
    k, length = x.shape
    pad = n_groups(length, g) * g - length
    if pad:
        x = torch.cat([x, x[:, -1:].expand(k, pad)], dim=1)
    return x.reshape(k, -1, g)


def fit_grid(x: torch.Tensor, bits: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one grid per group of each row.

    x: (k, L) float; bits: (k,) int, each in 1..8 (own width per row); returns scale, offset,
    both (k, G) float32 holding fp16-representable values (G = ceil(L / group_size)).
    """
    xg = _grouped(x.float(), group_size)
    maxq = (2.0 ** bits.to(torch.float32) - 1).view(-1, 1, 1)
    lo, hi = xg.amin(dim=2, keepdim=True), xg.amax(dim=2, keepdim=True)
    best_err = torch.full(lo.shape, float("inf"), device=lo.device)
    best_scale = torch.zeros_like(lo)
    best_offset = torch.zeros_like(lo)
    for p in SHRINKS:
        scale, offset = _to_fp16_grid(p * lo, p * hi, maxq)
        q = torch.clamp(torch.round((xg - offset) / scale), min=torch.zeros_like(maxq), max=maxq)
        err = ((offset + scale * q - xg) ** 2).sum(dim=2, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale.squeeze(2), best_offset.squeeze(2)


def _to_fp16_grid(lo: torch.Tensor, hi: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid (scale, offset) covering [lo, hi] with maxq steps, rounded to fp16 values; scale > 0."""
    scale = ((hi - lo) / maxq).to(torch.float16).float()
    tiny = torch.finfo(torch.float16).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
    offset = lo.to(torch.float16).float()
    return scale, offset


def expand_groups(p: torch.Tensor, length: int, group_size: int) -> torch.Tensor:
    """(k, G) per-group values -> (k, L) per-entry values."""
    return p.repeat_interleave(group_size, dim=1)[:, :length]


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes of x (k, L) on the per-entry grids scale, offset (k, L): uint8 in [0, 2**bits - 1]."""
    maxq = (2.0 ** bits.to(torch.float32) - 1).view(-1, 1)
    q = torch.round((x.float() - offset) / scale)
    return torch.clamp(q, min=torch.zeros_like(maxq), max=maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x^ = offset + scale * q, all (k, L); float32."""
    return offset + scale * codes.float()


def rtn(x: torch.Tensor, bits: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest of each row of x (k, L) at its own width bits (k,).

    Returns codes (k, L) uint8, scale and offset (k, G) float32 (fp16 values), deq (k, L) float32.
    """
    length = x.shape[1]
    scale, offset = fit_grid(x, bits, group_size)
    s, o = expand_groups(scale, length, group_size), expand_groups(offset, length, group_size)
    codes = quantize(x, s, o, bits)
    return {"codes": codes, "scale": scale, "offset": offset, "deq": dequantize(codes, s, o)}

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
    if not xg.is_cuda and xg.numel() > SMALL:
        return _fit_loop(xg, maxq)
    rows = max(1, FIT_CHUNK // max(1, len(SHRINKS) * xg.shape[1] * xg.shape[2]))
    parts = [_fit_at_once(xg[i:i + rows], maxq[i:i + rows]) for i in range(0, xg.shape[0], rows)]
    return torch.cat([s for s, _ in parts]), torch.cat([o for _, o in parts])


SMALL = 1 << 16  # on the CPU, inputs up to this many entries try every shrink at once, larger ones in a loop
FIT_CHUNK = 1 << 24  # entries of the (shrinks, rows, groups, g) work tensor per step: 64 MB in float32


def _fit_loop(xg: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_grid on grouped rows xg (k, G, g) with maxq (k, 1, 1), one shrink after the other, keeping
    strict improvements: the first shrink of least error per group."""
    lo, hi = xg.amin(dim=2, keepdim=True), xg.amax(dim=2, keepdim=True)
    best_err = torch.full(lo.shape, float("inf"), device=lo.device)
    best_scale, best_offset = torch.zeros_like(lo), torch.zeros_like(lo)
    zero = torch.zeros_like(maxq)
    buf = torch.empty_like(xg)  # one work buffer, in place: the same operations per entry as _fit_at_once
    for p in SHRINKS:
        scale, offset = _to_fp16_grid(p * lo, p * hi, maxq)
        torch.sub(xg, offset, out=buf).div_(scale).round_().clamp_(min=zero, max=maxq)  # the codes q
        err = buf.mul_(scale).add_(offset).sub_(xg).square_().sum(dim=2, keepdim=True)  # (s q + o - x)^2
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale.squeeze(2), best_offset.squeeze(2)


def _fit_at_once(xg: torch.Tensor, maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_fit_loop's result, every shrink at once along a leading dimension: a few large operations
    instead of a loop of small ones (the GPU's case, and the CPU's for small inputs); the first of
    equal minima, as the loop chooses. Bit for bit the same values (the same operations per entry)."""
    lo, hi = xg.amin(dim=2, keepdim=True), xg.amax(dim=2, keepdim=True)
    p = torch.tensor(SHRINKS, dtype=xg.dtype, device=xg.device).view(-1, 1, 1, 1)
    scale, offset = _to_fp16_grid(p * lo, p * hi, maxq)  # (S, k, G, 1)
    q = torch.clamp(torch.round((xg - offset) / scale), min=torch.zeros_like(maxq), max=maxq)
    err = ((offset + scale * q - xg) ** 2).sum(dim=3, keepdim=True)
    best = err.argmin(dim=0, keepdim=True)  # the first of equal minima
    return scale.gather(0, best)[0, ..., 0], offset.gather(0, best)[0, ..., 0]


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

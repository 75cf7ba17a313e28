"""A grid made for Gaussian entries: the Lloyd-Max quantizer of N(0, 1), one scale per vector.

After a random Hadamard rotation (quant.hadamard) a vector's entries are close to N(0, sigma^2).
The b-bit grid is then sigma * c, with c (2**b,) the levels that minimise E[(X - q(X))^2] for
X ~ N(0, 1) (Lloyd 1957 / Max 1960: each level the mean of its cell, each threshold the midpoint of
two levels); its squared error is below that of the best uniform grid of as many points, and it
stores one fp16 scale per vector instead of an fp16 scale and offset per group of entries (HIGGS,
arXiv 2411.17525, uses such grids, there in 1-2 dimensions, after the same rotation).

The levels are Lloyd's iterations from the high-rate optimum (Panter-Dite: sqrt(3) times the
normal quantiles), at most LLOYD_ITERATIONS of them, rounded to fp16, so that the encoder and every reader use the same numbers.
The scale of a vector is its root mean square times the factor of SCALE_FACTORS that gives the least
squared error of round-to-nearest, rounded to fp16 before the codes are chosen.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.special import ndtr, ndtri

SCALE_FACTORS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
PARAM_BITS = 16  # one fp16 scale per vector
LLOYD_ITERATIONS = 1000  # enough for the fixed point at up to 4 bits; 8-bit tail levels move slowly (within 0.02 of it)


@functools.lru_cache(maxsize=16)
def _levels(bits: int) -> np.ndarray:
    k = 2 ** bits
    c = math.sqrt(3.0) * ndtri((np.arange(k) + 0.5) / k)  # the high-rate optimum (Panter-Dite) as the start
    density = lambda t: np.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    for _ in range(LLOYD_ITERATIONS):
        t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        new = (density(t[:-1]) - density(t[1:])) / (ndtr(t[1:]) - ndtr(t[:-1]))  # E[X | cell]
        new = (new - new[::-1]) / 2  # symmetric, whatever the rounding
        if np.abs(new - c).max() < 1e-10:  # far below fp16's resolution
            c = new
            break
        c = new
    return c.astype(np.float16).astype(np.float64)


def levels(bits: int) -> torch.Tensor:
    """The 2**bits Lloyd-Max levels of N(0, 1), increasing, fp16 values as float32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"normal grid: bits {bits} not in 1..8")
    return torch.from_numpy(_levels(bits).astype(np.float32))


class Codebook:
    """The grids of k rows at widths bits (k,), set up once so that quantizing a column of k entries
    (GPTQ's inner loop) is one search: each width's midpoints are shifted into a window of its own,
    SPAN apart, so that one sorted array serves all rows (x_i / scale_i is clamped to the window,
    which holds every level: the 8-bit grid ends at 4.6)."""

    SPAN = 16.0

    def __init__(self, bits: torch.Tensor | list[int], device: torch.device | str | None = None):
        bits = torch.as_tensor(bits, device=device)
        widths = torch.unique(bits).tolist()
        lv = [levels(b).to(bits.device) for b in widths]
        self.mids = torch.cat([(c[1:] + c[:-1]) / 2 + j * self.SPAN for j, c in enumerate(lv)])
        self.levels = torch.cat(lv)
        slot = torch.searchsorted(torch.tensor(widths, device=bits.device), bits)  # the width's index per row
        mids_before = torch.tensor([0] + [len(c) - 1 for c in lv], device=bits.device).cumsum(0)
        levels_before = torch.tensor([0] + [len(c) for c in lv], device=bits.device).cumsum(0)
        self.shift = (slot * self.SPAN).float()[:, None]  # (k, 1)
        self.first_mid = mids_before[slot][:, None]       # (k, 1): the row's codes start there in the search
        self.first_level = levels_before[slot][:, None]   # (k, 1): and there in self.levels
        self.to_level = self.first_level - self.first_mid  # (k, 1): search index -> index in self.levels

    def search(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The index into the shifted midpoints of the nearest level of x_i / scale_i (k, L) int64."""
        half = self.SPAN / 2
        v = (x.float() / scale[:, None]).contiguous().clamp_(-half + 0.5, half - 0.5).add_(self.shift)
        return torch.bucketize(v, self.mids)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (k, L) uint8: the nearest level of x_i / scale_i, rows x (k, L), scale (k,)."""
        return (self.search(x, scale) - self.first_mid).to(torch.uint8)

    def round(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantize(x, scale), dequantize of those codes) in one search: GPTQ's inner loop."""
        idx = self.search(x, scale)
        return idx - self.first_mid, self.levels[idx + self.to_level] * scale[:, None].float()

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x^ (k, L) float32 = scale_i * c[code] for codes (k, L), scale (k,)."""
        return self.levels[codes.long() + self.first_level] * scale[:, None].float()


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes (k, L) uint8 of the rows of x (k, L) on their grids: scale (k,), widths bits (k,)."""
    return Codebook(bits, x.device).quantize(x, scale)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor | list[int]) -> torch.Tensor:
    """x^ (k, L) float32 = scale_i * c[code] for codes (k, L), scale (k,), bits (k,)."""
    return Codebook(bits, codes.device).dequantize(codes, scale)


def fit_scale(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """One fp16 scale per row of x (k, L): rms(x_i) times the factor of least round-to-nearest error."""
    x = x.float()
    rms = x.pow(2).mean(dim=1).sqrt()
    tiny = torch.finfo(torch.float16).tiny
    best_err = torch.full_like(rms, float("inf"))
    best = torch.full_like(rms, tiny)
    book = Codebook(bits, x.device)
    for f in SCALE_FACTORS:
        s = (rms * f).to(torch.float16).float().clamp_min(tiny)
        err = ((book.dequantize(book.quantize(x, s), s) - x) ** 2).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def rtn_on(grid: str, x: torch.Tensor, bits: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest of the rows of x (k, L) on `grid`: "uniform" (quant.grid.rtn, groups of
    min(group_size, L) entries) or "normal" (rtn below; group_size unused)."""
    if grid == "normal":
        return rtn(x, bits)
    from .grid import rtn as uniform_rtn
    return uniform_rtn(x, bits, min(group_size, x.shape[1]))


def rtn(x: torch.Tensor, bits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest of each row of x (k, L) at width bits (k,): codes (k, L) uint8, scale (k,)
    float32 (fp16 values), deq (k, L) float32."""
    scale = fit_scale(x, bits)
    codes = quantize(x, scale, bits)
    return {"codes": codes, "scale": scale, "deq": dequantize(codes, scale, bits)}

"""UltraDelta peer (Wang et al., 2025, arXiv 2505.13563; code xiaohuiwang000/UltraDelta,
src/ultradelta_compression.py), kind "ultradelta": data-free quantization and value-grouped dropping.

For one delta D (m x n):
1. Quantize per tensor, asymmetric min-max at b bits (`--value-bits`, default 4 as in the code's
   run.sh): step = (max - min) / (2^b - 1), q = round((D - min) / step).
2. Sparsity s of the tensor (see below).
3. Value-grouped dropping: for each level v with count_v entries, drop round(count_v r) of them at
   random, r = (s - c) / (1 - c), c the share of entries whose level is exactly zero already.
4. Rescale the kept entries by 1 / (1 - s):  D^_ij = (min + step q_ij) / (1 - s) where kept.
Which entries are kept depends on the values (the level groups), so the positions are stored:
Elias-Fano over the kept positions in row-major order (quant.eliasfano), counted in the budget with
the packed codes and the fp16 min, step and 1 / (1 - s). The paper's headline ratios,
16 / (b (1 - s)), leave the positions out: `stats` records both counts (alpha_without_positions).
Choices of this implementation: s is the smallest sparsity whose stored bits fit the budget
(bisection). The paper sets s per layer from the variance of its delta over the whole model (the
lowest-variance third of the parameters at s + step, the highest-variance third at the rest, the
mean at the target); adamix allocates per tensor, so every tensor gets the budget's s (what the
code gives one matrix alone). The code's last step, a rescale by trace norms across several tasks'
deltas, is 1 for one fine-tune and is left out. The random drops use keys from the delta's seed
(seeded.keys), so the result is deterministic.
Stored: `codes` (uint8, kept codes packed at b bits in position order), `low` and `high` (uint8,
Elias-Fano), `params` (fp16: min, step, 1 / (1 - s)); meta {"bits", "kept"}. A budget below the grid
and one position (or an s whose 1 / (1 - s) exceeds fp16) stores nothing: empty tensors, D^ = 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import AdamixError
from ..quant import eliasfano
from ..quant.linalg import error_stats
from ..quant.pack import pack, packed_nbytes, unpack
from .kinds import Encoded, is_int, register_decoder, register_meta_check
from .registry import Method, Settings, budget_bits, register
from .seeded import keys, seed_for

PARAMS = 3  # fp16 min, step, 1 / (1 - s)
FP16_MAX = 65504.0
DEFAULT_BITS = 4


def total_bits(total: int, kept: int, bits: int) -> int:
    low, high = eliasfano.nbytes(total, kept)
    return 8 * (packed_nbytes(kept, bits) + low + high) + 16 * PARAMS


def quantize_tensor(D: torch.Tensor, bits: int) -> tuple[np.ndarray, float, float]:
    """(codes (m n,) int64, min, step) of the per-tensor min-max grid, min and step rounded to fp16."""
    x = D.reshape(-1).double().numpy()
    lo = float(np.float16(x.min()))
    step = float(np.float16((x.max() - lo) / (2**bits - 1)))
    if step <= 0:
        step = float(np.finfo(np.float16).tiny)
    return np.clip(np.round((x - lo) / step), 0, 2**bits - 1).astype(np.int64), lo, step


def dropped_per_level(counts: np.ndarray, zero_level: int | None, s: float) -> np.ndarray:
    """Entries dropped of each level at sparsity s (step 3); a level whose value is 0 drops all."""
    total = counts.sum()
    c = counts[zero_level] / total if zero_level is not None else 0.0
    r = max(0.0, (s - c) / (1 - c)) if c < 1 else 0.0
    drop = np.round(counts * r).astype(np.int64)
    if zero_level is not None:
        drop[zero_level] = counts[zero_level]  # zeros are zero whether kept or not: never stored
    return np.minimum(drop, counts)


def compress_ultradelta(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float) -> Encoded:
    """UltraDelta on D (m x n) within `budget` bits."""
    m, n = D.shape
    total, bits = m * n, settings.value_bits
    if not 1 <= bits <= 8:
        raise AdamixError(f"ultradelta quantizes at 1..8 bits, not --value-bits {bits}")
    q, lo, step = quantize_tensor(D, bits)
    counts = np.bincount(q, minlength=2**bits)
    zero = next((v for v in range(2**bits) if lo + step * v == 0.0), None)

    def kept_at(s: float) -> int:
        return int(total - dropped_per_level(counts, zero, s).sum())

    lo_s, hi_s = 0.0, 1.0
    if total_bits(total, kept_at(0.0), bits) <= budget:
        hi_s = 0.0
    else:
        for _ in range(60):
            mid = (lo_s + hi_s) / 2
            lo_s, hi_s = (lo_s, mid) if total_bits(total, kept_at(mid), bits) <= budget else (mid, hi_s)
    s = hi_s
    drop = dropped_per_level(counts, zero, s)
    meta = {"bits": bits, "kept": 0}
    if total_bits(total, int(total - drop.sum()), bits) > budget or not 1 / (1 - s) <= FP16_MAX:
        # not one entry fits with the grid, or 1 / (1 - s) is beyond fp16: store nothing (D^ = 0)
        empty = torch.zeros(0, dtype=torch.uint8)
        enc = Encoded("ultradelta", (m, n), meta, {"codes": empty, "low": empty, "high": empty,
                                                   "params": torch.zeros(0, dtype=torch.float16)})
        enc.stats = {"sparsity": 1.0, "alpha_without_positions": 0.0, **error_stats(torch.zeros(m, n), D, H)}
        return enc
    rank = keys(seed_for(D, settings.seed), total)
    order = np.lexsort((rank, q))  # by level, then random within the level
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.arange(total) - np.repeat(starts, counts)
    keep_sorted = within >= np.repeat(drop, counts)
    positions = np.sort(order[keep_sorted])
    low, high = eliasfano.encode(torch.from_numpy(positions), total)
    scale = 1.0 / (1.0 - s)
    tensors = {"codes": pack(torch.from_numpy(q[positions].astype(np.uint8)), bits), "low": low, "high": high,
               "params": torch.tensor([lo, step, scale], dtype=torch.float16)}
    meta["kept"] = int(len(positions))
    enc = Encoded("ultradelta", (m, n), meta, tensors)
    enc.stats = {"sparsity": s, "alpha_without_positions": bits * len(positions) / (16 * total),
                 **error_stats(decode_ultradelta((m, n), meta, tensors), D, H)}
    return enc


@register_meta_check("ultradelta")
def check_meta(shape: tuple[int, ...], meta: dict) -> None:
    b, k = meta.get("bits"), meta.get("kept")
    if len(shape) != 2 or not all(map(is_int, (b, k))) \
            or not 1 <= b <= 8 or not 0 <= k <= shape[0] * shape[1]:
        raise AdamixError(f"malformed ultradelta metadata for shape {list(shape)}: {meta!r}")


@register_decoder("ultradelta", {"codes": "U8", "low": "U8", "high": "U8", "params": "F16"})
def decode_ultradelta(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    check_meta(shape, meta)
    m, n = shape
    b, k = meta["bits"], meta["kept"]
    params = tensors["params"]
    if k == 0 and not any(t.numel() for t in tensors.values()):  # the budget held nothing
        return torch.zeros(m, n)
    if params.dtype != torch.float16 or params.numel() != PARAMS or tensors["codes"].numel() != packed_nbytes(k, b):
        raise AdamixError(f"ultradelta entry for shape {list(shape)}: tensors do not match its metadata")
    try:
        pos = eliasfano.decode(tensors["low"], tensors["high"], m * n, k)
    except ValueError as e:
        raise AdamixError(f"ultradelta entry for shape {list(shape)}: {e}") from None
    lo, step, scale = (float(v) for v in params.float())
    out = torch.zeros(m * n)
    out[pos] = ((lo + step * unpack(tensors["codes"], b, k).double()) * scale).float()
    return out.reshape(m, n)


class UltraDelta(Method):
    name = "ultradelta"
    help = ("ultradelta: UltraDelta, per-tensor min-max quantization at --value-bits (default 4) and value-grouped "
            "random dropping, positions Elias-Fano coded and counted (data-free)")
    unit = "entry"
    options = frozenset({"value_bits"})
    kinds = ("ultradelta",)

    def check(self, settings):
        if not 1 <= bits(settings) <= 8:
            raise AdamixError(f"ultradelta quantizes at 1..8 bits, not --value-bits {settings.value_bits}")

    def item_bits(self, m, n, settings):
        return total_bits(m * n, 1, bits(settings))

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        s = dataclasses.replace(settings, value_bits=bits(settings))
        return compress_ultradelta(D, H, s, budget_bits(*D.shape, settings.alpha, overhead_bits))


def bits(settings: Settings) -> int:
    """--value-bits, or the code's default 4 bits."""
    return DEFAULT_BITS if settings.value_bits is None else settings.value_bits


register(UltraDelta())

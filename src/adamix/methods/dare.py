"""DARE peer (Yu et al., 2024, "Language Models are Super Mario", arXiv 2311.03099), kind "dare":
drop at random and rescale.

A random fraction q of the delta's entries is kept, independently of their values, and rescaled so
that the expected delta is unchanged:

    D^ = (M * D) / q,   M the indicator of k = q m n positions drawn uniformly (seeded.subset).

The paper draws each entry with probability q (a Bernoulli mask); here exactly k entries are drawn,
so that the budget is filled exactly (a choice of this implementation). The positions are
regenerated from the stored seed and cost no bits. The kept values D_ij / q are stored
  - in fp16 (`--value-bits 16`, the default): 16 k bits, q = alpha;
  - or at b bits (`--value-bits b`, 1..8) on asymmetric grids per group of g consecutive kept values
    (quant.grid, round to nearest): b k bits of codes, byte-padded, plus 32 bits per group; q is then
    the largest that fits the budget.
Stored: `codes` (uint8, the packed codes; empty in fp16) and `params` (fp16: the values in fp16,
else scale and offset per group); meta {"seed", "kept", "bits", "group_size"}. Data-free: H only
measures the error.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant.grid import PARAM_BITS, dequantize, expand_groups, fit_grid, n_groups, quantize
from ..quant.linalg import error_stats
from ..quant.pack import pack, packed_nbytes, unpack
from .kinds import MAX_COUNT, Encoded, is_int, register_decoder, register_meta_check
from .registry import Method, Settings, budget_bits, register
from .seeded import seed_for, subset

FP16 = 16


def value_bits(k: int, bits: int, group_size: int) -> int:
    """Stored bits of k values: 16 k in fp16, else the packed b-bit codes plus a grid per group."""
    if bits == FP16:
        return 16 * k
    return 8 * packed_nbytes(k, bits) + PARAM_BITS * n_groups(k, group_size) if k else 0


def kept_count(total: int, budget: float, bits: int, group_size: int) -> int:
    """The largest k <= total whose values fit `budget` bits."""
    per = 16 if bits == FP16 else bits + PARAM_BITS / group_size
    k = min(total, max(0, int(budget // per)))
    while k > 0 and value_bits(k, bits, group_size) > budget:
        k -= 1
    return k


def encode_values(x: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """x (k,) float -> {"codes", "params"} (see the module doc)."""
    if bits == FP16 or len(x) == 0:
        return {"codes": torch.zeros(0, dtype=torch.uint8), "params": x.to(torch.float16)}
    b, g = torch.tensor([bits]), min(group_size, len(x))
    scale, offset = fit_grid(x.reshape(1, -1), b, g)
    codes = quantize(x.reshape(1, -1), expand_groups(scale, len(x), g), expand_groups(offset, len(x), g), b)
    return {"codes": pack(codes.reshape(-1), bits), "params": torch.cat([scale.reshape(-1), offset.reshape(-1)]).to(torch.float16)}


def decode_values(k: int, bits: int, group_size: int, tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The k stored values, float32, after checking the tensors' sizes against (k, bits, group_size)."""
    codes, params = tensors["codes"], tensors["params"]
    want = (0, k) if bits == FP16 else (packed_nbytes(k, bits), 2 * n_groups(k, group_size) if k else 0)
    if codes.dtype != torch.uint8 or params.dtype != torch.float16 or (codes.numel(), params.numel()) != want:
        raise AdamixError(f"{kind} entry stores {codes.numel()} code bytes and {params.numel()} params, "
                          f"its metadata implies {want[0]} and {want[1]}")
    if bits == FP16 or k == 0:
        return params.float()
    g = min(group_size, k)
    G = n_groups(k, g)
    scale, offset = params[:G].float().reshape(1, -1), params[G:].float().reshape(1, -1)
    q = unpack(codes, bits, k).reshape(1, -1)
    return dequantize(q, expand_groups(scale, k, g), expand_groups(offset, k, g)).reshape(-1)


def parse_meta(shape: tuple[int, ...], meta: dict, kind: str) -> tuple[int, int, int, int]:
    """(seed, kept, bits, group_size) from the metadata, validated."""
    try:
        seed, kept, bits, g = (meta[key] for key in ("seed", "kept", "bits", "group_size"))
        if not all(map(is_int, (seed, kept, bits, g))):
            raise TypeError
    except (KeyError, TypeError):
        raise AdamixError(f"malformed {kind} metadata: {meta!r}") from None
    total = shape[0] * shape[1] if len(shape) == 2 else -1
    if not (0 <= seed < 2**63 and 0 <= kept <= total and (bits == FP16 or 1 <= bits <= 8) and 1 <= g <= MAX_COUNT):
        raise AdamixError(f"malformed {kind} metadata for shape {list(shape)}: {meta!r}")
    return seed, kept, bits, g


def compress_dare(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float) -> Encoded:
    """DARE on D (m x n) within `budget` bits."""
    m, n = D.shape
    bits, g = settings.value_bits or FP16, settings.group_size
    k = kept_count(m * n, budget, bits, g)
    seed = seed_for(D, settings.seed)
    idx = subset(seed, m * n, k)
    q = k / (m * n)
    values = D.reshape(-1)[idx].double() / q if k else torch.zeros(0, dtype=torch.float64)
    tensors = encode_values(values.float(), bits, g)
    if not bool(torch.isfinite(tensors["params"]).all()):  # 1 / q beyond fp16 (a budget of a few entries)
        k, tensors = 0, encode_values(torch.zeros(0), bits, g)
    enc = Encoded("dare", (m, n), {"seed": seed, "kept": k, "bits": bits, "group_size": g}, tensors)
    enc.stats = {"kept_fraction": q, **error_stats(decode_dare((m, n), enc.meta, enc.tensors), D, H)}
    return enc


@register_meta_check("dare")
def check_dare_meta(shape: tuple[int, ...], meta: dict) -> None:
    parse_meta(shape, meta, "dare")


@register_decoder("dare", {"codes": "U8", "params": "F16"})
def decode_dare(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    seed, k, bits, g = parse_meta(shape, meta, "dare")
    m, n = shape
    out = torch.zeros(m * n)
    out[subset(seed, m * n, k)] = decode_values(k, bits, g, tensors, "dare")
    return out.reshape(m, n)


class Dare(Method):
    name = "dare"
    help = ("dare: DARE, a seeded random fraction of the delta's entries kept and rescaled by 1/q, in fp16 or at "
            "--value-bits b")
    unit = "entry"
    options = frozenset({"value_bits"})
    kinds = ("dare",)

    def item_bits(self, m, n, settings):
        return value_bits(1, settings.value_bits or FP16, settings.group_size)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_dare(D, H, settings, budget_bits(*D.shape, settings.alpha, overhead_bits))


register(Dare())

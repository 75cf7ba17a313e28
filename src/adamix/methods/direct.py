"""Direct quantization peers, `rtn` and `gptq`: the delta itself quantized, no factorisation.

Each row of D (one output) gets an asymmetric grid per group of g inputs. The width b and group size
g are the widest, then finest, that let every row fit the budget: m (b n + 32 ceil(n/g) + 32) bits
(codes, fp16 scale and offset per group, and the row index of the `rows` kind that stores them).
When not even 1 bit with one group per row fits (alpha below about 1/16), the rows with the most
output energy d_r^T H d_r are kept at 1 bit and the rest dropped. `rtn` rounds to nearest;
`gptq` quantizes the kept rows with GPTQ on H, so later inputs compensate earlier rounding.
"""

from __future__ import annotations

import torch

from ..quant.gptq import gptq_rows
from ..quant.grid import rtn
from ..quant.linalg import error_stats, gram_rows
from .kinds import Encoded
from .registry import Method, Settings, budget_bits, register
from .rows import decode_rows, encode_rows, stored_bits

GROUP_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def plan(m: int, n: int, budget: float) -> tuple[int, int, int]:
    """(bits, group size, rows kept) for a D of m x n within `budget` bits."""
    for b in range(8, 0, -1):
        for g in [g for g in GROUP_SIZES if g < n] + [n]:
            if stored_bits(n, [[b, m]], g) <= budget:
                return b, g, m
    k = min(m, int(budget // (n + 64)))  # 1 bit, one fp16 scale + offset and an index per row
    while k > 0 and stored_bits(n, [[1, k]], n) > budget:
        k -= 1
    return 1, n, max(k, 0)


def compress_direct(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float,
                    use_gptq: bool) -> Encoded:
    """D (m x n) quantized at the width that fits `budget` bits; GPTQ on H if use_gptq and H given."""
    m, n = D.shape
    b, g, k = plan(m, n, budget)
    energy = gram_rows(D, D, H)
    rows = sorted(torch.argsort(energy, descending=True, stable=True)[:k].tolist())
    W = D[rows].float()
    bits = torch.full((len(rows),), b)
    if not rows:  # not one row fits the budget: D^ = 0
        enc = encode_rows((m, n), g, [])
    else:
        q = gptq_rows(W, H, bits, g, damp=settings.damp) if use_gptq and H is not None else rtn(W, bits, g)
        enc = encode_rows((m, n), g, [(b, rows, q)])
    enc.stats = {"rows_kept": len(rows), "bits": b, **error_stats(decode_rows((m, n), enc.meta, enc.tensors), D, H)}
    return enc


class Direct(Method):
    """The delta quantized directly, row by row: round-to-nearest, or GPTQ on H."""
    unit = "row"
    kinds = ("rows",)
    use_gptq = False

    def item_bits(self, m, n, settings):
        return min(stored_bits(n, [[1, 1]], n), stored_bits(m, [[1, 1]], m))

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_direct(D, H, settings, budget_bits(*D.shape, settings.alpha, overhead_bits), self.use_gptq)


class RTN(Direct):
    name = "rtn"
    help = "rtn: the delta quantized directly, round to nearest, at the widest width that fits"


class GPTQ(Direct):
    name = "gptq"
    help = "gptq: the delta quantized directly with GPTQ on H, at the widest width that fits"
    use_gptq = True


register(RTN())
register(GPTQ())

"""Delta-CoMe peer (Ping et al., 2024): mixed precision over singular vectors by a fixed schedule.

Same SVD, grids and mixed-precision GPTQ as ADAMIX; what differs is the choice of widths and the
U step. The triplets, in decreasing order of s_i, get the schedule's widths while the budget lasts:
the first 2 at 8 bits, the next 32 at 3 bits, the rest at 2 bits; where a triplet's width no longer
fits, the narrower schedule widths are tried, and the remainder is dropped. No error table drives
the choice (it is still computed, to report the predicted error). V^ is GPTQ'd on H; U S itself (no
reconstruction target correction) is GPTQ'd on the Gram of V^ x.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .adamix import Analysis, analyse, finish
from .kinds import Encoded
from .registry import Method, Settings, budget_bits, register
from .svd_mixed import stored_bits, width_meta

SCHEDULE = ((8, 2), (3, 32), (2, None))  # (bits, number of triplets); None: all the rest
WIDTHS = (0, 2, 3, 8)


def deltacome_settings(settings: Settings) -> Settings:
    """The peer's own widths and U step, the rest (group size, damping) shared with ADAMIX."""
    return dataclasses.replace(settings, widths=WIDTHS, correct_target=False, whiten=False)


def schedule_widths(r: int, costs: dict[int, float], budget: float, cap: int | None = None) -> list[int]:
    """Width per triplet (r,) under the fixed schedule. costs: bits of one triplet at each width;
    cap: at most this many triplets kept (a rank cap: the schedule stops there)."""
    planned = []
    for bits, count in SCHEDULE:
        planned += [bits] * (r - len(planned) if count is None else min(count, r - len(planned)))
    narrower = sorted({b for b, _ in SCHEDULE}, reverse=True)
    out, left = [], budget
    for want in planned[:r if cap is None else cap]:
        b = next((b for b in narrower if b <= want and costs[b] <= left), 0)
        if b == 0:
            break
        out.append(b)
        left -= costs[b]
    return out + [0] * (r - len(out))


def compress_deltacome(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
                       analysis: Analysis | None = None) -> Encoded:
    """Delta-CoMe on one delta D (m x n) with input Gram H (n x n) or None, within
    budget_bits(m, n, alpha, overhead_bits). analysis: a precomputed adamix.analyse with WIDTHS
    (its budget is replaced by this one)."""
    s = deltacome_settings(settings)
    if analysis is None:
        a = analyse(D, H, s, overhead_bits)
    else:
        a = dataclasses.replace(analysis, budget=budget_bits(*D.shape, settings.alpha, overhead_bits))
    widths = list(s.widths)
    chosen = schedule_widths(len(a.s), dict(zip(widths, a.costs)), a.budget, settings.max_rank)
    choice = np.array([widths.index(b) for b in chosen], dtype=np.int64)
    return finish(a, choice, a.budget, s)


class DeltaCoMe(Method):
    name = "deltacome"
    help = "deltacome: Delta-CoMe, the same SVD and GPTQ, widths by a fixed 8/3/2-bit schedule, no target correction"
    unit = "singular triplet or row"
    options = frozenset({"max_rank", "svd"})
    kinds = ("svd-mixed",)
    device_resident = True

    def item_bits(self, m, n, settings):
        b = min(w for w in WIDTHS if w > 0)
        return stored_bits((m, n), width_meta(settings.group_size, [[b, 1]]))

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_deltacome(D, H, settings, overhead_bits, analysis)


register(DeltaCoMe())

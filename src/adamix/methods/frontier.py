"""The multiple-choice knapsack of the bit allocation, solved exactly by a bounded Pareto frontier.

    max sum_i g_i(o_i)   s.t.  sum_i c_i(o_i) <= B,   one option o_i per item i,

with g_i(o) = e_i(0) - e_i(o), the error that option o removes (0 for the option of cost 0). The same
problem allocate.solve_allocation hands to HiGHS's branch and bound, which at widths of 4096 and
more spends seconds to minutes proving optimality among hundreds of triplets of nearly equal value
per bit. Three exact steps instead:

1. The Lagrangian bound. For a price lam >= 0 of a bit,
       U(lam) = lam B + sum_i max_o (g_i(o) - lam c_i(o))
   bounds every feasible solution from above; lam is found by bisection where the priced choice
   stops fitting (U at that lam is the LP relaxation's value, up to the bisection's last step).
   Its priced choice, filled greedily with the bits left, is the incumbent L.
2. Reduced-cost fixing. Forcing item i to option o lowers the bound by
       d_i(o) = max_o' (g_i(o') - lam c_i(o')) - (g_i(o) - lam c_i(o)),
   so an option with U - d_i(o) < L cannot be part of any solution better than L, and is dropped.
   Most items keep one option: they are fixed.
3. Dynamic programming over the free items: the states (bits spent, gain) after each item, keeping
   only the Pareto frontier (no state with more bits and no more gain) and the states whose bound
   (gain + lam * bits left + the free items' priced maxima still to come) reaches L. The best final
   state, traced back, is optimal.

Comparisons allow a slack of 1e-12 of U (rounding of float64 sums), so "exact" means within that
of the optimum, as HiGHS's own gap tolerance does. When the frontier would exceed `max_states`, the
solver gives up (returns None) and the caller falls back to HiGHS.
"""

from __future__ import annotations

import numpy as np

SLACK = 1e-12


def priced_choice(gains: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """argmax_o g_i(o) - lam c_i(o) per item (r,); ties go to the first option."""
    return np.argmax(gains - lam * costs, axis=1)


def bit_price(gains: np.ndarray, costs: np.ndarray, budget: float, iters: int = 200) -> float:
    """The smallest price lam (to the bisection's resolution) whose priced choice fits the budget."""
    rows = np.arange(len(gains))
    spent = lambda lam: costs[rows, priced_choice(gains, costs, lam)].sum()  # noqa: E731
    if spent(0.0) <= budget:
        return 0.0
    hi = 1.0
    while spent(hi) > budget:
        hi *= 2.0
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if spent(mid) <= budget else (mid, hi)
    return hi


def fill(choice: np.ndarray, gains: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Greedy improvement of a feasible choice: repeatedly take the upgrade (any item to any option of
    more gain) with the most gain per extra bit that still fits, until none fits."""
    choice = choice.copy()
    rows = np.arange(len(gains))
    left = budget - costs[rows, choice].sum()
    while True:
        dg = gains - gains[rows, choice][:, None]
        dc = costs - costs[rows, choice][:, None]
        ok = (dg > 0) & (dc <= left)
        if not ok.any():
            return choice
        with np.errstate(divide="ignore", over="ignore"):  # dc <= 0 where the upgrade is free: set below
            rate = np.where(ok, dg / np.maximum(dc, 1e-300), -np.inf)
        rate[ok & (dc <= 0)] = np.inf  # more gain for no more bits
        i, o = np.unravel_index(np.argmax(rate), rate.shape)
        left -= dc[i, o]
        choice[i] = o


def solve(gains: np.ndarray, costs: np.ndarray, budget: float, max_states: int = 2_000_000,
          stats: dict | None = None) -> np.ndarray | None:
    """Optimal option per item (r,) for gains, costs (r, nb) (costs >= 0, one option of cost 0 per
    item), or None when the frontier grows past max_states. Module doc: the method. stats, if given,
    receives "free" (items left free by the fixing) and "states" (the largest frontier)."""
    gains = np.asarray(gains, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    r = len(gains)
    rows = np.arange(r)
    lam = bit_price(gains, costs, budget)
    priced = gains - lam * costs
    best = priced.max(axis=1)
    upper = lam * budget + best.sum()
    incumbent = fill(priced_choice(gains, costs, lam), gains, costs, budget)
    lower = gains[rows, incumbent].sum()
    slack = SLACK * max(abs(upper), 1e-300)
    allowed = (upper - (best[:, None] - priced)) >= lower - slack
    allowed[rows, incumbent] = True  # the incumbent stays reachable
    free = np.flatnonzero(allowed.sum(axis=1) > 1)
    fixed = np.setdiff1d(rows, free)
    choice = incumbent.copy()
    choice[fixed] = np.argmax(allowed[fixed], axis=1)
    room = budget - costs[fixed, choice[fixed]].sum()
    base_gain = gains[fixed, choice[fixed]].sum()
    if stats is not None:
        stats.update(free=len(free), states=1)
    if len(free) == 0:
        return choice if room >= 0 else None
    # states: bits spent and gain of the free items decided so far; back-pointers per item
    spent, gain = np.zeros(1), np.zeros(1)
    rest = best[free][::-1].cumsum()[::-1]  # priced maxima of the free items from t on
    trail = []
    for t, i in enumerate(free):
        opts = np.flatnonzero(allowed[i])
        s = (spent[:, None] + costs[i, opts][None, :]).ravel()
        g = (gain[:, None] + gains[i, opts][None, :]).ravel()
        parent = np.repeat(np.arange(len(spent)), len(opts))
        option = np.tile(opts, len(spent))
        after = rest[t + 1] if t + 1 < len(free) else 0.0
        keep = (s <= room) & (base_gain + g + lam * (room - s) + after >= lower - slack)
        s, g, parent, option = s[keep], g[keep], parent[keep], option[keep]
        order = np.lexsort((-g, s))  # bits ascending, gain descending
        s, g, parent, option = s[order], g[order], parent[order], option[order]
        front = np.ones(len(g), dtype=bool)
        if len(g) > 1:
            front[1:] = g[1:] > np.maximum.accumulate(g)[:-1]  # strictly more gain than every cheaper state
        s, g, parent, option = s[front], g[front], parent[front], option[front]
        if len(s) == 0:  # cannot happen with the incumbent reachable; give the caller the incumbent
            return incumbent
        if stats is not None:
            stats["states"] = max(stats["states"], len(s))
        if len(s) > max_states:
            return None
        trail.append((parent, option))
        spent, gain = s, g
    k = int(np.argmax(gain))
    if base_gain + gain[k] < lower - slack:
        return incumbent
    for (parent, option), i in zip(reversed(trail), free[::-1]):
        choice[i] = option[k]
        k = parent[k]
    return choice

"""Bit allocation over singular triplets: the measured error table and the exact 0/1 ILP.

For D = U S V^T (m x n) and an input Gram H (n x n; None means H = I, the data-free mode), the error
of keeping triplet i at width b (u_i, v_i rounded to their b-bit grids, u^_i, v^_i) is

    e_i(b) = s_i^2 ( |u|^2 v^T H v - 2 (u . u^)(v^T H v^) + |u^|^2 v^^T H v^ ),   e_i(0) = s_i^2 v^T H v,

which is exactly ||s_i (u v^T - u^ v^^T) X||_F^2 for the rank-1 term (cross terms neglected); it is
computed in the equivalent form of error_table's docstring.
The choice x_ib in {0, 1} solves the multiple-choice knapsack

    min sum_ib e_i(b) x_ib   s.t.  sum_b x_ib = 1 (each i),  sum_ib cost_b x_ib <= budget
                                   [sum_{i in g, b > 0} x_ib <= R for each matrix g: a rank cap]

exactly: by the bounded Pareto frontier of methods.frontier (Lagrangian bound, reduced-cost fixing,
dynamic programming over the items left free), or, with a rank cap or where that frontier grows too
large, by scipy.optimize.milp (HiGHS branch and bound).
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from typing import Callable

from . import frontier
from ..quant import normal
from ..quant.gptq import gptq_rows, shared_factor
from ..quant.grid import dequantize, expand_groups
from ..quant.linalg import gram_rows
from ..timing import timed


def max_kept(costs: np.ndarray, budget: float) -> int:
    """How many triplets can be kept at most: floor(budget / cheapest non-zero cost)."""
    costs = np.asarray(costs, dtype=np.float64)
    return int(max(budget, 0.0) // costs[costs > 0].min())


def keep_threshold(table: np.ndarray | torch.Tensor, zero: int, kept: int) -> float:
    """T such that some optimal choice drops every triplet with e_i(0) < T (costs equal for all rows).

    g_i = e_i(0) - max_{b>0} e_i(b) is the least error that keeping triplet i removes, at any width;
    T is the `kept`-th largest g_i (-inf if there are fewer rows). Swap argument: at most `kept`
    triplets fit, so if j with e_j(0) < T is kept at width b, one of the `kept` rows with g_i >= T is
    not; keeping i at width b instead costs the same bits and changes the error by
    gain_j(b) - gain_i(b) <= e_j(0) - g_i < 0. Rows whose widths were not measured (error_table's
    max_kept) hold e_i(b) = e_i(0), g_i = 0, and are below T whenever T > 0.
    """
    table = np.asarray(table, dtype=np.float64)
    if kept <= 0 or kept > table.shape[0]:
        return -np.inf if kept > table.shape[0] else np.inf
    others = np.delete(table, zero, axis=1)
    g = table[:, zero] - others.max(axis=1) if others.shape[1] else np.zeros(table.shape[0])
    return float(np.partition(g, -kept)[-kept])


@timed("error table")
def error_table(s: torch.Tensor, U: torch.Tensor, V: torch.Tensor, H: torch.Tensor | None,
                widths: list[int], group_size: int, chunk: int = 64, max_kept: int | None = None,
                damp: float = 0.01, codes: dict | None = None, grid: str = "uniform",
                costs: np.ndarray | None = None, budget: float | None = None,
                e0: torch.Tensor | None = None,
                grow: Callable[[int], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """e_i(b) for every triplet i and width b. s: (r,), U: (m, r), V: (n, r). Returns (r, len(widths)) float64.

    With the rounding errors du = u^ - u, dv = v^ - v, the residual is u v^T - u^ v^^T = -(u dv^T + du v^^T), so

        e_i(b) / s_i^2 = |u|^2 dv^T H dv + 2 (u . du) dv^T H v^ + |du|^2 v^^T H v^,

    a sum of small terms, not a difference of large ones: exact enough with H's float32 products
    (linalg.gram_rows). One product with H per triplet (v H); dv^T H dv comes from GPTQ's column
    errors (quant.gptq.quant_error; without a Gram, |dv|^2). Triplets in chunks of `chunk`: the work
    memory is a few chunk x n blocks, whatever the rank.

    v^ is what will be stored: v at width b by GPTQ on H with damping `damp` (quant.gptq.gptq_rows,
    whose rows are independent of each other, so the row of triplet i at width b is the same whichever
    triplets are quantized beside it, up to the rounding of the BLAS updates), or by RTN without a
    Gram. u^ is u by RTN: the U step re-fits U and quantizes it on another Gram, which the table
    cannot know. codes: a dict to receive the GPTQ
    codes and grids of every measured row at every width ({b: {"rows", "codes", "scale", "offset"}}),
    which the V step then reuses instead of quantizing V again. grid: "uniform" (quant.grid: per group
    of `group_size` entries) or "normal" (quant.normal: one scale per vector), for u^ and v^ alike.

    max_kept (at most that many triplets fit the budget, all at the same cost per width): triplets
    are measured in order of decreasing e_i(0) until the next one's e_i(0) is below
    keep_threshold (the swap argument: no optimal choice needs the rest, at this budget or any
    smaller one), or, given the per-width `costs` (B,) and the `budget` itself, until priced_out
    proves by the Lagrangian bound that no optimal choice at this budget needs them; the rest keep
    e_i(0) at every width (no gain), unmeasured. One extra pass (v H for all) gives the order; the
    rows are measured in batches, the first max_kept at once, then max_kept / 8, doubling each time
    (measuring a few rows more than needed costs flops; each batch costs GPTQ column loops). The
    smaller the ratio and the steeper the spectrum, the fewer rows are measured
    (benchmarks/pruning.py; docs/results/); a flat spectrum (noise) needs nearly all. The measured
    rows equal the full table's (GPTQ's rows are independent of each other), to the rounding of its
    float32 products. e0: e_i(0) (r,) if the caller has it (linalg.whitened_svd's, without the pass
    over H that gives the order otherwise), or an upper bound of it (linalg.Spectrum.bound: the
    certificates stay exact, and each measured row gets its own e_i(0) from its product with H).

    grow: given, U, s, V may hold only the leading triplets of the r = len(e0) (a truncated SVD,
    linalg.Spectrum), and grow(k) returns U, s, V of the leading k (at least) when the rows to
    measure reach beyond them: only the vectors of the measured triplets are ever computed.
    """
    r, zero = (len(s) if e0 is None else len(e0)), widths.index(0) if 0 in widths else None
    factors = [U, s, V]  # the triplets with vectors so far

    def rows_of(rows: torch.Tensor) -> torch.Tensor:
        if len(rows) and int(rows.max()) >= factors[0].shape[1]:
            factors[:] = grow(int(rows.max()) + 1)[:3]
        U_, s_, V_ = factors
        vq = VQuantizer(V_, H, widths, group_size, damp, codes, grid)  # its factor of H^-1: gptq.shared_factor's
        return _table_rows(s_.double() ** 2, U_, V_, H, widths, group_size, rows, chunk, vq)

    if max_kept is None or zero is None:
        return rows_of(torch.arange(r))
    if e0 is None:
        s2 = s.double() ** 2
        e0 = torch.cat([s2[i:i + chunk] * gram_rows(V[:, i:i + chunk].T, V[:, i:i + chunk].T, H)
                        for i in range(0, r, chunk)])
    e0 = e0.to(device=s.device, dtype=torch.float64)
    order = torch.argsort(e0, descending=True, stable=True)
    table = e0[:, None].repeat(1, len(widths))
    # the first max_kept rows at once, then batches of max_kept / 8 that double: each batch is one GPTQ
    # call per GPTQ_ROWS rows, whose column loop is the cost on a GPU
    done, size = 0, max(chunk, -(-max_kept // chunk) * chunk)
    extra = max(chunk, max_kept // 8 // chunk * chunk)
    while done < r:
        if done > 0:
            # e_i(0) of the next row, with a margin for the rounding of its float32 products (or of e0's)
            measured, below = table[order[:done]].cpu().numpy(), float(e0[order[done]]) * (1 + E0_MARGIN)
            if below < keep_threshold(measured, zero, max_kept) or (
                    budget is not None and priced_out(measured, zero, costs, budget, below)):
                break
            size, extra = extra, 2 * extra
        rows = order[done:done + size]
        table[rows] = rows_of(rows)
        done += len(rows)
    return table


def priced_out(measured: np.ndarray, zero: int, costs: np.ndarray, budget: float, below: float) -> bool:
    """Whether no optimal choice within `budget` keeps a triplet outside `measured` (k, B) whose
    e_j(0) is at most `below` (costs (B,) per width, equal for all rows, cost 0 at column `zero`).

    With gains g_i(b) = e_i(0) - e_i(b) of the measured rows and a price lam per bit
    (frontier.bit_price), every choice gains at most U = lam budget + sum_i max_b (g_i(b) - lam c_b)
    plus, for each triplet j outside, max(0, g_j(b) - lam c_b) <= max(0, e_j(0) - lam c_min) = 0 when
    e_j(0) <= below < lam c_min. Keeping such a j at width b lowers that bound by lam c_b - g_j(b) >=
    lam c_min - e_j(0). The best choice among the measured rows (frontier.solve, else frontier.fill
    of the priced choice) gains L. So if below < lam c_min - (U - L), every choice keeping a triplet
    outside gains less than L, and the optimum is one among the measured rows (at this budget: a
    smaller one has its own price; keep_threshold's swap argument serves any smaller budget)."""
    gains = measured[:, [zero]] - measured
    C = np.broadcast_to(np.asarray(costs, dtype=np.float64), gains.shape)
    lam = frontier.bit_price(gains, C, budget)
    upper = lam * budget + (gains - lam * C).max(axis=1).sum()
    choice = frontier.solve(gains, C, budget)
    if choice is None:
        choice = frontier.fill(frontier.priced_choice(gains, C, lam), gains, C, budget)
    lower = gains[np.arange(len(gains)), choice].sum()
    cheapest = float(C[0][C[0] > 0].min())
    return below < lam * cheapest - (upper - lower) - frontier.SLACK * max(abs(upper), 1e-300)


def served_count(table: np.ndarray, zero: int) -> int:
    """How many triplets a pruned table serves by the swap argument (keep_threshold): any budget (and
    rank cap) under which at most this many triplets fit has the full table's optimum. The rows left
    unmeasured hold e_i(0) at every width (g_i = 0); the count is that of the rows whose least gain
    g_i exceeds the largest e_j(0) among them (every row when all were measured)."""
    table = np.asarray(table, dtype=np.float64)
    others = np.delete(table, zero, axis=1)
    if others.shape[1] == 0:
        return table.shape[0]
    g = table[:, zero] - others.max(axis=1)
    flat = (others == table[:, [zero]]).all(axis=1)  # unmeasured (or a row that gains nothing at any width)
    if not flat.any():
        return table.shape[0]
    return int((g > table[flat, zero].max()).sum())


E0_MARGIN = 1e-4  # relative: the certificates compare e_i(0) of rows not measured with the measured rows' gains
GPTQ_ROWS = 2048  # rows per GPTQ call of the error table on the CPU (all widths of GPTQ_ROWS / widths triplets)


class VQuantizer:
    """The error table's v^: rows of V^T quantized at every non-zero width, as the V step stores them
    (GPTQ on H, or RTN without a Gram); codes and grids kept in `codes` (error_table) if given."""

    def __init__(self, V: torch.Tensor, H: torch.Tensor | None, widths: list[int], group_size: int, damp: float,
                 codes: dict | None, grid: str = "uniform"):
        self.V, self.H, self.g, self.damp, self.codes, self.grid = V, H, group_size, damp, codes, grid
        self.widths = [b for b in widths if b > 0]
        self.factor = None  # gptq.shared_factor(H, damp) at the first call that needs it (made once per Gram)

    def __call__(self, rows: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """{b: {"codes" (len(rows), n) uint8, "scale", "offset" (len(rows), G)[, "error" (len(rows),)]}}
        (grid "normal": "scale" (len(rows),) and "bits" (len(rows),) instead of the per-group grids)
        for the rows `rows` of V^T (v^ = dequantized(...), a chunk at a time: the float32 v^ of every
        row and width at once would be the table's largest buffer); with a Gram, "error" is
        dv^T H dv from GPTQ's own column errors (gptq_rows' with_error), no product with H."""
        v = self.V[:, rows].T.float()
        if self.H is None:
            out = {}
            for b in self.widths:
                full = torch.full((len(rows),), b, device=v.device)
                q = {**normal.rtn_on(self.grid, v, full, self.g), "bits": full}
                out[b] = {key: q[key] for key in GRID_KEYS[self.grid]}
            return out
        if self.factor is None:
            self.factor = shared_factor(self.H, self.damp)
        parts = {b: [] for b in self.widths}
        # a GPU's GPTQ time is its column loop's kernel launches: one call for all rows; the CPU's, flops
        step = len(rows) if v.is_cuda else max(1, GPTQ_ROWS // len(self.widths))
        for i in range(0, len(rows), step):
            block = v[i:i + step]
            k = len(block)
            bits = torch.tensor(self.widths, device=v.device).repeat_interleave(k)
            q = gptq_rows(block.repeat(len(self.widths), 1), self.H, bits, self.g, self.damp, self.factor,
                          with_error=True, grid=self.grid)
            if self.grid == "normal":
                q["bits"] = bits
            keys = [*GRID_KEYS[self.grid], "error"]
            for j, b in enumerate(self.widths):  # not deq: v^ is dequantized a chunk at a time
                parts[b].append({key: q[key][j * k:(j + 1) * k] for key in keys})
            del q
        out = {}
        for b, pieces in parts.items():
            out[b] = {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}
            if self.codes is not None:
                self.codes.setdefault(b, []).append({**out[b], "rows": rows.to(v.device)})
        return out


GRID_KEYS = {"uniform": ("codes", "scale", "offset"), "normal": ("codes", "scale", "bits")}  # a quantized row's grid


def dequantized(q: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """v^ (k, n) float32 from codes (k, n) and per-group scale, offset (k, G), as gptq_rows' deq
    (or, without an offset, quant.normal's grid: scale (k,) at widths bits (k,))."""
    if "offset" not in q:
        return normal.dequantize(q["codes"], q["scale"], q["bits"])
    n = q["codes"].shape[1]
    g = min(group_size, n)
    return dequantize(q["codes"], expand_groups(q["scale"], n, g), expand_groups(q["offset"], n, g))


def stored_rows(codes: dict | None, rows: list[int], widths: list[int], group_size: int) -> dict[str, torch.Tensor] | None:
    """The V step's GPTQ result for the V^T rows `rows` at `widths` (one width each), gathered from
    what error_table kept in `codes`: {"codes", "scale", "offset", "deq"} as gptq_rows returns them;
    None if a row was not measured at its width (or nothing was kept)."""
    if not codes or not rows:
        return None
    merged = {}
    for b, parts in codes.items():
        cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        merged[b] = (cat, {i: j for j, i in enumerate(cat["rows"].tolist())})
    picked = []
    for i, b in zip(rows, widths):
        if b not in merged or i not in merged[b][1]:
            return None
        picked.append((merged[b][0], merged[b][1][i]))
    keys = [key for key in picked[0][0] if key not in ("rows", "error")]
    out = {key: torch.stack([cat[key][j] for cat, j in picked]) for key in keys}
    deq = dequantized(out, group_size)
    out.pop("bits", None)
    return {**out, "deq": deq}


def _table_rows(s2: torch.Tensor, U: torch.Tensor, V: torch.Tensor, H: torch.Tensor | None, widths: list[int],
                group_size: int, rows: torch.Tensor, chunk: int, vq: VQuantizer) -> torch.Tensor:
    """error_table's rows `rows` (in that order), `chunk` triplets at a time; (len(rows), len(widths))."""
    dtype = H.dtype if H is not None else torch.float64
    out = torch.zeros(len(rows), len(widths), dtype=torch.float64, device=U.device)
    vhat = vq(rows)
    for i in range(0, len(rows), chunk):
        idx = rows[i:i + chunk]
        u, v = U[:, idx].T.double(), V[:, idx].T.double()  # (c, m), (c, n)
        vH = (v.to(dtype) if H is None else v.to(dtype) @ H).double()
        vHv = (vH * v).sum(1)
        uu = (u * u).sum(1)
        for j, b in enumerate(widths):
            if b == 0:
                out[i:i + chunk, j] = s2[idx] * vHv
                continue
            full = torch.full((len(idx),), b, device=U.device)
            du = normal.rtn_on(vq.grid, u, full, group_size)["deq"].double() - u
            q = {key: t[i:i + chunk] for key, t in vhat[b].items()}
            dv = dequantized(q, group_size).double() - v
            dHd, dHv = q["error"] if "error" in q else gram_rows(dv, dv, H), (vH * dv).sum(1)
            e = uu * dHd + 2 * (u * du).sum(1) * (dHv + dHd) + (du * du).sum(1) * (vHv + 2 * dHv + dHd)
            out[i:i + chunk, j] = s2[idx] * e.clamp_min(0)
    return out


def solve_allocation(errors: np.ndarray, costs: np.ndarray, budget: float, time_limit: float = 60.0,
                     cap: int | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Exact multiple-choice knapsack (frontier.solve, else HiGHS's MILP). errors: (r, B); costs: (B,) or (r, B), a zero cost in
    every row (width 0). cap: at most this many rows of each group kept at a width of non-zero cost
    (groups: (r,) a group id per row, e.g. the matrix a triplet belongs to; None: one group).

    Returns the chosen column index per row (r,) int. The budget and the cap are never exceeded.
    """
    errors = np.asarray(errors, dtype=np.float64)
    r, nb = errors.shape
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), (r, nb))
    if r == 0:
        return np.zeros(0, dtype=np.int64)
    if costs.min(axis=1).sum() > budget:
        raise ValueError("no width fits the budget, not even width 0")
    groups = np.zeros(r, dtype=np.int64) if groups is None else np.asarray(groups)
    zero = np.flatnonzero(costs[0] == 0)
    if len(zero) and (costs == costs[0]).all() and (costs[0] > 0).any() and (cap is None or (groups == groups[0]).all()):
        # exact reduction (keep_threshold): triplets that no optimal choice needs stay at width 0; a
        # cap on the one group only lowers how many can be kept (the swap argument keeps the count)
        kept = max_kept(costs[0], budget) if cap is None else min(max_kept(costs[0], budget), cap)
        live = errors[:, zero[0]] >= keep_threshold(errors, int(zero[0]), kept)
        if not live.all():
            choice = np.full(r, int(zero[0]))
            if live.any():
                choice[live] = solve_allocation(errors[live], costs[0], budget, time_limit, cap, groups[live])
            return choice
    if cap is None:  # the exact frontier (methods.frontier); HiGHS where its frontier grows too large
        zero_cols = costs.argmin(axis=1)
        choice = frontier.solve(errors[np.arange(r), zero_cols][:, None] - errors, costs, budget)
        if choice is not None:
            return choice
    # HiGHS stops within an absolute gap of 1e-6 that milp cannot change: scale the objective up so
    # that gap is negligible (1e-13 of the largest error) and the answer exact for practical purposes.
    scale = 1e-7 * errors.max() if errors.max() > 0 else 1.0
    c = (errors / scale).reshape(-1)
    rows = np.repeat(np.arange(r), nb)
    one_each = csr_matrix((np.ones(r * nb), (rows, np.arange(r * nb))), shape=(r, r * nb))
    cost_row = costs.reshape(1, -1)
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost_row, -np.inf, budget)]
    if cap is not None:  # per group: the count of rows at a width that costs bits
        ids, g = np.unique(groups, return_inverse=True)
        counted = (costs > 0).reshape(-1)
        cols = np.arange(r * nb)[counted]
        per_group = csr_matrix((np.ones(len(cols)), (g[rows[counted]], cols)), shape=(len(ids), r * nb))
        constraints.append(LinearConstraint(per_group, -np.inf, cap))
    with native_stdout_silenced():
        res = milp(
            c,
            constraints=constraints,
            integrality=np.ones(r * nb),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit},
        )
    if res.x is None:
        raise RuntimeError(f"bit allocation MILP failed: {res.message}")
    choice = np.asarray(res.x).reshape(r, nb).argmax(axis=1)
    # Guard against solver tolerance: drop the least valuable kept triplets until the budget (and cap) hold.
    return shrink_to_fit(choice, errors, costs.argmin(axis=1),
                         lambda c: costs[np.arange(r), c].sum() <= budget and within_cap(c, costs, cap, groups))


def within_cap(choice: np.ndarray, costs: np.ndarray, cap: int | None, groups: np.ndarray | None = None) -> bool:
    """Whether no group keeps more than `cap` rows at a width of non-zero cost (True without a cap)."""
    if cap is None:
        return True
    costs = np.broadcast_to(costs, (len(choice), np.shape(costs)[-1]))
    kept = costs[np.arange(len(choice)), choice] > 0
    groups = np.zeros(len(choice), dtype=np.int64) if groups is None else np.asarray(groups)
    _, counts = np.unique(groups[kept], return_counts=True)
    return int(counts.max(initial=0)) <= cap


@contextlib.contextmanager
def native_stdout_silenced():
    """File descriptor 1 pointed at /dev/null for the block: HiGHS (inside scipy's milp) prints debug
    lines such as "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();" from
    C++ straight to it, whatever milp's `disp` says. Python's own stdout is flushed first."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptor 1 to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def shrink_to_fit(choice: np.ndarray, errors: np.ndarray, floor: int | np.ndarray,
                  fits: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Move the kept item that costs least error, errors[i, floor_i] - errors[i, choice_i], down to
    its floor width (floor: a width index, or one per item) until fits(choice); a new array."""
    choice = np.array(choice, copy=True)
    floor = np.broadcast_to(np.asarray(floor), choice.shape)
    while not fits(choice):
        kept = np.flatnonzero(choice != floor)
        i = kept[np.argmin(errors[kept, floor[kept]] - errors[kept, choice[kept]])]
        choice[i] = floor[i]
    return choice


def greedy_allocation(errors: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Multiple-choice knapsack by the LP-relaxation greedy (Sinha & Zoltners): for instances with tens
    of thousands of items, where the exact MILP takes minutes. Deterministic.

    Each item's widths on the lower convex hull of (cost, error) give upgrade steps of decreasing
    efficiency (error removed per bit); steps of all items are taken in order of efficiency while
    they fit. The LP optimum differs from this in at most one item. errors (r, B); costs (B,).
    """
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    r, nb = errors.shape
    order = np.argsort(costs, kind="stable")
    choice = np.full(r, order[0])
    steps = []  # (efficiency, item, step number, width index, extra cost)
    for i in range(r):
        hull = [order[0]]
        for b in order[1:]:
            if errors[i, b] >= errors[i, hull[-1]]:
                continue
            while len(hull) >= 2:
                a, c = hull[-2], hull[-1]
                # c is not on the lower hull if the slope a->b is at least as steep as a->c
                if (errors[i, a] - errors[i, b]) * (costs[c] - costs[a]) >= (errors[i, a] - errors[i, c]) * (costs[b] - costs[a]):
                    hull.pop()
                else:
                    break
            hull.append(b)
        for k in range(1, len(hull)):
            dc = costs[hull[k]] - costs[hull[k - 1]]
            steps.append(((errors[i, hull[k - 1]] - errors[i, hull[k]]) / dc, i, k, hull[k], dc))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    spent = costs[order[0]] * r
    blocked = np.zeros(r, dtype=bool)
    for _, i, _, b, dc in steps:
        if blocked[i]:
            continue
        if spent + dc <= budget:
            choice[i] = b
            spent += dc
        else:
            blocked[i] = True  # later steps of this item would skip one: stop upgrading it
    return choice


@timed("ilp")
def choose_widths(errors: np.ndarray, costs: np.ndarray, budget: float, solver=solve_allocation,
                  cap: int | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """`solver`'s choice, or width 0 for every item when not even the cheapest non-zero width fits
    (or the cap is 0). costs: (B,) or (r, B), with cost 0 at the width-0 column. cap, groups: a rank
    cap (solve_allocation); passed only when set."""
    costs = np.asarray(costs, dtype=np.float64)
    if budget < costs[costs > 0].min() or cap == 0:
        return np.broadcast_to(costs, np.shape(errors)).argmin(axis=1)
    if cap is None:
        return solver(errors, costs, budget)
    return solver(errors, costs, budget, cap=cap, groups=groups)

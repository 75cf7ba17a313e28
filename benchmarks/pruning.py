"""How much of the error table and of the MILP the exact pruning skips, on a real pair (issue 5).

    python benchmarks/pruning.py [--pair minilm|smollm] [--blocks N] [--samples 32]

For every calibrated linear (Grams from --samples windows of lee_background.cor): the full error
table, and the pruned one at each ratio, by the swap argument alone (allocate.error_table's
max_kept; allocate.keep_threshold) and with the price certificate too (the budget given;
allocate.priced_out). Reported per ratio: the share of triplets measured by each, the seconds of
the tables, the seconds of solve_allocation on the full table with and without its reduction, and
the largest relative difference of the optimum (0: the pruning is exact). Writes
docs/results/pruning_<pair>.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

sys.path.insert(0, str(Path(__file__).parent))

from adamix.methods.allocate import error_table, max_kept, solve_allocation
from adamix.methods.svd_mixed import triplet_bits as triplet_cost  # noqa: E402
from calibrated import calibrated_deltas, pair_paths  # noqa: E402
from adamix.quant.linalg import svd  # noqa: E402
from adamix.methods.adamix import budget_bits  # noqa: E402
from adamix.methods import Settings  # noqa: E402

RATIOS = ("1/8", "1/16", "1/32", "1/64")


def plain_milp(errors: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """solve_allocation's MILP without its reduction (the reference for time and optimum)."""
    r, nb = errors.shape
    scale = 1e-7 * errors.max() if errors.max() > 0 else 1.0
    rows = np.repeat(np.arange(r), nb)
    one_each = csr_matrix((np.ones(r * nb), (rows, np.arange(r * nb))), shape=(r, r * nb))
    res = milp((errors / scale).reshape(-1), integrality=np.ones(r * nb), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(np.tile(costs, r)[None], -np.inf, budget)],
               options={"mip_rel_gap": 0.0, "time_limit": 60.0})
    return np.asarray(res.x).reshape(r, nb).argmax(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="minilm", choices=("minilm", "smollm"))
    ap.add_argument("--blocks", type=int, default=0, help="only the first N blocks (0 = all)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    from peers import git_commit
    base, ft = pair_paths(args.pair)
    commit = git_commit()
    s = Settings()
    widths = list(s.widths)
    stats = {a: {"measured": 0, "priced": 0, "rows": 0, "pruned_s": 0.0, "priced_s": 0.0, "milp_s": 0.0,
                 "reduced_s": 0.0, "worst": 0.0, "worst_priced": 0.0} for a in RATIOS}
    full_s, matrices = 0.0, 0
    for _, name, D, H in calibrated_deltas(base, ft, args.samples, args.blocks):
        m, n = D.shape
        U, sv, V = svd(D, H, s.whiten)
        costs = np.array([triplet_cost(m, n, b, s.group_size) for b in widths], dtype=np.float64)
        t = time.perf_counter()
        full = error_table(sv, U, V, H, widths, s.group_size).numpy()
        full_s += time.perf_counter() - t
        matrices += 1
        for a in RATIOS:
            budget = budget_bits(m, n, float(Fraction(a)))
            st = stats[a]
            t = time.perf_counter()
            pruned = error_table(sv, U, V, H, widths, s.group_size, max_kept=max_kept(costs, budget)).numpy()
            st["pruned_s"] += time.perf_counter() - t
            st["measured"] += int((pruned[:, 1:] != pruned[:, :1]).any(axis=1).sum())
            st["rows"] += len(sv)
            t = time.perf_counter()
            priced = error_table(sv, U, V, H, widths, s.group_size, max_kept=max_kept(costs, budget),
                                 costs=costs, budget=budget).numpy()
            st["priced_s"] += time.perf_counter() - t
            st["priced"] += int((priced[:, 1:] != priced[:, :1]).any(axis=1).sum())
            t = time.perf_counter()
            ref = plain_milp(full, costs, budget)
            st["milp_s"] += time.perf_counter() - t
            t = time.perf_counter()
            got = solve_allocation(pruned, costs, budget)
            st["reduced_s"] += time.perf_counter() - t
            best, mine, mine_priced = (float(full[np.arange(len(sv)), c].sum())
                                       for c in (ref, got, solve_allocation(priced, costs, budget)))
            st["worst"] = max(st["worst"], (mine - best) / best if best > 0 else 0.0)
            st["worst_priced"] = max(st["worst_priced"], (mine_priced - best) / best if best > 0 else 0.0)
        print(f"{name} done", flush=True)
    lines = [f"# Exact pruning of the error table and the MILP: {args.pair}", "",
             f"Produced by `python benchmarks/pruning.py --pair {args.pair}"
             + (f" --blocks {args.blocks}" if args.blocks else "") + f" --samples {args.samples}` at commit `{commit}`, CPU; "
             f"{matrices} calibrated matrices; the full error table took {full_s:.1f} s in all.", "",
             "| ratio | triplets measured: swap | swap or price | pruned table s: swap | swap or price | "
             "MILP s (full table) | MILP s (reduced) | optimum vs full, worst: swap | swap or price |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, st in stats.items():
        lines.append(f"| {a} | {st['measured'] / st['rows']:.0%} | {st['priced'] / st['rows']:.0%} | "
                     f"{st['pruned_s']:.1f} | {st['priced_s']:.1f} | {st['milp_s']:.1f} | "
                     f"{st['reduced_s']:.1f} | {st['worst']:+.1e} | {st['worst_priced']:+.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pruning_{args.pair}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

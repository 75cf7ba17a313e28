"""The allocation's knapsack: the exact frontier solver against HiGHS's branch and bound, per matrix.

    python benchmarks/ilp_solver.py [--hidden 4096 --intermediate 11008 --heads 32] [--ratio 1/16]
                                    [--samples 32] [--seqlen 256] [--work DIR] [--out docs/results]

On block 0 of bounded_memory.py's synthetic Llama-shaped pair (calibrated on gpu_check.py's seeded
synthetic text, so that it needs no gensim), each of the seven linears is analysed as the pipeline
does (SVD, pruned error table, budget), then its knapsack is solved twice: by
`allocate.solve_allocation` (the frontier, methods/frontier.py) and by the same function with the
frontier switched off (HiGHS's MILP, 60 s time limit). Reports the seconds of each, how many
triplets the frontier left free after reduced-cost fixing, and the difference of the objectives
relative to the error left (0: the same optimum). Writes docs/results/ilp_solver_<hidden>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import bounded_memory as bm
    import gpu_check
    from peers import git_commit
    from transformers import AutoTokenizer

    from adamix.compression.calibrate import BlockRunner, token_windows
    from adamix.compression.plan import delta_of
    from adamix.io.checkpoint import Checkpoint
    from adamix.methods import Settings, allocate, frontier
    from adamix.methods.adamix import analyse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ratio", default="1/16")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "ilp"))
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    calib = gpu_check.synthetic_text(work / "calib.txt", 0)
    bm.set_shape(args.hidden, args.intermediate, args.heads)
    base, ft = bm.write_pair(work, 1, calib)
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    windows = token_windows(calib.read_text(), AutoTokenizer.from_pretrained(ft), args.samples, args.seqlen)
    _, infos, grams = next(BlockRunner(ft_ck, windows).run())
    settings = Settings(alpha=float(Fraction(args.ratio)))
    solve = frontier.solve
    seen: dict = {}
    rows = []
    for info in infos:
        D = delta_of(base_ck, ft_ck, info.name)
        a = analyse(D.T if info.transposed else D, grams[info.name], settings, 0.0, prune=True)
        seen.clear()
        frontier.solve = lambda g, c, b: solve(g, c, b, stats=seen)
        t = time.perf_counter()
        mine = allocate.choose_widths(a.table, a.costs, a.budget)
        t_frontier = time.perf_counter() - t
        frontier.solve = lambda *x, **k: None
        t = time.perf_counter()
        highs = allocate.choose_widths(a.table, a.costs, a.budget)
        t_highs = time.perf_counter() - t
        frontier.solve = solve
        r = np.arange(len(a.table))
        left = float(a.table[r, highs].sum())
        row = {"name": info.name.split("layers.0.")[-1], "shape": list(D.shape), "triplets": len(a.table),
               "free": seen.get("free", 0), "states": seen.get("states", 0), "frontier_s": round(t_frontier, 3), "highs_s": round(t_highs, 2),
               "objective_difference": (float(a.table[r, mine].sum()) - left) / left,
               "kept": int((mine != list(settings.widths).index(0)).sum())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    recorded = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths of this machine in the results
    result = {"commit": git_commit(), "args": recorded, "rows": rows}
    stem = f"ilp_solver_{args.hidden}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The allocation's knapsack: frontier against HiGHS (hidden {args.hidden}, intermediate "
             f"{args.intermediate})", "",
             f"Produced by `python benchmarks/ilp_solver.py {' '.join(sys.argv[1:])}` at commit `{result['commit']}`, "
             f"CPU; block 0 of the synthetic Llama-shaped pair, calibrated on a seeded synthetic text ({args.samples} x "
             f"{args.seqlen} tokens), adamix at {args.ratio}. HiGHS: `scipy.optimize.milp`, 60 s time limit. "
             "Objective difference: (frontier - HiGHS) / HiGHS in the error left; negative where HiGHS stopped at "
             "its time limit short of the optimum.", "",
             "| linear | shape | triplets | left free after fixing | largest frontier | kept | frontier s | HiGHS s | objective difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['shape'][0]} x {r['shape'][1]} | {r['triplets']} | {r['free']} | {r['states']} | {r['kept']} | "
                     f"{r['frontier_s']:.3f} | {r['highs_s']:.2f} | {r['objective_difference']:.1e} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()

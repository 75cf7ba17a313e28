"""The floor of the model-wide allocation on the MiniLM pair: what layer error any grid could reach
at the price of the narrowest width, under the model's one budget and its weights.

    python benchmarks/model_floor.py [--ratios 1/16,1/32,1/64] [--powers 1,0.5,0] [--work DIR] [--out OUT]

For each ratio, two real `adamix compress` runs (child processes, model_budget.compress): adamix
`--budget-scope model --grid normal` (the model scope's defaults) and deltacome, the reference. Then
the floor: every stashable matrix of the model (the calibrated linears, on their calibration Grams,
and the data-free ones) gets its whitened error table's drop errors e_li(0) (the v_i are
H-orthogonal, so dropping a set of triplets costs the sum of their e_li(0)), and one 0/1 knapsack

    min sum_l w_l sum_i e_li(0) [i dropped]   s.t.   sum_li c_l [i kept] <= sum_l alpha 16 m_l n_l

keeps triplets exactly at c_l, the price of matrix l's narrowest non-zero width (its codes and
grids, no file overhead), with w_l = model_scope.layer_weights of the slopes the adamix run
recorded, shrunk by each power P of --powers (1: the default's weights; 0: the linears weighed
alike). A last floor gives every matrix alpha of its own size (the per-tensor scope, unweighted).
Reported: the relative output error of the block linears (the tables' layer error) on the
calibration windows and on all held-out text, pooled, each as a ratio to deltacome's, for the
adamix run and for each floor (the truncations measured on the same Grams). A floor is what the
allocation's objective allows before any rounding: where it is above a target, no grid reaches it.
Writes OUT/model_floor_minilm.md and .json, naming the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from model_budget import compress, pair_folders  # noqa: E402
from peers import git_commit  # noqa: E402
from adamix.compression.model_scope import layer_weights  # noqa: E402
from adamix.compression.plan import delta_of, is_svd_shape  # noqa: E402
from adamix.eval.heldout import corpus_grams, error_on_grams, heldout_corpora, heldout_grams, pooled_grams  # noqa: E402
from adamix.io.artifact import Artifact  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.text import default_calibration_file, read_text  # noqa: E402
from adamix.methods import Settings  # noqa: E402
from adamix.methods.adamix import analyse, budget_bits  # noqa: E402
from adamix.methods.allocate import choose_widths  # noqa: E402
from adamix.quant.linalg import output_error  # noqa: E402

PER_TENSOR = "per tensor (alpha each, unweighted)"


def drop_items(deltas: dict[str, torch.Tensor], grams: dict) -> dict[str, tuple[np.ndarray, float, tuple]]:
    """{name: (e_i(0) (r,) descending, c: the narrowest non-zero width's price of one triplet, factors
    (U, s, V))} of each matrix's whitened analysis on its Gram (grams: {name: (H, transposed)}; none:
    data-free, e_i(0) = s_i^2)."""
    settings = Settings()
    narrowest = settings.widths.index(min(b for b in settings.widths if b > 0))
    out = {}
    for name, D in deltas.items():
        a = analyse(D, grams[name][0] if name in grams else None, settings)
        full = (a.U * a.s) @ a.V.T
        assert float((full - D).norm() / D.norm()) < 1e-6, f"{name}: the factors do not rebuild D"
        out[name] = (a.table[:, 0].copy(), float(a.costs[narrowest]), (a.U, a.s, a.V))
    return out


def floor_ranks(items: dict, weights: dict[str, float], budgets: dict[str, float], joint: bool) -> dict[str, int]:
    """{name: triplets kept} of the floor: one knapsack over every item (joint) or one per matrix."""
    groups = [list(items)] if joint else [[n] for n in items]
    kept = {}
    for group in groups:
        e0 = np.concatenate([items[n][0] * weights[n] for n in group])
        errors = np.stack([e0, np.zeros_like(e0)], axis=1)
        costs = np.concatenate([np.full((len(items[n][0]), 2), [0.0, items[n][1]]) for n in group])
        choice = choose_widths(errors, costs, sum(budgets[n] for n in group))
        for n, c in zip(group, np.split(choice, np.cumsum([len(items[n][0]) for n in group])[:-1])):
            assert np.all(np.diff(c) <= 0), f"{n}: the floor keeps a triplet after a dropped one"
            kept[n] = int(c.sum())
    return kept


def truncation_errors(items: dict, kept: dict[str, int], deltas: dict, grams_by_side: dict) -> dict[str, float]:
    """{side: sum over `deltas` (the block linears) of ||(D_k - D) X||^2} of each one's rank-k truncation
    (grams_by_side: {side: {name: (H, transposed)}})."""
    out = {side: 0.0 for side in grams_by_side}
    for name, D in deltas.items():
        U, s, V = items[name][2]
        k = kept[name]
        Dk = (U[:, :k] * s[:k]) @ V[:, :k].T
        for side, grams in grams_by_side.items():
            out[side] += output_error(Dk, D, grams[name][0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="1/16,1/32,1/64")
    ap.add_argument("--powers", default="1,0.5,0")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "adamix" / "bench" / "model_floor")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    args = ap.parse_args()
    commit = git_commit()
    base, ft, _ = pair_folders("minilm")
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    calib = heldout_grams(ft, [read_text(default_calibration_file())], 128)  # the CLI's 128 windows
    held = pooled_grams(corpus_grams(ft, heldout_corpora()))
    sides = {"calibration": calib, "heldout": held}
    args.work.mkdir(parents=True, exist_ok=True)
    runs, slopes = {}, None
    for ratio in args.ratios.split(","):
        for method, scope, grid in (("adamix", "model", "normal"), ("deltacome", "tensor", "uniform")):
            out = args.work / f"{method}-{scope}-{ratio.replace('/', '_')}"
            timing = compress(base, ft, out, method, ratio, scope, grid)
            art = Artifact(out)
            runs[method, ratio] = {**timing, **{side: error_on_grams(base, ft, art, g) for side, g in sides.items()}}
            if scope == "model":
                slopes = art.manifest["settings"]["model_scope"]
            print(json.dumps({"method": method, "ratio": ratio, **{k: v if not isinstance(v, dict) else v["relative_error"]
                                                                   for k, v in runs[method, ratio].items()}}), flush=True)
    names = [n for n in slopes["slopes"] if n in ft_ck.keys() and is_svd_shape(tuple(ft_ck.get(n).shape))]
    deltas = {}
    for n in names:
        D = delta_of(base_ck, ft_ck, n).double()
        deltas[n] = D.T if n in calib and calib[n][1] else D
    deltas = {n: D for n, D in deltas.items() if bool(D.any())}
    data_free = {n for n in deltas if n not in calib}
    items = drop_items(deltas, calib)
    linears = {n: D for n, D in deltas.items() if n not in data_free}
    energy = {side: sum(output_error(None, D, g[n][0]) for n, D in linears.items()) for side, g in sides.items()}
    rows = []
    for ratio in args.ratios.split(","):
        alpha = float(Fraction(ratio))
        budgets = {n: budget_bits(*D.shape, alpha) for n, D in deltas.items()}
        dc = runs["deltacome", ratio]
        variants = [(f"floor, model scope, slope power {p}", True, float(p)) for p in args.powers.split(",")]
        for name, joint, power in [*variants, (PER_TENSOR, False, None)]:
            weights = {n: 1.0 for n in deltas} if power is None else \
                layer_weights(slopes["slopes"], list(deltas), data_free, slopes["calibration_tokens"], power)
            kept = floor_ranks(items, weights, budgets, joint)
            err = truncation_errors(items, kept, linears, sides)
            rows.append({"ratio": ratio, "variant": name, **{f"{s}_error": (err[s] / energy[s]) ** 0.5 for s in sides},
                         **{f"x_deltacome_{s}": (err[s] / energy[s]) ** 0.5 / dc[s]["relative_error"] for s in sides},
                         "linear_rank": sum(kept[n] for n in linears), "data_free_rank": sum(kept[n] for n in data_free)})
        for method in ("adamix", "deltacome"):
            r = runs[method, ratio]
            rows.append({"ratio": ratio, "variant": "adamix --budget-scope model --grid normal" if method == "adamix" else "deltacome",
                         **{f"{s}_error": r[s]["relative_error"] for s in sides},
                         **{f"x_deltacome_{s}": r[s]["relative_error"] / dc[s]["relative_error"] for s in sides},
                         "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]})
    result = {"commit": commit, "command": f"python benchmarks/model_floor.py --ratios {args.ratios} --powers {args.powers}",
              "rows": rows, "slope_power_of_the_run": slopes["slope_power"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_floor_minilm.json").write_text(json.dumps(result, indent=1))
    (args.out / "model_floor_minilm.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# The floor of the model-wide allocation on the MiniLM pair", "",
             f"Command: `{result['command']} --out OUT` at commit `{result['commit']}`. Layer error: the relative output "
             "error of the block linears, pooled, on the calibration windows (the CLI's 128 x 256 tokens of "
             "lee_background.cor) and on all held-out text; x deltacome: as a ratio to deltacome's at the same "
             "ratio. A floor keeps each chosen triplet of the whitened SVD exactly, at the price of its matrix's "
             "narrowest width (codes and grids, no file overhead): the allocation's objective before any rounding. "
             "Ranks: triplets kept, block linears / data-free matrices.", "",
             "| ratio | variant | layer error, calibration | x deltacome | layer error, held-out | x deltacome | ranks |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ranks = f"{r['linear_rank']} / {r['data_free_rank']}" if "linear_rank" in r else ""
        lines.append(f"| {r['ratio']} | {r['variant']} | {r['calibration_error']:.4f} | {r['x_deltacome_calibration']:.3f} | "
                     f"{r['heldout_error']:.4f} | {r['x_deltacome_heldout']:.3f} | {ranks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

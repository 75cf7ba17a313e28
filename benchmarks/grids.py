"""Which grid pays for its bits: per-group uniform grids (the default), one uniform grid per vector,
and the same after a random Hadamard rotation, or the rotation with the Gaussian (Lloyd-Max) grid.

    python benchmarks/grids.py [--pair minilm|smollm] [--ratios 1/16,1/64,...] [--blocks N]

For every calibrated linear of the pair (whitened SVD, the default), one full error table per grid:
- uniform/128: an fp16 scale and offset per group of 128 entries (adamix's default, kind svd-mixed);
- uniform/vector: the same grid, one group per vector (--group-size larger than the matrix);
- rotated uniform/128: the delta and its Gram rotated (quant.hadamard), then uniform/128;
- rotated normal: adamix --grid normal (quant.normal, one fp16 scale per vector; kind svd-rotated).
Each grid prices its triplets by what it stores (the group's 32 bits, or 16 per vector). Then, per
ratio, one ILP per tensor for each grid, and one ILP that may choose the grid of every triplet
separately among the four (each (triplet, width, grid) one column of the table): what a per-triplet
choice of grid could add. Reported: the output error measured on what is stored (calibration Grams
and the pooled held-out Grams), as a ratio to uniform/128, and the error the ILP predicts (for the
per-triplet choice the prediction alone: no stored format mixes grids).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from calibrated import calibrated_deltas, pair_arguments, pair_paths  # noqa: E402
from pages import ratio_tables  # noqa: E402
from adamix.eval.heldout import corpus_grams, heldout_corpora, pooled_grams  # noqa: E402
from adamix.methods import Settings  # noqa: E402
from adamix.methods.adamix import analyse, budget_bits, finish  # noqa: E402
from adamix.methods.allocate import choose_widths  # noqa: E402
from adamix.methods.kinds import low_rank_factors  # noqa: E402
from adamix.quant.hadamard import rotate_gram, rotate_matrix  # noqa: E402
from adamix.quant.linalg import output_error  # noqa: E402

# name: (Settings changes, rotate D and H here first); the first is the default and the reference
GRIDS = {
    "uniform/128 (default)": ({}, False),
    "uniform/vector": ({"group_size": 1 << 20}, False),
    "rotated uniform/128": ({}, True),
    "rotated normal (--grid normal)": ({"grid": "normal"}, False),
}
REFERENCE = next(iter(GRIDS))
MIXED = "per-triplet choice among the four (predicted)"
SEED = 0


def encode(a, settings: Settings, alpha: float):
    """(Encoded, predicted squared error) of one analysis at ratio alpha, one budget per tensor."""
    a = dataclasses.replace(a, budget=budget_bits(*a.D.shape, alpha))
    enc = finish(a, choose_widths(a.table, a.costs, a.budget), a.budget, settings)
    widths = list(settings.widths)
    final = np.array([widths.index(b) for b in enc.detail["widths_by_index"]])
    return enc, float(a.table[np.arange(len(final)), final].sum())


def mixed_prediction(analyses: list, alpha: float) -> float:
    """The least predicted error of one ILP choosing a width and a grid for every triplet: the tables
    side by side (width 0 once), each column priced by its grid."""
    zero = list(Settings().widths).index(0)
    first = analyses[0]
    nonzero = [i for i in range(first.table.shape[1]) if i != zero]
    table = np.concatenate([first.table[:, [zero]]] + [a.table[:, nonzero] for a in analyses], axis=1)
    costs = np.concatenate([[0.0]] + [a.costs[nonzero] for a in analyses])
    choice = choose_widths(table, costs, budget_bits(*first.D.shape, alpha))
    return float(table[np.arange(len(choice)), choice].sum())


def main() -> None:
    args, ratios, commit = pair_arguments(__doc__.split("\n\n")[0], "1/8,1/16,1/32,1/64,1/128,1/256")
    base, ft = pair_paths(args.pair)
    t0 = time.time()
    held = pooled_grams(corpus_grams(ft, heldout_corpora()))
    names = [*GRIDS, MIXED]
    sums = {(k, v, a): 0.0 for k in ("calibration", "heldout", "predicted") for v in names for a in ratios}
    energy = {"calibration": 0.0, "heldout": 0.0}
    seconds = {v: 0.0 for v in GRIDS}
    for i, name, D, H in calibrated_deltas(base, ft, args.samples, args.blocks):
        H, Hh = H.double(), held[name][0].to(D.dtype)
        energy["calibration"] += output_error(None, D, H)
        energy["heldout"] += output_error(None, D, Hh)
        analyses = []
        for v, (changes, rotated) in GRIDS.items():
            t = time.time()
            settings = Settings(**changes)
            Dv, Hv, Hhv = (rotate_matrix(D, SEED), rotate_gram(H, SEED), rotate_gram(Hh, SEED)) if rotated else (D, H, Hh)
            a = analyse(Dv, Hv, settings)
            analyses.append(a)
            seconds[v] += time.time() - t
            for alpha in ratios:
                enc, predicted = encode(a, settings, alpha)
                U, V = low_rank_factors(enc.kind, enc.shape, enc.meta, enc.tensors)
                Dhat = U.double() @ V.double()
                sums["calibration", v, alpha] += output_error(Dhat, Dv, Hv)
                sums["heldout", v, alpha] += output_error(Dhat, Dv, Hhv)
                sums["predicted", v, alpha] += predicted
        for alpha in ratios:
            sums["predicted", MIXED, alpha] += mixed_prediction(analyses, alpha)
        print(f"block {i} {name} done, {time.time() - t0:.0f} s", flush=True)
    rows = []
    for v in names:
        for a in ratios:
            row = {"grid": v, "alpha": a, "predicted_error": (sums["predicted", v, a] / energy["calibration"]) ** 0.5,
                   "x_default_predicted": (sums["predicted", v, a] / sums["predicted", REFERENCE, a]) ** 0.5}
            if v in GRIDS:
                row.update({"calibration_error": (sums["calibration", v, a] / energy["calibration"]) ** 0.5,
                            "x_default_calibration": (sums["calibration", v, a] / sums["calibration", REFERENCE, a]) ** 0.5,
                            "heldout_error": (sums["heldout", v, a] / energy["heldout"]) ** 0.5,
                            "x_default_heldout": (sums["heldout", v, a] / sums["heldout", REFERENCE, a]) ** 0.5})
            rows.append(row)
    command = f"python benchmarks/grids.py --pair {args.pair} --ratios {args.ratios}" + \
        (f" --blocks {args.blocks}" if args.blocks else "")
    result = {"commit": commit, "command": command, "rows": rows, "analysis_seconds": seconds,
              "wall_s": time.time() - t0, "samples": args.samples}
    out = Path(args.out)
    (out / f"grids_{args.pair}.json").write_text(json.dumps(result, indent=1))
    (out / f"grids_{args.pair}.md").write_text(markdown(result, args.pair, ratios))
    print(markdown(result, args.pair, ratios))


def markdown(result: dict, pair: str, ratios: list[float]) -> str:
    """The result page: one table per measure, grids by ratio."""
    secs = ", ".join(f"{v} {s:.0f} s" for v, s in result["analysis_seconds"].items())
    lines = [f"# Grids on the {pair} pair: which pays for its bits\n",
             f"Produced by `{result['command']}` at commit `{result['commit']}`, CPU, {result['wall_s']:.0f} s "
             f"(SVD and error table per grid: {secs}). adamix's defaults otherwise (whitened SVD, one budget "
             f"per tensor); calibration {result['samples']} windows of <= 256 tokens of lee_background.cor; "
             "held-out: every window of the Lee documents and the polarity sentences, pooled. Budgets count "
             "codes, grids and gains (no file overhead). The deciding measure is the calibration side.\n"]
    tables = [("Calibration error, x uniform/128 (decides)", "x_default_calibration", ".3f"),
              ("Held-out error, x uniform/128 (reported)", "x_default_heldout", ".3f"),
              ("Predicted error, x uniform/128", "x_default_predicted", ".3f"),
              ("Calibration error", "calibration_error", ".4f"),
              ("Held-out error", "heldout_error", ".4f"),
              ("Predicted error (calibration)", "predicted_error", ".4f")]
    return "".join(lines) + ratio_tables(result["rows"], "grid", ratios, tables)


if __name__ == "__main__":
    main()

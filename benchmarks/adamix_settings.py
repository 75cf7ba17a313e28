"""Which adamix settings should be the default: each variant measured on the CALIBRATION text (the
measure that decides) and on the held-out text (reported, never used to choose).

    python benchmarks/adamix_settings.py [--pair minilm|smollm] [--ratios 1/8,1/16,...] [--blocks N]

For every calibrated linear of the pair, one plain and one whitened SVD with their full error tables
(ratio-independent), then for every ratio:
- deltacome, the reference (fixed schedule, no target correction);
- adamix with the SVD plain or whitened (`--whiten`), each with one budget per tensor or one per
  block (`--budget-scope block`).
Reported per variant and ratio: the relative output error sqrt(sum_l E_l / sum_l ||D_l X_l||^2) on the
calibration Grams and on the pooled held-out Grams (every window of the Lee documents and the polarity
sentences), each also as a ratio to deltacome's; the error the ILP's model predicts for the widths
stored (calibration side); and the median over tensors of measured / predicted (sqrt of the ratio of
squared errors), the error model's fit. Budgets here count codes and grids only (no file overhead),
the same for every variant. A last row bounds what any grid could give at the narrowest width's
price: the whitened truncation error at the rank that price allows (floor_error).
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
from adamix.methods.adamix import analyse, budget_bits, compress_jointly, finish  # noqa: E402
from adamix.methods.allocate import choose_widths, max_kept  # noqa: E402
from adamix.methods.deltacome import compress_deltacome, deltacome_settings  # noqa: E402
from adamix.methods.svd_mixed import decode_factors  # noqa: E402
from adamix.quant.linalg import output_error  # noqa: E402

# name: (whiten, budget scope); the first is the default before this benchmark
VARIANTS = {
    "adamix (plain SVD, per tensor)": (False, "tensor"),
    "adamix --whiten": (True, "tensor"),
    "adamix --budget-scope block": (False, "block"),
    "adamix --whiten --budget-scope block": (True, "block"),
}
REFERENCE = "deltacome"
FLOOR = "floor: kept triplets exact at the 2-bit price (whitened, per tensor)"


def encode_block(items: list[tuple[str, object, object]], analyses: dict, alpha: float) -> dict:
    """{variant: [Encoded per item]} for one block at ratio alpha. items: (name, D, H);
    analyses[(name, whiten)]: the full-table Analysis of that SVD; analyses[(name, REFERENCE)]: deltacome's."""
    out = {REFERENCE: [compress_deltacome(D, H, Settings(method="deltacome", alpha=alpha), analysis=analyses[name, REFERENCE])
                       for name, D, H in items]}
    for variant, (whiten, scope) in VARIANTS.items():
        s = Settings(alpha=alpha, whiten=whiten)
        ans = [dataclasses.replace(analyses[name, whiten], budget=budget_bits(*D.shape, alpha)) for name, D, _ in items]
        if scope == "block":
            out[variant] = compress_jointly(ans, s)
        else:
            out[variant] = [finish(a, choose_widths(a.table, a.costs, a.budget), a.budget, s) for a in ans]
    return out


def floor_error(analysis, budget: float) -> float:
    """The dropped error if every kept triplet were stored exactly at the price of the narrowest
    width: the sum of e_i(0) beyond the max_kept largest (whitened: the v_i are H-orthogonal, so this is
    the error of that truncation). What any choice of widths and grids at that price is bounded by."""
    e0 = np.sort(analysis.table[:, list(Settings().widths).index(0)])[::-1]
    return float(e0[max_kept(analysis.costs, budget):].sum())


def predicted_error(enc, analysis, widths) -> float:
    """The ILP model's squared error for the widths stored (after the packing's trims)."""
    final = np.array([list(widths).index(b) for b in enc.detail["widths_by_index"]])
    return float(analysis.table[np.arange(len(final)), final].sum())


def main() -> None:
    args, ratios, commit = pair_arguments(__doc__.split("\n\n")[0], "1/8,1/16,1/32,1/64,1/128")
    base, ft = pair_paths(args.pair)
    t0 = time.time()
    held = pooled_grams(corpus_grams(ft, heldout_corpora()))
    names = [REFERENCE, *VARIANTS]
    keys = [(v, a) for v in names for a in ratios]
    calib = {k: 0.0 for k in keys}
    heldout = {k: 0.0 for k in keys}
    predicted = {k: 0.0 for k in keys}
    fit = {k: [] for k in keys}
    floor = {a: 0.0 for a in ratios}
    energy = {"calibration": 0.0, "heldout": 0.0}
    seconds = {"analysis": 0.0, "encode": 0.0}

    def run_block(items):
        t = time.time()
        analyses = {}
        for name, D, H in items:
            for whiten in (False, True):
                analyses[name, whiten] = analyse(D, H, Settings(whiten=whiten))
            analyses[name, REFERENCE] = analyse(D, H, deltacome_settings(Settings()))
        seconds["analysis"] += time.time() - t
        t = time.time()
        for alpha in ratios:
            encs = encode_block(items, analyses, alpha)
            for v, per_item in encs.items():
                for (name, D, H), enc in zip(items, per_item):
                    m, n = D.shape
                    Dhat = decode_factors((m, n), enc.meta, enc.tensors)
                    Hh, _ = held[name]
                    e = output_error(Dhat, D, H)
                    calib[v, alpha] += e
                    heldout[v, alpha] += output_error(Dhat, D, Hh.to(D.dtype))
                    if v in VARIANTS:
                        whiten = VARIANTS[v][0]
                        p = predicted_error(enc, analyses[name, whiten], Settings().widths)
                        predicted[v, alpha] += p
                        if p > 0:
                            fit[v, alpha].append((e / p) ** 0.5)
            for name, D, _ in items:
                floor[alpha] += floor_error(analyses[name, True], budget_bits(*D.shape, alpha))
        seconds["encode"] += time.time() - t

    block, items = None, []
    for i, name, D, H in calibrated_deltas(base, ft, args.samples, args.blocks):
        H = H.double()
        if block is not None and i != block:
            run_block(items)
            print(f"block {block} done, {time.time() - t0:.0f} s", flush=True)
            items = []
        block = i
        energy["calibration"] += output_error(None, D, H)
        energy["heldout"] += output_error(None, D, held[name][0].to(D.dtype))
        items.append((name, D, H))
    if items:
        run_block(items)
    rows = []
    for v, a in keys:
        row = {"variant": v, "alpha": a,
               "calibration_error": (calib[v, a] / energy["calibration"]) ** 0.5,
               "x_deltacome_calibration": (calib[v, a] / calib[REFERENCE, a]) ** 0.5,
               "heldout_error": (heldout[v, a] / energy["heldout"]) ** 0.5,
               "x_deltacome_heldout": (heldout[v, a] / heldout[REFERENCE, a]) ** 0.5}
        if v in VARIANTS:
            row["predicted_error"] = (predicted[v, a] / energy["calibration"]) ** 0.5
            row["median_measured_over_predicted"] = float(np.median(fit[v, a]))
            row["fit_q10_q90"] = [float(np.quantile(fit[v, a], 0.1)), float(np.quantile(fit[v, a], 0.9))]
        rows.append(row)
    for a in ratios:
        rows.append({"variant": FLOOR, "alpha": a, "calibration_error": (floor[a] / energy["calibration"]) ** 0.5,
                     "x_deltacome_calibration": (floor[a] / calib[REFERENCE, a]) ** 0.5})
    command = f"python benchmarks/adamix_settings.py --pair {args.pair} --ratios {args.ratios}" + \
        (f" --blocks {args.blocks}" if args.blocks else "")
    result = {"commit": commit, "command": command, "rows": rows, "seconds": seconds,
              "wall_s": time.time() - t0, "samples": args.samples}
    out = Path(args.out)
    (out / f"adamix_settings_{args.pair}.json").write_text(json.dumps(result, indent=1))
    (out / f"adamix_settings_{args.pair}.md").write_text(markdown(result, args.pair, ratios))
    print(markdown(result, args.pair, ratios))


def markdown(result: dict, pair: str, ratios: list[float]) -> str:
    """The result page: one table per measure, variants by ratio."""
    lines = [f"# adamix settings on the {pair} pair: which should be the default\n",
             f"Produced by `{result['command']}` at commit `{result['commit']}`, CPU, "
             f"{result['wall_s']:.0f} s. Calibration: {result['samples']} windows of <= 256 tokens of "
             "lee_background.cor. Budgets count codes and grids (no file overhead). The deciding measure "
             "is the calibration side; the held-out side (every window of the Lee documents and the "
             "polarity sentences, pooled) is reported only.\n"]
    tables = [("Calibration error, x deltacome (decides)", "x_deltacome_calibration", ".3f"),
              ("Held-out error, x deltacome (reported)", "x_deltacome_heldout", ".3f"),
              ("Calibration error", "calibration_error", ".4f"),
              ("Held-out error", "heldout_error", ".4f"),
              ("Error predicted by the ILP's model (calibration)", "predicted_error", ".4f"),
              ("The model's fit: median over tensors of measured / predicted", "median_measured_over_predicted", ".3f")]
    return "".join(lines) + ratio_tables(result["rows"], "variant", ratios, tables)


if __name__ == "__main__":
    main()

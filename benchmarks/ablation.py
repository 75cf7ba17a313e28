"""Where ADAMIX's lead over Delta-CoMe comes from, measured on the CALIBRATION text only (so that
nothing here is tuned to the held-out text of benchmarks/peers.py).

    python benchmarks/ablation.py [--pair minilm|smollm] [--ratio 1/16] [--blocks N]

For every calibrated linear of the pair, one SVD and error table, then variants that change one
thing at a time: the width choice (ILP or Delta-CoMe's schedule; widths {0,2,3,4,8} or {0,2,3,8}),
the U step (target correction or U S), group size, GPTQ damping; all on the plain SVD (the whitened one
is compared in benchmarks/adamix_settings.py). Reported: the relative output error
sqrt(sum_l E_l / sum_l ||D_l X_l||^2) measured after quantization, and the error the ILP's model
predicts for the same widths (RTN grids, no cross terms).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from adamix.methods.allocate import choose_widths  # noqa: E402
from calibrated import calibrated_deltas, pair_paths  # noqa: E402
from adamix.quant.linalg import output_error, svd  # noqa: E402
from adamix.methods.adamix import analyse, budget_bits, finish  # noqa: E402
from adamix.methods import Settings  # noqa: E402
from adamix.methods.deltacome import WIDTHS as DC_WIDTHS, schedule_widths  # noqa: E402
from adamix.methods.svd_mixed import decode_factors  # noqa: E402

# name: (widths, choice rule, target correction, group size, damp)
VARIANTS = {
    "adamix (ILP {0,2,3,4,8}, TC)": ((0, 2, 3, 4, 8), "ilp", True, 128, 0.01),
    "ILP {0,2,3,4,8}, no TC": ((0, 2, 3, 4, 8), "ilp", False, 128, 0.01),
    "ILP {0,2,3,8}, TC": (DC_WIDTHS, "ilp", True, 128, 0.01),
    "schedule {8,3,2}, TC": (DC_WIDTHS, "schedule", True, 128, 0.01),
    "deltacome (schedule, no TC)": (DC_WIDTHS, "schedule", False, 128, 0.01),
    "adamix, group 64": ((0, 2, 3, 4, 8), "ilp", True, 64, 0.01),
    "adamix, group 256": ((0, 2, 3, 4, 8), "ilp", True, 256, 0.01),
    "adamix, damp 0.1": ((0, 2, 3, 4, 8), "ilp", True, 128, 0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="minilm", choices=("minilm", "smollm"))
    ap.add_argument("--ratio", default="1/16")
    ap.add_argument("--blocks", type=int, default=0, help="only the first N blocks (0 = all)")
    args = ap.parse_args()
    alpha = float(Fraction(args.ratio))
    base, ft = pair_paths(args.pair)
    measured = {v: 0.0 for v in VARIANTS}
    predicted = {v: 0.0 for v in VARIANTS}
    energy = 0.0
    for _, name, D, H in calibrated_deltas(base, ft, 128, args.blocks):
        H = H.double()
        m, n = D.shape
        fac = svd(D)
        energy += output_error(None, D, H)
        tables = {}
        for v, (widths, rule, tc, g, damp) in VARIANTS.items():
            s = Settings(alpha=alpha, widths=widths, group_size=g, damp=damp, correct_target=tc, whiten=False)
            key = (widths, g)
            if key not in tables:
                tables[key] = analyse(D, H, s, factors=fac)
            a = dataclasses.replace(tables[key], budget=budget_bits(m, n, alpha))
            if rule == "ilp":
                choice = choose_widths(a.table, a.costs, a.budget)
            else:
                chosen = schedule_widths(len(a.s), dict(zip(widths, a.costs)), a.budget)
                choice = np.array([list(widths).index(b) for b in chosen])
            enc = finish(a, choice, a.budget, s)
            final = np.array([list(widths).index(b) for b in enc.detail["widths_by_index"]])
            predicted[v] += float(a.table[np.arange(len(a.s)), final].sum())
            measured[v] += output_error(decode_factors((m, n), enc.meta, enc.tensors), D, H)
        print(f"{name} done", flush=True)
    ref = measured["deltacome (schedule, no TC)"]
    print(f"\n{args.pair}, alpha {args.ratio}, calibration text\n")
    print("| variant | measured error | x deltacome | predicted by the ILP model |\n|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {(measured[v] / energy) ** 0.5:.4f} | {(measured[v] / ref) ** 0.5:.3f} | "
              f"{(predicted[v] / energy) ** 0.5:.4f} |")


if __name__ == "__main__":
    main()

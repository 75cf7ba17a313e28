"""The held-out error itself: the first 64 windows (as the peers' tables measure it) against every
window of each held-out corpus, and pooled over all of them, on the MiniLM pair's cached artifacts.

    python benchmarks/heldout_measure.py [--methods adamix,deltacome] [--ratios 1/8,1/16,1/32,1/64,1/128]
                                         [--work ~/.cache/adamix/bench/peers] [--out docs/results]

Reads the artifacts benchmarks/peers.py left in <work>/minilm/<method>-<ratio> (run it first) and
measures each with eval.heldout: the tables' measure (heldout_grams on the Lee documents then the
polarity sentences, 64 windows of 256 tokens: Lee fills most of them) and errors_by_corpus (every
window of lee.cor and of pang_lee_polarity.cor, each corpus alone and pooled). Writes
docs/results/heldout_measure_minilm.md and .json with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from peers import git_commit

    from adamix.eval.demo import PAIR, package_folder
    from adamix.eval.heldout import (corpus_grams, corpus_windows, error_on_grams, errors_on_corpora, heldout_corpora,
                                     heldout_grams, pooled_grams)
    from adamix.io.artifact import Artifact
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="adamix,deltacome")
    ap.add_argument("--ratios", default="1/8,1/16,1/32,1/64,1/128")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "peers"))
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    base, ft = (package_folder(*p) for p in PAIR)
    corpora = heldout_corpora()
    old = heldout_grams(ft, [t for texts in corpora.values() for t in texts], samples=64)
    by_corpus = corpus_grams(ft, corpora)
    pooled = pooled_grams(by_corpus)
    windows = corpus_windows(ft, corpora)
    rows = []
    for method in args.methods.split(","):
        for ratio in args.ratios.split(","):
            folder = Path(args.work) / "minilm" / f"{method}-{ratio.replace('/', '_')}"
            if not (folder / "manifest.json").is_file():
                raise SystemExit(f"{folder}: no artifact; run benchmarks/peers.py --pairs minilm first")
            art = Artifact(folder)
            new = {**errors_on_corpora(base, ft, art, by_corpus, pooled), "windows": windows}
            rows.append({"method": method, "ratio": ratio, "alpha": float(Fraction(ratio)),
                         "first_64_windows": error_on_grams(base, ft, art, old)["relative_error"], **new})
            print(json.dumps(rows[-1]), flush=True)
    recorded = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths of this machine in the results
    result = {"commit": git_commit(), "args": recorded, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_measure_minilm.json").write_text(json.dumps(result, indent=1))
    windows = rows[0]["windows"] if rows else {}
    lines = ["# The held-out error: 64 windows against every window, per corpus and pooled (MiniLM pair)", "",
             f"Produced by `python benchmarks/heldout_measure.py {' '.join(sys.argv[1:])}` at commit `{result['commit']}`, "
             "CPU, on the artifacts `benchmarks/peers.py --pairs minilm` left in its work folder. `first 64 windows`: "
             "the peers' tables' measure (Lee documents first, then polarity sentences, 64 windows of 256 tokens). "
             f"Every window: {', '.join(f'{c} {n}' for c, n in windows.items())} windows; pooled: the Grams summed, "
             "every token weighing the same.", "",
             "| method | ratio | first 64 windows | pooled, every window | " + " | ".join(windows) + " |",
             "|---|---|---|---|" + "---|" * len(windows)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']} | {r['first_64_windows']:.4f} | {r['pooled']:.4f} | "
                     + " | ".join(f"{r['per_corpus'][c]:.4f}" for c in windows) + " |")
    by = {(r["method"], r["ratio"]): r for r in rows}
    ratios = [q for q in args.ratios.split(",") if ("adamix", q) in by and ("deltacome", q) in by]
    if ratios:
        lines += ["", "adamix / deltacome:", "", "| ratio | first 64 windows | pooled | " + " | ".join(windows) + " |",
                  "|---|---|---|" + "---|" * len(windows)]
        for q in ratios:
            a, d = by[("adamix", q)], by[("deltacome", q)]
            lines.append(f"| {q} | {a['first_64_windows'] / d['first_64_windows']:.3f} | {a['pooled'] / d['pooled']:.3f} | "
                         + " | ".join(f"{a['per_corpus'][c] / d['per_corpus'][c]:.3f}" for c in windows) + " |")
    (out / "heldout_measure_minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

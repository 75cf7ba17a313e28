"""The SVD algorithms on the real pairs: does `--svd gram` choose the widths and reach the errors of
`--svd full` (LAPACK's SVD)?

    python benchmarks/svd_choice.py [--pairs minilm,smollm] [--ratios 1/16,1/64] [--out docs/results]

For each pair and ratio, `adamix.compress` (adamix, the CLI's calibration defaults) with each
algorithm, one after the other in this process: held-out relative output error (the measure of
peers.py), the per-tensor widths (how many calibrated tensors get exactly the same widths, and the
largest difference in kept triplets), the largest per-tensor difference in measured error, whether the
artifacts are byte-identical, and the seconds of the SVD phase and of the whole run.
Writes docs/results/svd_choice.md and .json with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ALGORITHMS = ("full", "gram")


def main() -> None:
    import adamix
    from adamix.eval.heldout import error_on_grams, heldout_corpora, heldout_grams
    from adamix.io.artifact import Artifact
    from peers import git_commit
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="minilm,smollm")
    ap.add_argument("--ratios", default="1/16,1/64")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    commit = git_commit()
    rows = []
    for pair in args.pairs.split(","):
        if pair == "minilm":
            from adamix.eval.demo import PAIR, package_folder
            base, ft = (package_folder(*p) for p in PAIR)
            texts, samples = [t for ts in heldout_corpora().values() for t in ts], 64
        else:
            from make_smollm_finetune import make_finetune
            base, ft = make_finetune(log=print)
            texts, samples = heldout_corpora()["lee"], 32
        grams = heldout_grams(ft, texts, samples=samples)
        for ratio in args.ratios.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                res = {}
                for alg in ALGORITHMS:
                    out = Path(tmp) / alg
                    m = adamix.compress(base, ft, out, ratio=ratio, svd=alg, progress=False)
                    art = Artifact(out)
                    res[alg] = {"heldout_error": error_on_grams(base, ft, art, grams)["relative_error"],
                                "wall_s": m["sizes"]["wall_seconds"], "svd_s": m["seconds_by_phase"].get("svd", 0.0),
                                "entries": {n: (e["meta"].get("widths"), e["stats"].get("error_measured"))
                                            for n, e in art.entries.items() if e["kind"] == "svd-mixed"},
                                "bytes": (out / "delta.safetensors").read_bytes()}
                a, b = res["full"]["entries"], res["gram"]["entries"]
                same = sum(a[n][0] == b[n][0] for n in a)
                kept = lambda w: sum(c for _, c in w or [])  # noqa: E731
                row = {"pair": pair, "ratio": ratio, "tensors": len(a), "same_widths": same,
                       "max_kept_diff": max(abs(kept(a[n][0]) - kept(b[n][0])) for n in a),
                       "max_error_diff": max(abs(a[n][1] - b[n][1]) for n in a),
                       "identical": res["full"]["bytes"] == res["gram"]["bytes"],
                       **{f"{k}_{alg}": res[alg][k] for alg in ALGORITHMS for k in ("heldout_error", "wall_s", "svd_s")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svd_choice.json").write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))
    lines = ["# `--svd gram` against `--svd full` on the real pairs", "",
             f"Produced by `python benchmarks/svd_choice.py {' '.join(sys.argv[1:])}` at commit `{commit}`, CPU; "
             "adamix with the CLI's calibration defaults; held-out error as in peers.py.", "",
             "| pair | ratio | held-out error, full | held-out error, gram | gram / full | tensors with the same widths "
             "| largest difference in kept triplets | largest difference in a tensor's measured error | identical bytes "
             "| SVD s, full | SVD s, gram | run s, full | run s, gram |", "|---" * 13 + "|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {Fraction(r['ratio'])} | {r['heldout_error_full']:.5f} | {r['heldout_error_gram']:.5f} | "
                     f"{r['heldout_error_gram'] / r['heldout_error_full']:.4f} | {r['same_widths']} / {r['tensors']} | "
                     f"{r['max_kept_diff']} | {r['max_error_diff']:.1e} | {'yes' if r['identical'] else 'no'} | "
                     f"{r['svd_s_full']:.1f} | {r['svd_s_gram']:.1f} | {r['wall_s_full']:.0f} | {r['wall_s_gram']:.0f} |")
    (out / "svd_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

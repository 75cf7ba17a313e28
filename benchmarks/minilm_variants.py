"""MiniLM pair at one ratio: the default ADAMIX against its measured options, same held-out measures.

    python benchmarks/minilm_variants.py [--ratio 1/16]

Prints held-out relative output error and embedding cosine (all 250 held-out texts, the 50 Lee
documents, the 200 polarity sentences) for: default; --budget-scope block; --no-whiten; both;
--calib none.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

VARIANTS = {
    "default (whitened SVD, tensor budget)": {},
    "--budget-scope block": {"budget_scope": "block"},
    "--no-whiten": {"whiten": False},
    "--no-whiten --budget-scope block": {"whiten": False, "budget_scope": "block"},
    "--calib none (data-free)": {"calib": None},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", default="1/16")
    args = ap.parse_args()
    from adamix import compress, merge
    from adamix.eval.demo import PAIR, package_folder
    from adamix.eval.heldout import embedding_cosine, heldout_corpora, heldout_texts, mean_pooled, relative_output_error

    base, ft = (package_folder(*p) for p in PAIR)
    texts = heldout_texts()
    sets = {"all": texts, **heldout_corpora()}
    ref = {k: mean_pooled(ft, v) for k, v in sets.items()}
    work = Path(tempfile.mkdtemp(prefix="adamix-variants-"))
    print("| variant | alpha achieved | held-out error | cos mean of corpora | cos all | cos Lee | cos polarity |\n"
          "|---|---|---|---|---|---|---|")
    for i, (label, opts) in enumerate(VARIANTS.items()):
        delta, merged = work / f"d{i}", work / f"m{i}"
        manifest = compress(base, ft, delta, ratio=args.ratio, progress=False, **opts)
        merge(base, delta, merged, progress=False)
        err = relative_output_error(base, ft, str(delta), texts)["relative_error"]
        cos = {k: embedding_cosine(mean_pooled(str(merged), v), ref[k]) for k, v in sets.items()}
        print(f"| {label} | {manifest['sizes']['alpha_achieved']:.5f} | {err:.4f} | "
              f"{(cos['lee'] + cos['polarity']) / 2:.5f} | {cos['all']:.5f} | "
              f"{cos['lee']:.5f} | {cos['polarity']:.5f} |", flush=True)


if __name__ == "__main__":
    main()

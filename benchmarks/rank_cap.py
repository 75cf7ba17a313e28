"""What a rank cap (--max-rank R) costs, and what it saves in vLLM: held-out error and end metric at
R = 16, 32, 64, 128 and no cap, against lowrank at the same budget capped at R, lowrank at exactly
rank R (fp16 factors, its own size: a plain LoRA extraction), and the uncapped adamix artifact cut to R
at export time (export-peft --max-rank: the R triplets of largest stored gain; with the error its
gains predict), with the GPU memory of one vLLM LoRA slot at the rank each needs.

    python benchmarks/rank_cap.py [--pairs minilm] [--ratios 1/16,1/32] [--out docs/results]

For each pair the calibrated linears of every block (the matrices a LoRA adapter carries) are
compressed once per (ratio, R, method) from one SVD and one error table per matrix (pruned for the
uncapped budget, which serves every cap). Held-out error: sqrt(sum ||(D^ - D) X||^2 / sum ||D X||^2)
over those linears, X the fine-tune's inputs on held-out text (gensim's Lee documents and polarity
sentences, never the calibration text). End metric (MiniLM): mean cosine between the fine-tune's
mean-pooled embeddings and those of the served model, the base with W + D^ on those linears only:
what `export-peft --lora-only` gives vLLM. Size: stored bits / fp16 bits of those linears. The
overhead of the artifact's header is left out (0 bits per element) for every configuration alike.
Writes docs/results/rank_cap_<pair>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from calibrated import calibrated_deltas, pair_paths  # noqa: E402

from adamix.eval.heldout import embedding_cosine, heldout_corpora, heldout_grams, mean_pooled  # noqa: E402
from adamix.export.vllm import export_dtype, slot_bytes, slot_rank  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.hf import build_model  # noqa: E402
from adamix.export.peft import top_pairs  # noqa: E402
from adamix.methods import Settings, compress_with, decode  # noqa: E402
from adamix.methods.kinds import low_rank_factors, pair_gains  # noqa: E402
from adamix.methods.adamix import analyse  # noqa: E402
from adamix.quant.linalg import svd  # noqa: E402

CAPS = (16, 32, 64, 128, None)


def git_commit() -> str:
    root = Path(__file__).parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("+uncommitted changes" if dirty else "")


def run_pair(pair: str, ratios: list[float], samples: int, out: Path, commit: str, caps=CAPS) -> None:
    t0 = time.time()
    base, ft = pair_paths(pair)
    mats = list(calibrated_deltas(base, ft, samples))
    texts = [t for c in heldout_corpora().values() for t in c]
    held = heldout_grams(ft, texts)
    base_ck = Checkpoint(base)
    dtype = export_dtype([base_ck.slice_info(name)[1] for _, name, _, _ in mats])
    print(f"{pair}: {len(mats)} linears, calibrated in {time.time() - t0:.0f} s", flush=True)
    embed = pair == "minilm"
    ref = mean_pooled(ft, texts) if embed else None
    refs = {"base": embedding_cosine(mean_pooled(ft, texts, model=build_model(base_ck)), ref)} if embed else None
    task = None
    if pair == "smollm":  # the fine-tune's task: exact match of greedy answers (make_smollm_finetune)
        from make_smollm_finetune import exact_match, task_examples
        from transformers import AutoTokenizer
        tokenizer, examples = AutoTokenizer.from_pretrained(ft), task_examples("test", 200)
        task = lambda model: exact_match(model, tokenizer, examples)  # noqa: E731
        refs = {"base": task(build_model(base_ck)), "fine-tune": task(build_model(Checkpoint(ft)))}
        print(f"exact match: {refs}", flush=True)
    rows = []

    def evaluate(alpha, cap, method, dhat: dict, ranks: list[int], seconds: float, extra: dict | None = None) -> None:
        num = den = 0.0
        for _, name, D, _ in mats:
            Hh, transposed = held[name]
            Dh = dhat[name].T if transposed else dhat[name]
            E = (Dh.double() - D.double())
            num += float(((E @ Hh) * E).sum())
            den += float(((D.double() @ Hh) * D.double()).sum())
        top = max(ranks)
        slot = slot_rank(max(top, 1))
        shapes = [tuple(d.shape) for d in dhat.values()]
        row = {"alpha": alpha, "cap": cap, "method": method, "rank_max": top,
               "rank_mean": sum(ranks) / len(ranks), "error": (num / den) ** 0.5, "seconds": seconds,
               "slot_rank": slot, "slot_mib": slot_bytes(shapes, slot, dtype) / 2**20 if slot else None, **(extra or {})}
        if embed or task:
            model = build_model(base_ck, lambda n: base_ck.get(n).float() + dhat[n] if n in dhat else base_ck.get(n))
            if embed:
                row["cosine"] = embedding_cosine(mean_pooled(ft, texts, model=model), ref)
            else:
                row["exact_match"] = task(model)
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write(pair, rows, dtype, refs if (embed or task) else None, samples, out, time.time() - t0, commit)

    def model_orientation(name: str, Dh: torch.Tensor) -> torch.Tensor:
        return Dh.T if held[name][1] else Dh

    for alpha in ratios:
        shared, uncapped = {}, {}
        for _, name, D, H in mats:
            fac = svd(D)  # lowrank's; adamix's own (whitened by default) comes with its analysis
            shared[name] = (fac, analyse(D, H, Settings(alpha=alpha), prune=True))
        for cap in sorted(caps, key=lambda c: c is not None):  # uncapped first: the export-time cuts start from it
            variants = [("adamix", alpha), ("lowrank", alpha)] + ([("lowrank", None)] if cap is not None else [])
            for method, budget in variants:
                t = time.time()
                dhat, ranks, fp16_bits = {}, [], 0
                for _, name, D, H in mats:
                    fac, a = shared[name]
                    # lowrank without a budget: the truncated SVD at exactly rank R in fp16, what a plain
                    # LoRA extraction at rank R gives (its size is 16 R (m + n) bits, not alpha's)
                    s = Settings(method=method, alpha=budget if budget is not None else 1.0, max_rank=cap)
                    enc = compress_with(D, H, s, 0.0, factors=fac, analysis=a if method == "adamix" else None)
                    if method == "adamix" and cap is None:
                        uncapped[name] = enc
                    ranks.append(enc.stats["rank_kept"])
                    fp16_bits += 8 * enc.nbytes
                    dhat[name] = model_orientation(name, decode(enc.kind, enc.shape, enc.meta, enc.tensors))
                size = fp16_bits / sum(16 * D.numel() for _, _, D, _ in mats)
                label = method if budget is not None else "lowrank rank R"
                evaluate(alpha, cap, label, dhat, ranks, time.time() - t, {"size": size})
            if cap is None:
                continue
            t = time.time()  # export-peft --max-rank cap of the uncapped artifact: the cap's most valuable pairs
            dhat, ranks, num, den = {}, [], 0.0, 0.0
            for _, name, D, H in mats:
                enc = uncapped[name]
                U, V = low_rank_factors(enc.kind, enc.shape, enc.meta, enc.tensors)
                g = pair_gains(enc.kind, enc.shape, enc.meta, enc.tensors)
                keep = top_pairs(g, min(cap, len(g)))
                ranks.append(len(keep))
                dhat[name] = model_orientation(name, U[:, keep] @ V[keep])
                after = enc.stats["error_predicted"] ** 2 + float(g.double().sum() - g[keep].double().sum())
                num += after * enc.stats["energy"]
                den += enc.stats["energy"]
            evaluate(alpha, cap, "adamix, cut at export", dhat, ranks, time.time() - t,
                     {"size": sum(8 * uncapped[n].nbytes for _, n, _, _ in mats) / sum(16 * D.numel() for _, _, D, _ in mats),
                      "predicted": (num / den) ** 0.5})
    write(pair, rows, dtype, refs if (embed or task) else None, samples, out, time.time() - t0, commit)


def write(pair, rows, dtype, refs, samples, out: Path, seconds: float, commit: str) -> None:
    metric = "cosine" if pair == "minilm" else "exact_match"
    cols = ["ratio", "R", "method", "size (x fp16)", "rank max", "rank mean", "held-out error", "vLLM slot rank",
            f"one slot ({dtype}) MiB", "cut's predicted error"] + ([metric.replace("_", " ")] if refs else [])
    lines = [f"# Rank cap on the {pair} pair: held-out error and vLLM slot memory", "",
             f"`python {' '.join(sys.argv)}` ({len(rows)} rows) at commit `{commit}`, CPU, {seconds:.0f} s; "
             f"calibration {samples} windows of lee_background.cor. The calibrated linears only (what a LoRA adapter "
             "carries); held-out text: gensim's Lee documents and polarity sentences.", ""]
    if refs and metric == "cosine":
        lines += [f"Cosine: mean cosine of the mean-pooled embeddings of the base with W + D^ on those linears "
                  f"(what `export-peft --lora-only` serves) to the fine-tune's; the base alone scores {refs['base']:.5f}.", ""]
    elif refs:
        lines += ["Exact match: greedy answers of the base with W + D^ on those linears (what `export-peft "
                  "--lora-only` serves; the adapter loaded by peft equals it, tests/export/test_peft.py) on 200 "
                  f"held-out word-reversal prompts; base {refs['base']:.3f}, fine-tune {refs['fine-tune']:.3f}.", ""]
    lines += ["Methods: `adamix` compressed with `--max-rank R`; `lowrank` at the same budget, capped at R; "
              "`lowrank rank R`, the truncated SVD at exactly rank R in fp16 (a plain LoRA extraction: its own size, "
              "often far above the ratio); `adamix, cut at export`, the uncapped adamix artifact cut to its R "
              "triplets of largest stored gain (`export-peft --max-rank R`), with the error its gains predict "
              "(on the calibration text, pooled by energy).", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [str(Fraction(r["alpha"]).limit_denominator(1024)), str(r["cap"] or "none"), r["method"],
                f"{r['size']:.4f}", str(r["rank_max"]),
                f"{r['rank_mean']:.1f}", f"{r['error']:.4f}", str(r["slot_rank"] or "> 512"),
                f"{r['slot_mib']:.2f}" if r["slot_mib"] is not None else "-",
                f"{r['predicted']:.4f}" if "predicted" in r else "-"]
        if refs:
            vals.append(f"{r[metric]:.5f}" if metric == "cosine" else f"{r[metric]:.3f}")
        lines.append("| " + " | ".join(vals) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_cap_{pair}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="minilm", help="comma-separated: minilm, smollm")
    ap.add_argument("--ratios", default="1/16,1/32")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--caps", default="16,32,64,128,none", help="rank caps; 'none' = uncapped")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    commit = git_commit()  # the code that runs: imported at the start, read once for every pair
    for pair in args.pairs.split(","):
        caps = tuple(None if c == "none" else int(c) for c in args.caps.split(","))
        run_pair(pair, [float(Fraction(r)) for r in args.ratios.split(",")], args.samples, Path(args.out), commit, caps)


if __name__ == "__main__":
    main()

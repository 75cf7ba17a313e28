"""`--budget-scope model` against the per-tensor and per-block budgets, and the linear model behind it.

    python benchmarks/model_budget.py --pair minilm|smollm|smollm-code [--ratios 1/16,1/32,1/64]
                                      [--variants adamix:tensor,adamix:block,adamix:model,deltacome:tensor]
                                      (a variant: method:scope[:grid][:flag=value...],
                                       e.g. adamix:model:normal:bits=0-1-2-3-4-8 or adamix:model:slope-power=0.5)
                                      [--work DIR] [--out docs/results] [--page NAME]

For each ratio, real `adamix compress` runs (child processes: wall time and peak RSS of each) of
adamix with --budget-scope tensor, block and model, and of deltacome. Each artifact is measured:
- the relative output error on held-out text, pooled over its corpora (peers.py's measure);
- the end divergence from the fine-tune (KL of the next-token distributions for SmolLM2, squared
  distance of the final hidden states for MiniLM, mean per token) on the calibration windows that
  the slopes are measured on, and on the held-out text;
- the linear model: predicted divergence sum_l c_l E_l (c_l the slopes the model-scope run recorded,
  E_l each matrix's error on those windows, compression.sensitivity.layer_errors) against measured;
- end metrics: MiniLM: cosine of the mean-pooled embeddings to the fine-tune's; SmolLM2: exact match
  on the fine-tune's task (200 test prompts) and the kept share of its gain.
Writes docs/results/model_budget_<pair>.md and .json, naming the commit.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))

from adamix.compression.calibrate import token_windows  # noqa: E402
from adamix.compression.sensitivity import SLOPE_WINDOWS, divergence, end_divergence, end_output, layer_errors  # noqa: E402
from adamix.eval.heldout import corpus_grams, errors_on_corpora, heldout_corpora, pooled_grams  # noqa: E402
from adamix.io.artifact import Artifact  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.hf import build_model, state_name_map  # noqa: E402
from adamix.io.text import default_calibration_file, read_text  # noqa: E402
from peers import git_commit, restored_model  # noqa: E402

VARIANTS = "adamix:tensor,adamix:block,adamix:model,deltacome:tensor"  # method:budget scope[:grid][:flag=value...]


def pair_folders(pair: str) -> tuple[str, str, dict]:
    """(base, fine-tune, how to score it) of a benchmark pair."""
    if pair == "minilm":
        from adamix.eval.demo import PAIR, package_folder
        base, ft = (package_folder(*p) for p in PAIR)
        return base, ft, {"kind": "embedding"}
    from make_smollm_finetune import CODE_TASK_ID, TASK_ID, make_finetune
    task = CODE_TASK_ID if pair == "smollm-code" else TASK_ID
    base, ft = make_finetune(log=print, task=task)
    return base, ft, {"kind": "task", "task": task}


def variant_fields(variant: str) -> tuple[str, str, str, list[str]]:
    """method:scope[:grid][:flag=value...][:switch...] -> (method, scope, grid (default uniform), extra
    CLI arguments): `bits=0-1-2-3-4-8` -> --bits 0,1,2,3,4,8, `slope-power=0.5` -> --slope-power 0.5,
    `token-rows` -> --token-rows (a switch, after the grid or a flag=value; the model scope's default, so
    `no-token-rows` gives the run without)."""
    method, scope, *rest = variant.split(":")
    grid = rest.pop(0) if rest and "=" not in rest[0] else "uniform"
    extra = []
    for field in rest:
        if "=" not in field:
            extra.append(f"--{field}")
            continue
        flag, value = field.split("=", 1)
        extra += [f"--{flag}", value.replace("-", ",") if flag == "bits" else value]
    return method, scope, grid, extra


def compress(base: str, ft: str, out: Path, method: str, ratio: str, scope: str, grid: str = "uniform",
             extra: tuple[str, ...] | list[str] = ()) -> dict:
    """One `adamix compress` in a child process: its wall seconds and peak RSS (MiB)."""
    cmd = [sys.executable, "-m", "adamix.cli", "compress", base, ft, "-o", str(out), "--method", method,
           "--ratio", ratio, "--overwrite", "-q"] + (["--budget-scope", scope] if scope != "tensor" else []) \
        + (["--grid", grid] if grid != "uniform" else []) + list(extra)
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    rss = re.search(r"peak RSS (\d+) MiB", done.stdout)  # the CLI's own (VmHWM: the child's alone)
    return {"wall_s": round(time.time() - t, 1), "peak_rss_mib": int(rss.group(1)) if rss else None}


def task_score(model, tokenizer, task: str) -> float:
    from make_smollm_finetune import exact_match, task_examples
    return exact_match(model, tokenizer, task_examples("test", 200, seed=0, task=task))


def cosine_score(model, ft: str, ref: dict) -> float:
    from adamix.eval.heldout import embedding_cosine, mean_pooled
    return sum(embedding_cosine(mean_pooled(ft, t, model=model), ref[c]) for c, t in heldout_corpora().items()) / len(ref)


def divergence_from(ft_model, model, windows) -> float:
    """Mean per token of `model`'s divergence from the fine-tune's outputs, window by window (the
    fine-tune run beside it: its outputs for all held-out text would not fit in memory as logits)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            kind, ref = end_output(ft_model, ids)
            total += divergence(kind, ref, end_output(model, ids)[1])
            tokens += ids.shape[1]
    return total / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=("minilm", "smollm", "smollm-code"), default="minilm")
    ap.add_argument("--ratios", default="1/16,1/32,1/64")
    ap.add_argument("--variants", default=VARIANTS, help="method:scope[:grid][:flag=value...], comma-separated (bits dash-separated: bits=0-1-2-3-4-8) (one of them adamix:model)")
    ap.add_argument("--page", default=None, help="the result page's name (default model_budget_<pair>)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "adamix" / "bench" / "model_budget")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    args = ap.parse_args()
    commit = git_commit()
    from transformers import AutoTokenizer
    base, ft, score = pair_folders(args.pair)
    work = args.work / args.pair
    work.mkdir(parents=True, exist_ok=True)
    ft_ck = Checkpoint(ft)
    tok = AutoTokenizer.from_pretrained(ft)
    calib_windows = token_windows(read_text(default_calibration_file()), tok, 128, 256)[:SLOPE_WINDOWS]
    held_windows = [w for texts in heldout_corpora().values() for t in texts
                    for w in token_windows(t, tok, None, 256)]
    ft_model = build_model(ft_ck)
    params = state_name_map(ft_model, ft_ck.keys())
    owned = dict(ft_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        refs = [end_output(ft_model, w)[1] for w in calib_windows]
    by_corpus = corpus_grams(ft, heldout_corpora())
    grams = pooled_grams(by_corpus)
    if score["kind"] == "embedding":
        from adamix.eval.heldout import mean_pooled
        emb_ref = {c: mean_pooled(ft, t, model=ft_model) for c, t in heldout_corpora().items()}
        metric = lambda model: {"cosine": cosine_score(model, ft, emb_ref)}  # noqa: E731
        ref = {}
    else:
        metric = lambda model: {"exact_match": task_score(model, tok, score["task"])}  # noqa: E731
        ref = {"base": metric(restored_model(base, ft, None))["exact_match"], "finetune": metric(ft_model)["exact_match"]}
    rows, slopes = [], None
    for ratio in args.ratios.split(","):
        for method, scope, grid, extra in (variant_fields(v) for v in args.variants.split(",")):
            tag = "".join(f"-{a.lstrip('-')}" for a in extra).replace(",", "")
            out = work / f"{method}-{scope}-{grid}{tag}-{ratio.replace('/', '_')}"
            run = compress(base, ft, out, method, ratio, scope, grid, extra)
            art = Artifact(out)
            if scope == "model":
                slopes = art.manifest["settings"]["model_scope"]
            restored = restored_model(base, ft, art)
            r = {"method": method, "ratio": ratio, **run,
                 "scope": " ".join([scope] + ([f"--grid {grid}"] if grid != "uniform" else []) + extra),
                 "heldout_error": errors_on_corpora(base, ft, art, by_corpus, grams)["pooled"],
                 "div_calib": end_divergence(restored, calib_windows, refs),
                 "div_heldout": divergence_from(ft_model, restored, held_windows), **metric(restored)}
            own = dict(restored.named_parameters(remove_duplicate=False))
            changes = {ck: (p, (own[p] - owned[p]).detach()) for p, ck in params.items() if own[p].dim() == 2}
            r["_errors"] = layer_errors(ft_model, changes, {ck for ck in changes if ck not in grams}, calib_windows)
            del changes, own, restored
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
    for r in rows:  # the linear model, with the slopes of the model-scope run (the same for every ratio)
        E = r.pop("_errors")
        r["div_predicted"] = sum(slopes["slopes"][ck] * E[ck] for ck in slopes["slopes"] if ck in E)
    write(args, rows, ref, slopes, commit)


def write(args, rows: list[dict], ref: dict, slopes: dict, commit: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.page or f"model_budget_{args.pair.replace('-', '_')}"
    data = {"command": f"python benchmarks/model_budget.py --pair {args.pair} --ratios {args.ratios}"
            + ("" if args.variants == VARIANTS else f" --variants {args.variants}")
            + (f" --page {args.page}" if args.page else ""),
            "commit": commit, "reference": ref, "rows": rows,
            "slopes": {k: v for k, v in slopes.items()} if slopes else None}
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    dc = {r["ratio"]: r for r in rows if r["method"] == "deltacome"}
    metric = "cosine" if "cosine" in rows[0] else "exact_match"
    lines = [f"# `--budget-scope model` on the {args.pair} pair", "",
             f"Command: `{data['command']}` at commit `{commit}`. Each row is a real `adamix compress` "
             "(child process, this machine's CPU). Divergence: mean per token of "
             f"{slopes['end_divergence'] if slopes else '?'} from the fine-tune (`hidden`: squared distance of the "
             "final hidden states; `kl`: KL of the next-token distributions), on the first "
             f"{SLOPE_WINDOWS} calibration windows (where the slopes are measured) and on all held-out text. "
             "Predicted: sum_l c_l E_l with the model-scope run's slopes.", ""]
    if ref:
        lines += [f"Exact match: base {ref['base']:.3f}, fine-tune {ref['finetune']:.3f}; "
                  "gain kept = (score - base) / (fine-tune - base).", ""]
    head = ["ratio", "variant", "held-out error", "x deltacome", "div calib", "predicted", "meas/pred",
            "div held-out", "x deltacome", metric] + (["gain kept"] if ref else []) + ["wall s", "peak RSS MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = dc.get(r["ratio"])
        cells = [r["ratio"], f"{r['method']} {r['scope']}", f"{r['heldout_error']:.4f}",
                 f"{r['heldout_error'] / d['heldout_error']:.3f}" if d else "",
                 f"{r['div_calib']:.3e}", f"{r['div_predicted']:.3e}",
                 f"{r['div_calib'] / r['div_predicted']:.2f}" if r["div_predicted"] > 0 else "",
                 f"{r['div_heldout']:.3e}", f"{r['div_heldout'] / d['div_heldout']:.3f}" if d else "",
                 f"{r[metric]:.4f}"]
        if ref:
            cells.append(f"{(r[metric] - ref['base']) / (ref['finetune'] - ref['base']):.3f}")
        cells += [f"{r['wall_s']:.0f}", f"{r['peak_rss_mib']}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Exact match of existing artifacts on more test prompts of a SmolLM2 fine-tune's task.

    python benchmarks/task_score.py --pair smollm|smollm-code [--prompts 1000] [--page NAME] \
                                    [--kl-text FILE [--kl-samples 256]] NAME=ARTIFACT [NAME=ARTIFACT ...]

The tables score each fine-tune's task on 200 test prompts, a standard error of about 0.017 near
0.93. This scores the artifacts given (each merged in memory, as `adamix merge` would write it) on
the first N test prompts of the same seed, which begin with those 200, together with the base and
the fine-tune, and reports each score with its binomial standard error and the kept share of the
fine-tune's gain. With --kl-text, also the calibration-side measure: the mean per token of the KL of
each model's next-token distributions from the fine-tune's on the first --kl-samples windows that
`adamix compress --calib FILE` makes of that text (compression.calibrate.token_windows, 256 tokens
or one line each). Writes docs/results/<page>.md and .json (with --page), naming the commit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from adamix.io.artifact import Artifact  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.hf import build_model  # noqa: E402
from model_budget import divergence_from, pair_folders  # noqa: E402
from peers import git_commit, restored_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=("smollm", "smollm-code"), default="smollm-code")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--page", default=None, help="write docs/results/<page>.md and .json")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    ap.add_argument("--kl-text", type=Path, default=None, help="calibration text for the KL column")
    ap.add_argument("--kl-samples", type=int, default=256, help="windows of --kl-text (default 256)")
    ap.add_argument("artifacts", nargs="+", metavar="NAME=ARTIFACT")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from make_smollm_finetune import exact_match, task_examples, weights_digest
    commit = git_commit()
    base, ft, score = pair_folders(args.pair)
    build = weights_digest(ft)
    tok = AutoTokenizer.from_pretrained(ft)
    examples = task_examples("test", args.prompts, seed=0, task=score["task"])
    named = [("base", None), ("fine-tune", "ft")] + [tuple(a.split("=", 1)) for a in args.artifacts]
    kl_windows, ft_model = None, None
    if args.kl_text is not None:
        from adamix.compression.calibrate import token_windows
        from adamix.io.text import read_text
        kl_windows = token_windows(read_text(args.kl_text), tok, args.kl_samples, 256)
        ft_model = build_model(Checkpoint(ft))
    rows = []
    for name, path in named:
        model = build_model(Checkpoint(ft)) if path == "ft" else \
            restored_model(base, ft, None if path is None else Artifact(path))
        em = exact_match(model, tok, examples)
        rows.append({"name": name, "exact_match": em, "stderr": math.sqrt(em * (1 - em) / len(examples))})
        if kl_windows is not None:
            rows[-1]["kl_calib"] = divergence_from(ft_model, model, kl_windows)
        print(json.dumps(rows[-1]), flush=True)
        del model
    lo, hi = rows[0]["exact_match"], rows[1]["exact_match"]
    for r in rows:
        r["gain_kept"] = (r["exact_match"] - lo) / (hi - lo) if hi > lo else None
    if args.page:
        write(args, rows, commit, build)


def write(args, rows: list[dict], commit: str, build: str) -> None:
    kl = args.kl_text is not None
    command = (f"python benchmarks/task_score.py --pair {args.pair} --prompts {args.prompts} --page {args.page} "
               + (f"--kl-text TEXT --kl-samples {args.kl_samples} " if kl else "")
               + " ".join(f"'{r['name']}=ARTIFACT'" for r in rows[2:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.page}.json").write_text(json.dumps({"command": command, "commit": commit,
                                                           "finetune_sha256": build, "rows": rows},
                                                           indent=1))
    lines = [f"# Exact match on {args.prompts} test prompts: the {args.pair} fine-tune", "",
             f"Command: `{command}` at commit `{commit}`; each ARTIFACT is a folder written by the command and "
             "commit its name gives. The first 200 "
             "prompts are the tables' own; standard error: the binomial sqrt(p (1 - p) / N). The fine-tune's "
             f"build: `model.safetensors` sha256 `{build}...` (make_smollm_finetune.weights_digest)."
             + (f" KL: mean per token of KL(fine-tune || model) of the next-token distributions on the first "
                f"{args.kl_samples} windows of TEXT (its calibration-side measure, lower is better)." if kl else ""), "",
             "| artifact | exact match | standard error | gain kept |" + (" KL on TEXT |" if kl else ""),
             "|---|---|---|---|" + ("---|" if kl else "")]
    for r in rows:
        kept = "" if r["gain_kept"] is None else f"{r['gain_kept']:.3f}"
        lines.append(f"| {r['name']} | {r['exact_match']:.4f} | {r['stderr']:.4f} | {kept} |"
                     + (f" {r['kl_calib']:.4e} |" if kl else ""))
    (args.out / f"{args.page}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Can the rows of the input embedding that a fine-tune's task reads be found without the task's text?

    python benchmarks/task_rows.py [--pair smollm-code|smollm] [--ranks 6,20] [--calib FILE]
                                   [--out docs/results] [--page NAME]

The task's tokens are those of its training examples (make_smollm_finetune.calibration_text). For
the embedding delta D = E_ft - E_base (vocab x hidden), this ranks every row by |D_r| and by the norm
of its residual after D's rank-k truncation, x_r = D_r - D_r V_k V_k^T (what --token-rows tabulates
beside a rank-k low-rank part), and reports where the task's rows fall: their ranks, how many are
among the top 157 / 1000 / 5000 rows, and their share of the residual's energy. It also counts how
many task tokens a calibration text reads at all (default: gensim's Lee text, the default
calibration). A data-free choice of rows could replace the calibration text only if the task's rows
stood out by their delta. Writes docs/results/<page>.md and .json, naming the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.text import default_calibration_file, read_text  # noqa: E402
from model_budget import pair_folders  # noqa: E402
from peers import git_commit  # noqa: E402

TOPS = (157, 1000, 5000)


def ranks_of(score: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """0-based rank of each of `rows` when all rows are sorted by decreasing `score` (sorted ascending)."""
    order = torch.argsort(score, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank[rows].sort().values


def describe(label: str, score: torch.Tensor, rows: torch.Tensor) -> dict:
    r = ranks_of(score, rows)
    energy = score.double() ** 2
    return {"by": label, "best_rank": int(r[0]) + 1, "median_rank": int(r[len(r) // 2]) + 1, "worst_rank": int(r[-1]) + 1,
            **{f"in_top_{t}": int((r < t).sum()) for t in TOPS},
            "energy_share": float(energy[rows].sum() / energy.sum()), "row_share": len(rows) / len(score)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=("smollm", "smollm-code"), default="smollm-code")
    ap.add_argument("--ranks", default="6,20", help="k of the residual rows (comma-separated)")
    ap.add_argument("--calib", type=Path, default=None, help="a calibration text to count task tokens in (default: Lee)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    ap.add_argument("--page", default=None, help="default task_rows_<pair>")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from make_smollm_finetune import calibration_text
    commit = git_commit()
    base, ft, score = pair_folders(args.pair)
    tok = AutoTokenizer.from_pretrained(ft)
    b, f = Checkpoint(base), Checkpoint(ft)
    name = next(n for n in f.keys() if n.endswith("embed_tokens.weight"))
    D = f.get(name).float() - b.get(name).float()
    task_ids = sorted({i for line in calibration_text(score["task"]).splitlines() for i in tok(line)["input_ids"]})
    calib = args.calib or default_calibration_file()
    calib_ids = {i for line in read_text(calib).splitlines() for i in tok(line)["input_ids"]}
    rows = torch.tensor(task_ids)
    table = [describe("norm of the delta row D_r", D.norm(dim=1), rows)]
    _, _, Vh = torch.linalg.svd(D, full_matrices=False)
    for k in map(int, args.ranks.split(",")):
        R = D - (D @ Vh[:k].T) @ Vh[:k]
        table.append(describe(f"norm of the residual row x_r after rank {k}", R.norm(dim=1), rows))
    result = {"commit": commit, "pair": args.pair, "tensor": name, "vocab_rows": D.shape[0], "task_tokens": len(task_ids),
              "calibration": calib.name, "task_tokens_in_calibration": len(set(task_ids) & calib_ids),
              "calibration_tokens": len(calib_ids), "rows": table}
    page = args.page or f"task_rows_{args.pair.replace('-', '_')}"
    command = f"python benchmarks/task_rows.py --pair {args.pair} --ranks {args.ranks}" + (f" --calib {calib.name}" if args.calib else "")
    lines = [f"# Where the task's embedding rows stand in the delta ({args.pair})", "",
             f"Produced by `{command}` at commit `{commit}`, CPU. `{name}` of the pair, {D.shape[0]} rows; the task's "
             f"training examples read {len(task_ids)} distinct tokens; the calibration text `{calib.name}` reads "
             f"{len(calib_ids)} distinct tokens, {result['task_tokens_in_calibration']} of them the task's.", "",
             "Ranks among all rows, 1 = the largest; a uniform choice would put "
             f"{len(task_ids) * 157 / D.shape[0]:.1f} task rows in the top 157.", "",
             "| rows ranked by | best | median | worst | " + " | ".join(f"in top {t}" for t in TOPS) + " | share of the energy (of the rows) |",
             "|---|---|---|---|" + "---|" * len(TOPS) + "---|"]
    for r in table:
        lines.append(f"| {r['by']} | {r['best_rank']} | {r['median_rank']} | {r['worst_rank']} | "
                     + " | ".join(str(r[f'in_top_{t}']) for t in TOPS)
                     + f" | {r['energy_share']:.4f} ({r['row_share']:.4f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{page}.md").write_text(text)
    (args.out / f"{page}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

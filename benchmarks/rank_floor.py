"""What limits adamix at the smallest ratios on a causal fine-tune: the rank that the budget buys.

    python benchmarks/rank_floor.py [--pair smollm-code|smollm] [--ratios 1/64,1/128,1/256]

At ratio alpha a matrix m x n can keep at most k = floor(alpha 16 m n / c) singular triplets, c the
bits of one triplet at the narrowest width (2 bits on the uniform per-group grid: 2 (m + n) + 32 per
group of 128 entries of u and v + the 16-bit gain, what adamix counts). For every block linear this
benchmark stores the whitened SVD truncated at that k with EXACT float factors: in each layer's
output error on the calibration text, the best that any rank-k delta can do (Eckart-Young in the
norm of H), so no choice of widths >= 2 or of grids, at that size, has a lower layer error. Two models
per ratio: the block linears at that floor and every other matrix exact ("linears at the floor"), and
every matrix at it (the data-free ones by their plain SVD: "all matrices at the floor"). Reported:
exact match on the fine-tune's task (200 test prompts) and the kept share of its gain, perplexity on
the Lee documents, and the relative layer error of the floor on the calibration Grams. The adamix rows
to compare with are in docs/results/smollm-code.md. Writes docs/results/rank_floor_<pair>.md / .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from calibrated import calibrated_deltas  # noqa: E402
from adamix.compression.plan import delta_of, pair_tensors  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.hf import build_model  # noqa: E402
from adamix.methods.allocate import max_kept  # noqa: E402
from adamix.methods.registry import budget_bits  # noqa: E402
from adamix.methods.svd_mixed import triplet_bits  # noqa: E402
from adamix.quant.linalg import output_error, svd  # noqa: E402
from peers import SmolLMMetrics, git_commit, smollm_task  # noqa: E402

NARROWEST, GROUP = 2, 128


def floor_rank(m: int, n: int, alpha: float) -> int:
    """k: the triplets of the narrowest width that fit alpha's budget."""
    cost = triplet_bits(m, n, NARROWEST, GROUP)
    return min(m, n, max_kept([0.0, cost], budget_bits(m, n, alpha)))


def truncated(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, k: int) -> torch.Tensor:
    """U_k S_k V_k^T (m, n) float64."""
    return (U[:, :k] * s[:k]) @ V[:, :k].T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="smollm-code", choices=("smollm-code", "smollm"))
    ap.add_argument("--ratios", default="1/64,1/128,1/256")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    commit = git_commit()
    ratios = [float(Fraction(r)) for r in args.ratios.split(",")]
    from make_smollm_finetune import make_finetune
    task = smollm_task(args.pair)
    base, ft = make_finetune(log=print, task=task)
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    t0 = time.time()
    floors = {a: {} for a in ratios}  # alpha -> {name: D^ in the checkpoint's orientation}
    error = {a: 0.0 for a in ratios}
    energy = 0.0
    for i, name, D, H in calibrated_deltas(base, ft, 128):
        H = H.double()
        U, s, V = svd(D, H, True)
        energy += output_error(None, D, H)
        transposed = tuple(D.shape) != tuple(base_ck.slice_info(name)[0])  # a Conv1D weight: stored (in, out)
        for a in ratios:
            Dk = truncated(U, s, V, floor_rank(*D.shape, a))
            error[a] += output_error(Dk, D.double(), H)
            floors[a][name] = (Dk.T if transposed else Dk).float()
        print(f"block {i} {name} done, {time.time() - t0:.0f} s", flush=True)
    names, _ = pair_tensors(base_ck, ft_ck)
    free = [n for n in names if n not in floors[ratios[0]] and len(base_ck.slice_info(n)[0]) == 2]
    free_floors = {a: {} for a in ratios}
    for name in free:
        D = delta_of(base_ck, ft_ck, name).double()
        U, s, V = svd(D)
        for a in ratios:
            free_floors[a][name] = truncated(U, s, V, floor_rank(*D.shape, a)).float()
    metrics = SmolLMMetrics(ft, task)
    ref = {"base": metrics(build_model(ft_ck, base_ck.get)), "finetune": metrics(build_model(ft_ck))}
    gain = ref["finetune"]["exact_match"] - ref["base"]["exact_match"]
    rows = []
    for a in ratios:
        for variant, replaced in (("linears at the floor", floors[a]), ("all matrices at the floor", {**floors[a], **free_floors[a]})):
            def tensor(name: str, replaced=replaced) -> torch.Tensor:
                if name in replaced:
                    return base_ck.get(name).float() + replaced[name]
                return ft_ck.get(name)
            r = {"alpha": a, "variant": variant, **metrics(build_model(ft_ck, tensor)),
                 "layer_error": (error[a] / energy) ** 0.5}
            r["gain_kept"] = (r["exact_match"] - ref["base"]["exact_match"]) / gain if gain else None
            rows.append(r)
            print(json.dumps(r), flush=True)
    result = {"command": f"python benchmarks/rank_floor.py --pair {args.pair} --ratios {args.ratios}",
              "commit": commit, "reference": ref, "rows": rows, "wall_s": time.time() - t0,
              "free_matrices": free}
    out = Path(args.out)
    (out / f"rank_floor_{args.pair.replace('-', '_')}.json").write_text(json.dumps(result, indent=1))
    (out / f"rank_floor_{args.pair.replace('-', '_')}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = ["# The rank floor: the best rank that the budget buys, stored exactly", "",
             f"Command: `{result['command']}` at commit `{result['commit']}`, CPU, {result['wall_s']:.0f} s. "
             "Each block linear: its whitened SVD truncated at the number of 2-bit triplets that fit the ratio, "
             "factors exact (float32). No stored artifact of that size keeping widths >= 2 has a lower layer "
             "error. Exact match: base "
             f"{ref['base']['exact_match']:.3f}, fine-tune {ref['finetune']['exact_match']:.3f}. Data-free "
             f"matrices: {', '.join(result['free_matrices'])}.", "",
             "| ratio | variant | layer error (calibration) | exact match | gain kept | perplexity (Lee) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {Fraction(r['alpha']).limit_denominator(4096)} | {r['variant']} | {r['layer_error']:.4f} | "
                     f"{r['exact_match']:.3f} | {r['gain_kept']:.3f} | {r['ppl_lee']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

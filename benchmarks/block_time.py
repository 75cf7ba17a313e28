"""Where a block's time goes, against a bare full SVD of the same matrices: SVD algorithm and threads.

    python benchmarks/block_time.py [--hidden 1024 --intermediate 2752 --heads 8] [--blocks 4]
                                    [--svd full,gram] [--threads 1,2] [--samples 32] [--seqlen 256]
                                    [--svd-only] [--repeats 1] [--work DIR] [--out docs/results]

On the synthetic Llama-shaped pair of bounded_memory.py (same deltas: a decaying spectrum plus noise),
for every SVD algorithm x thread count: `adamix compress` (adamix, 1/16, calibrated) in a child
process, its wall time start to artifact, per block, split by phase; and in a child process with the
same threads, the yardstick: a bare `torch.linalg.svd` (LAPACK, `--svd full`) of every linear delta
of the model (7 per block) and, for comparison, the Gram SVD of the same matrices. Ratios are to the
bare full SVD at the same thread count, so the target "whole per-block time <= 1.0x a bare full SVD"
reads off directly. Runs one at a time (a run beside another job is slower and says so nowhere).
With threads below the cores, the ILP runs in a worker thread on a spare core (compression.encode):
its phase time then overlaps the others and is not part of the remainder.
--repeats R measures the yardstick and the runs R times in turn and takes ratios against the mean
yardstick (a VM's bare SVD varies between runs by tens of percent, the runs less).
--svd-only measures only the bare SVDs (block_time_<hidden>_svd.md: at width 4096 a compression per
configuration takes long on a small machine). Writes docs/results/block_time_<hidden>.md and .json with
the command and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = """
import json, sys
import adamix
m = adamix.compress(sys.argv[1], sys.argv[2], sys.argv[3], calib=sys.argv[4], samples=int(sys.argv[5]),
                    seqlen=int(sys.argv[6]), threads=int(sys.argv[7]), svd=sys.argv[8], overwrite=True, progress=False)
print("RESULT " + json.dumps({"sizes": m["sizes"], "phases": m["seconds_by_phase"]}))
"""

YARDSTICK = """
import json, sys, time
import torch
from adamix.compression.plan import delta_of
from adamix.io.checkpoint import Checkpoint
from adamix.quant.linalg import svd
from adamix.threads import compute_threads
base, ft = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2])
names = [n for n in ft.keys() if n.endswith("proj.weight")]
out = {"matrices": len(names), "full": 0.0, "gram": 0.0, "s_rel_diff": 0.0}
with compute_threads(int(sys.argv[3])):
    for name in names:
        D = delta_of(base, ft, name)
        res = {}
        for alg in ("full", "gram"):
            t = time.perf_counter()
            res[alg] = svd(D, algorithm=alg)
            out[alg] += time.perf_counter() - t
        s_full, s_gram = res["full"][1], res["gram"][1]
        out["s_rel_diff"] = max(out["s_rel_diff"], float(((s_gram - s_full).abs() / s_full[0]).max()))
print("RESULT " + json.dumps(out))
"""


def child(code: str, *args: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic model's shape (bounded_memory.py's pairs; default width 1024), the work and out folders."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2752)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "bounded"))
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))


def lines_svd_only(args, commit: str, nb: int) -> list[str]:
    from adamix.threads import available_cores
    return [f"# Bare SVDs of a synthetic Llama-shaped model's deltas (hidden {args.hidden}, intermediate "
            f"{args.intermediate}, {nb} blocks)", "",
            f"Produced by `python benchmarks/block_time.py {' '.join(sys.argv[1:])}` at commit `{commit}`, CPU "
            f"({available_cores()} cores), one at a time. `adamix.quant.linalg.svd` of each of the {7 * nb} linear "
            "deltas with `algorithm=\"full\"` (LAPACK) and `\"gram\"` (the smaller Gram's eigendecomposition), "
            "in the dtype the pipeline uses (float32 above 16M entries)."]


def main() -> None:
    import bounded_memory as bm
    from peers import git_commit
    from adamix.io.text import default_calibration_file
    from adamix.threads import available_cores
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--svd", default="full,gram")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--svd-only", action="store_true", help="only the bare SVDs (the yardstick and the Gram SVD)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of (yardstick, runs) per thread count; ratios against the mean yardstick "
                         "(a VM's bare SVD varies between runs)")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    commit = git_commit()
    bm.set_shape(args.hidden, args.intermediate, args.heads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    calib = default_calibration_file()
    base, ft = bm.write_pair(work, args.blocks, calib)
    threads = [int(t) for t in args.threads.split(",")]
    if max(threads) > available_cores():
        raise SystemExit(f"--threads {max(threads)}: only {available_cores()} cores here")
    runs, rounds = [], {}  # rounds: thread count -> one yardstick per round
    for t in threads:
        for rep in range(args.repeats):
            rounds.setdefault(t, []).append(child(YARDSTICK, base, ft, t, threads=t))
            print(f"{t} thread(s), round {rep + 1}: bare SVDs {json.dumps(rounds[t][-1])}", flush=True)
            for alg in ([] if args.svd_only else args.svd.split(",")):
                t0 = time.time()
                r = child(CHILD, base, ft, work / f"block_time_{args.hidden}", calib, args.samples, args.seqlen, t, alg,
                          threads=t)
                r.update(svd=alg, threads=t, round=rep + 1, outer_wall_s=time.time() - t0)
                runs.append(r)
                print(f"{t} thread(s), svd {alg}, round {rep + 1}: {json.dumps(r)}", flush=True)
    sticks = {t: {k: sum(x[k] for x in xs) / len(xs) if k != "s_rel_diff" else max(x[k] for x in xs) for k in xs[0]}
              for t, xs in rounds.items()}  # the mean yardstick per thread count (the largest s difference)
    recorded = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths of this machine in the results
    result = {"commit": commit, "args": recorded, "yardstick": sticks, "yardstick_rounds": rounds, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"block_time_{args.hidden}" + ("_svd" if args.svd_only else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    nb = args.blocks
    lines = [f"# Time per block: synthetic Llama-shaped model (hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{nb} blocks)", "",
             f"Produced by `python benchmarks/block_time.py {' '.join(sys.argv[1:])}` at commit `{commit}`, CPU "
             f"({available_cores()} cores), runs one at a time; adamix at 1/16, calibration {args.samples} windows x "
             f"{args.seqlen} tokens. Yardstick: a bare `torch.linalg.svd` of the model's {7 * nb} linear deltas "
             f"at the same thread count, measured before each of {args.repeats} round(s) of runs; ratios against "
             "its mean.", "",
             "| threads | svd | round | whole run s | per block s | x bare full SVD | ILP worker threads | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"] if runs else lines_svd_only(args, commit, nb)
    for r in runs:
        bare = sticks[r["threads"]]["full"]
        wall = r["sizes"]["wall_seconds"]
        lines.append(f"| {r['threads']} | {r['svd']} | {r['round']} | {wall:.1f} | {wall / nb:.1f} | {wall / bare:.2f} | "
                     f"{r['sizes'].get('ilp_workers', 0)} | {r['sizes']['peak_rss_mib']:.0f} |")
    if args.repeats > 1:
        for t in threads:
            for alg in sorted({r["svd"] for r in runs}):
                walls = [r["sizes"]["wall_seconds"] for r in runs if r["threads"] == t and r["svd"] == alg]
                mean = sum(walls) / len(walls)
                lines.append(f"| {t} | {alg} | mean | {mean:.1f} | {mean / nb:.1f} | {mean / sticks[t]['full']:.2f} | | |")
    lines += ["", "`x bare full SVD`: the whole run, start to artifact, over the bare full SVDs of all its deltas "
              "(per block, the same ratio).", "",
              "| threads | bare full SVD s (all deltas) | bare Gram SVD s | Gram / full | largest abs(s_gram - s_full) / s_1 |",
              "|---|---|---|---|---|"]
    for t, xs in rounds.items():
        for rep, s in enumerate(xs + ([sticks[t]] if len(xs) > 1 else [])):
            label = f"{t}" if len(xs) == 1 else f"{t} ({'mean' if rep == len(xs) else f'round {rep + 1}'})"
            lines.append(f"| {label} | {s['full']:.1f} | {s['gram']:.1f} | {s['gram'] / s['full']:.2f} | {s['s_rel_diff']:.1e} |")
    phases = sorted({p for r in runs for p in r["phases"]})
    lines += [] if not runs else ["", "Seconds per block by phase (`other`: the wall time no phase covers; with the ILP overlapped "
              "its phase runs beside the others):", "",
              "| threads | svd | round | " + " | ".join(phases) + " | other |", "|---|---|---|" + "---|" * (len(phases) + 1)]
    for r in runs:
        ph = r["phases"]
        other = r["sizes"]["wall_seconds"] - sum(v for p, v in ph.items() if not (p == "ilp" and r["sizes"].get("ilp_workers")))
        lines.append(f"| {r['threads']} | {r['svd']} | {r['round']} | " + " | ".join(f"{ph.get(p, 0.0) / nb:.1f}" for p in phases)
                     + f" | {other / nb:.1f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

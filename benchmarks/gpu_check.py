"""adamix on one GPU: time per block at Llama-2-7B's width, a projected 7B and 70B time, and the
agreement of a GPU run's artifact with the CPU run's.

    PYTHONPATH=src python benchmarks/gpu_check.py [--device cuda] [--hidden 4096 --intermediate 11008
        --heads 32 --blocks 2] [--agree-hidden 1024 --agree-intermediate 2752 --agree-heads 8 --agree-blocks 2]
        [--samples 32] [--seqlen 256] [--work DIR] [--out DIR] [--commit SHA]

Needs only what adamix imports (torch, transformers, safetensors, scipy, numpy, tqdm): no model hub,
no gensim. Everything is generated where it runs: a seeded synthetic text (calibration, and a second
one held out) and bounded_memory.py's synthetic Llama-shaped pairs (bf16, decaying spectrum plus
noise per delta). Steps, each written to <out>/gpu_check.json as soon as it is done:

1. timing: the wide pair (default hidden 4096 / intermediate 11008, Llama-2-7B's block); `adamix
   compress` (adamix, 1/16, calibrated) with `--device` in a child process: wall time start to
   artifact, per block, split by phase, peak GPU memory; the yardstick, a bare `torch.linalg.svd`
   of block 0's seven deltas on the same device (float32, as the pipeline takes them at this width).
2. projection: per-block time x 32 blocks (Llama-2-7B) and, for Llama-2-70B (80 blocks of hidden
   8192, intermediate 28672, 8 key-value heads), per-block time x the ratio of the blocks' cubic work
   sum(m n min(m, n)) (SVD, GPTQ's Cholesky and error-table products all scale so): a model, not a
   measurement.
3. agreement: the narrow pair compressed on the CPU (all cores) and with `--device`; the relative
   output error of both artifacts on the held-out text; the target is a difference within 1% relative.
   Bytes may differ (other rounding on the device shifts near-ties of the ILP).

benchmarks/gpu_check.sh runs this and the CUDA tests in one go; docs/results/gpu_check.md is its page.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = """
import json, sys, torch
import adamix
m = adamix.compress(sys.argv[1], sys.argv[2], sys.argv[3], calib=sys.argv[4], samples=int(sys.argv[5]),
                    seqlen=int(sys.argv[6]), device=sys.argv[7], ratio="1/16", overwrite=True, progress=False)
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
print("RESULT " + json.dumps({"sizes": m["sizes"], "phases": m["seconds_by_phase"], "peak_gpu_mib": gpu}))
"""

YARDSTICK = """
import json, sys, time, torch
from adamix.compression.plan import delta_of
from adamix.io.checkpoint import Checkpoint
from adamix.quant.linalg import svd
base, ft, device = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2]), torch.device(sys.argv[3])
names = [n for n in ft.keys() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
out = {"matrices": len(names), "full": 0.0, "gram": 0.0}
for alg in ("full", "gram"):
    svd(delta_of(base, ft, names[0]).to(device), algorithm=alg)  # warm-up: CUDA context, solver handles
for name in names:
    D = delta_of(base, ft, name).to(device)
    for alg in ("full", "gram"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        svd(D, algorithm=alg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[alg] += time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "kv": 4096, "blocks": 32}
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv": 1024, "blocks": 80}


def synthetic_text(path: Path, seed: int, lines: int = 3000, words: int = 4000) -> Path:
    """A seeded text of `lines` documents over `words` made-up words of Zipf-like frequency."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(words)]
    weights = [1.0 / (1 + i) for i in range(words)]
    path.write_text("\n".join(" ".join(rng.choices(vocab, weights, k=rng.randint(20, 80))) for _ in range(lines)) + "\n")
    return path


def child(code: str, *args, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def cubic_work(hidden: int, intermediate: int, kv: int) -> float:
    """sum over a Llama block's seven linears of m n min(m, n)."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
              (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return float(sum(m * n * min(m, n) for m, n in shapes))


def pair(bm, work: Path, hidden: int, intermediate: int, heads: int, blocks: int, calib: Path) -> tuple[Path, Path]:
    bm.set_shape(hidden, intermediate, heads)
    return bm.write_pair(work, blocks, calib)


def main() -> None:
    import torch

    import bounded_memory as bm
    from adamix.eval.heldout import relative_output_error
    from adamix.threads import available_cores
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--agree-hidden", type=int, default=1024)
    ap.add_argument("--agree-intermediate", type=int, default=2752)
    ap.add_argument("--agree-heads", type=int, default=8)
    ap.add_argument("--agree-blocks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--skip", default="", help="steps to leave out: timing, agreement (comma-separated)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "gpu"))
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    ap.add_argument("--commit", default=os.environ.get("ADAMIX_COMMIT", "unknown"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    recorded = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths of this machine in the results
    result = {"commit": args.commit, "args": recorded, "torch": torch.__version__, "cores": available_cores(),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}

    def save(step: str, value) -> None:
        result[step] = value
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
        print(f"{step}: {json.dumps(value)}", flush=True)

    save("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    calib = synthetic_text(work / "calib.txt", 0)
    held = synthetic_text(work / "heldout.txt", 1, lines=400).read_text().splitlines()
    skip = set(filter(None, args.skip.split(",")))
    if "timing" not in skip:
        t0 = time.time()
        base, ft = pair(bm, work, args.hidden, args.intermediate, args.heads, args.blocks, calib)
        save("generate_s", round(time.time() - t0, 1))
        stick = child(YARDSTICK, base, ft, args.device)
        save("yardstick", stick)
        t0 = time.time()
        run = child(CHILD, base, ft, work / f"gpu_{args.hidden}", calib, args.samples, args.seqlen, args.device)
        run["outer_wall_s"] = round(time.time() - t0, 1)
        per_block = run["sizes"]["wall_seconds"] / args.blocks
        run.update(per_block_s=round(per_block, 2), x_bare_full_svd_per_block=round(per_block / stick["full"], 3))
        save("timing", run)
        w = cubic_work(args.hidden, args.intermediate, args.hidden)
        save("projection", {
            "7B_blocks_s": round(per_block * LLAMA_7B["blocks"] * cubic_work(4096, 11008, 4096) / w, 1),
            "70B_blocks_s": round(per_block * LLAMA_70B["blocks"] * cubic_work(8192, 28672, 1024) / w, 1),
            "work_ratio_70B_per_block": round(cubic_work(8192, 28672, 1024) / w, 3)})
    if "agreement" not in skip:
        base, ft = pair(bm, work, args.agree_hidden, args.agree_intermediate, args.agree_heads, args.agree_blocks, calib)
        rows = {}
        for device in ("cpu", args.device):
            t0 = time.time()
            r = child(CHILD, base, ft, work / f"agree_{device}", calib, args.samples, args.seqlen, device)
            err = relative_output_error(base, ft, work / f"agree_{device}", held, samples=64, seqlen=args.seqlen,
                                        device=args.device)["relative_error"]
            rows[device] = {"heldout_error": err, "wall_s": r["sizes"]["wall_seconds"],
                            "total_bytes": r["sizes"]["total_bytes"], "threads": r["sizes"]["threads"],
                            "ilp_workers": r["sizes"]["ilp_workers"], "outer_s": round(time.time() - t0, 1)}
        a, b = rows["cpu"]["heldout_error"], rows[args.device]["heldout_error"]
        save("agreement", {**rows, "relative_difference": abs(b - a) / a, "within_1pct": abs(b - a) <= 0.01 * a})
    save("finished", time.strftime("%Y-%m-%d %H:%M:%S"))


if __name__ == "__main__":
    main()

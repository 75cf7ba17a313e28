"""Ray on this machine: N workers x T threads against one process, on a synthetic Llama-shaped model.

    python benchmarks/ray_workers.py [--hidden 1024 --intermediate 2752 --heads 8] [--blocks 4]
                                     [--configs local:1x2,local:1x1,ray:1x2,ray:2x1] [--out docs/results]

Each configuration is one `adamix compress` (adamix, 1/16, calibrated) in a child process, one after
the other: `local:1xT` is the single process with T threads; `ray:NxT` is `--executor ray --workers N
--threads T` (Ray started on this machine, its start-up counted). Reports the wall time start to
artifact, the speed-up over the first configuration, and whether the artifact is byte-identical to
the local run with the same threads per process (floating-point sums may differ between thread
counts, so that is the comparison the byte identity is about). Writes docs/results/ray_workers_<hidden>.md
and .json with the command and commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = """
import json, sys
import adamix
kind, workers, threads = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
extra = {"executor": "ray", "workers": workers} if kind == "ray" else {}
m = adamix.compress(sys.argv[1], sys.argv[2], sys.argv[3], calib=sys.argv[4], samples=32, seqlen=256, threads=threads,
                    progress=False, **extra)
print("RESULT " + json.dumps({"sizes": m["sizes"]}))
"""


def main() -> None:
    import bounded_memory as bm
    from block_time import add_model_args, child
    from peers import git_commit
    from adamix.io.text import default_calibration_file
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--configs", default="local:1x2,local:1x1,ray:1x2,ray:2x1")
    args = ap.parse_args()
    commit = git_commit()
    bm.set_shape(args.hidden, args.intermediate, args.heads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = default_calibration_file()
    base, ft = bm.write_pair(work, args.blocks, calib)
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for cfg in args.configs.split(","):
            kind, shape = cfg.split(":")
            workers, threads = (int(v) for v in shape.split("x"))
            out = Path(tmp) / cfg.replace(":", "-")
            t0 = time.time()
            r = child(CHILD, base, ft, out, calib, kind, workers, threads, threads=threads)
            sha = hashlib.sha256((out / "delta.safetensors").read_bytes() + (out / "manifest.json").read_bytes()).hexdigest()
            rows.append({"config": cfg, "wall_s": r["sizes"]["wall_seconds"], "outer_s": time.time() - t0, "sha": sha,
                         "peak_rss_mib": r["sizes"]["peak_rss_mib"]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ray_workers_{args.hidden}"
    recorded = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths of this machine in the results
    (out / f"{stem}.json").write_text(json.dumps({"commit": commit, "args": recorded, "rows": rows}, indent=1))
    first = rows[0]
    lines = [f"# Ray workers against one process (hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.blocks} blocks)", "",
             f"Produced by `python benchmarks/ray_workers.py {' '.join(sys.argv[1:])}` at commit `{commit}`, CPU, "
             "runs one at a time; adamix at 1/16, calibration 32 windows x 256 tokens. `local:1xT`: one process, T "
             "threads; `ray:NxT`: `--executor ray --workers N --threads T`, Ray started here (its start-up counted).", "",
             "| configuration | wall s | speed-up over the first | peak RSS MiB (largest process) | same bytes as local, same threads |",
             "|---|---|---|---|---|"]
    local = {r["config"].split("x")[1]: r["sha"] for r in rows if r["config"].startswith("local:")}
    for r in rows:
        same = local.get(r["config"].split("x")[1])
        lines.append(f"| {r['config']} | {r['wall_s']:.1f} | {first['wall_s'] / r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{'-' if same is None or r['config'].startswith('local:') else 'yes' if r['sha'] == same else 'NO'} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

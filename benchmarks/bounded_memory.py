"""Peak memory does not grow with depth; where the time of a block goes (issue 5).

    OMP_NUM_THREADS=1 python benchmarks/bounded_memory.py [--blocks 2,4] [--samples 32] [--seqlen 256] [--parallel]
                                                          [--work DIR] [--out docs/results]

Writes synthetic Llama-shaped pairs (hidden 4096, intermediate 11008, 32 heads, bf16, sharded
safetensors of <= 1 GB with an index, vocabulary 8192 from a word-level tokenizer trained on the
calibration text) with 2 and 4 blocks. Every linear's delta is a decaying spectrum plus noise,
D = A diag(s) B^T + N with s_i ~ (1 + i)^-0.7 over rank 512, ||N|| = 0.3 ||A S B^T||, ||D|| = 1% of
||W_base||; norms get small raw deltas; embeddings and head are unchanged (a typical fine-tune
without new vocabulary). Then `adamix.compress` runs in a child process per model, with calibration,
and reports peak RSS (VmHWM), wall time and seconds by phase. Per-block figures are the deepest
run's totals divided by its depth (its fixed costs are a few seconds). In the same run, a bare `adamix.quant.linalg.svd` of one block's 7 deltas gives the
yardstick: whole per-block time / bare SVD time. Results: docs/results/bounded_memory[_<hidden>].md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 8192
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}
SHARD_BYTES = 1 << 30


def set_shape(hidden: int, inter: int, heads: int) -> None:
    """Model width (the defaults are Llama-2-7B's)."""
    global HIDDEN, INTER, HEADS, LINEARS
    HIDDEN, INTER, HEADS = hidden, inter, heads
    LINEARS = {k: tuple(hidden if d == 4096 else inter for d in shape) for k, shape in
               {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
                "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
                "mlp.down_proj": (4096, 11008)}.items()}


def synthetic_delta(m: int, n: int, g: torch.Generator, rank: int = 512) -> torch.Tensor:
    """Unit-norm D (m x n) = A diag(s) B^T + N: a decaying spectrum over `rank` plus 30% noise."""
    A = torch.randn(m, rank, generator=g) / m ** 0.5
    B = torch.randn(n, rank, generator=g) / n ** 0.5
    s = (1.0 + torch.arange(rank, dtype=torch.float32)) ** -0.7
    low = (A * s) @ B.T
    noise = torch.randn(m, n, generator=g)
    D = low / low.norm() + 0.3 * noise / noise.norm()
    return D / D.norm()


def tensors_of(blocks: int, g: torch.Generator):
    """(name, base tensor, fine-tune tensor) in checkpoint order, generated one at a time (bf16)."""
    emb = (0.02 * torch.randn(VOCAB, HIDDEN, generator=g)).bfloat16()
    yield "model.embed_tokens.weight", emb, emb
    for i in range(blocks):
        p = f"model.layers.{i}."
        for name, (m, n) in LINEARS.items():
            W = 0.02 * torch.randn(m, n, generator=g)
            D = synthetic_delta(m, n, g) * 0.01 * W.norm()
            yield f"{p}{name}.weight", W.bfloat16(), (W + D).bfloat16()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = torch.ones(HIDDEN)
            yield f"{p}{norm}.weight", w.bfloat16(), (w + 0.01 * torch.randn(HIDDEN, generator=g)).bfloat16()
    yield "model.norm.weight", torch.ones(HIDDEN).bfloat16(), torch.ones(HIDDEN).bfloat16()
    head = (0.02 * torch.randn(VOCAB, HIDDEN, generator=g)).bfloat16()
    yield "lm_head.weight", head, head


def tokenizer(calib: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(calib)], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def write_pair(root: Path, blocks: int, calib: Path) -> tuple[Path, Path]:
    """Write base/ and finetuned/ (sharded safetensors + index, config, tokenizer) unless present."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    base, ft = root / f"llama{HIDDEN}x{blocks}-base", root / f"llama{HIDDEN}x{blocks}-ft"
    if (ft / "model.safetensors.index.json").is_file():
        return base, ft
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=blocks,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    tok = tokenizer(calib)
    shards: dict[Path, list] = {base: [[]], ft: [[]]}
    for name, wb, wf in tensors_of(blocks, torch.Generator().manual_seed(blocks)):
        for folder, w in ((base, wb), (ft, wf)):
            cur = shards[folder][-1]
            if cur and sum(t.numel() * 2 for _, t in cur) + w.numel() * 2 > SHARD_BYTES:
                shards[folder].append(cur := [])
            cur.append((name, w))
    for folder, parts in shards.items():
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        tok.save_pretrained(folder)
        weight_map = {}
        for k, part in enumerate(parts):
            fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
            save_file({n: t.contiguous() for n, t in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n, _ in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return base, ft


CHILD = """
import json, sys
import adamix
m = adamix.compress(sys.argv[1], sys.argv[2], sys.argv[3], calib=sys.argv[4], samples=int(sys.argv[5]),
                    seqlen=int(sys.argv[6]), overwrite=True, progress=False)
print("RESULT " + json.dumps({"sizes": m["sizes"], "phases": m["seconds_by_phase"]}))
"""


def start_child(base: Path, ft: Path, out: Path, calib: Path, samples: int, seqlen: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(base), str(ft), str(out), str(calib), str(samples), str(seqlen)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def child_result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"compress failed:\n{stderr[-3000:]}")
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def stem() -> str:
    """Result file name: bounded_memory (the default width) or bounded_memory_<hidden>."""
    return "bounded_memory" if HIDDEN == 4096 else f"bounded_memory_{HIDDEN}"


def vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def watch(procs: dict[int, subprocess.Popen], work: Path, out: Path, every: float = 10.0) -> None:
    """While the children run: their peak RSS so far and the time each block's chunk appeared, saved
    to OUT/bounded_memory_progress.json (so that a run stopped early still says what it saw)."""
    from adamix.compression.partial import partial_dir
    t0 = time.time()
    seen: dict[int, dict] = {nb: {"peak_rss_mib": 0.0, "block_done_s": {}} for nb in procs}
    while any(p.poll() is None for p in procs.values()):
        for nb, proc in procs.items():
            hwm = vm_hwm_mib(proc.pid)
            if hwm:
                seen[nb]["peak_rss_mib"] = max(seen[nb]["peak_rss_mib"], hwm)
            for chunk in partial_dir(work / f"delta{HIDDEN}x{nb}").glob("block-*.json"):
                seen[nb]["block_done_s"].setdefault(chunk.stem, round(time.time() - t0, 1))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem()}_progress.json").write_text(json.dumps({"elapsed_s": round(time.time() - t0), **{str(k): v for k, v in seen.items()}}, indent=1))
        time.sleep(every)
    return seen


def bare_svd_seconds(base: Path, ft: Path) -> float:
    from adamix.io.checkpoint import Checkpoint
    from adamix.quant.linalg import svd
    from adamix.compression.plan import delta_of
    b, f = Checkpoint(base), Checkpoint(ft)
    total = 0.0
    for name in LINEARS:
        D = delta_of(b, f, f"model.layers.0.{name}.weight")
        t = time.time()
        svd(D, algorithm="full")  # the yardstick: LAPACK's SVD (the pipeline's default is the Gram SVD)
        total += time.time() - t
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="2,4")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--intermediate", type=int, default=INTER)
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--parallel", action="store_true",
                    help="run the compressions at the same time (one core each): faster, per-block times contended")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "bounded"))
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    set_shape(args.hidden, args.intermediate, args.heads)
    sys.path.insert(0, str(Path(__file__).parent))
    from peers import git_commit
    from adamix.io.text import default_calibration_file
    commit = git_commit()
    calib = default_calibration_file()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    runs, procs = {}, {}
    for nb in (int(b) for b in args.blocks.split(",")):
        t = time.time()
        base, ft = write_pair(work, nb, calib)
        print(f"{nb} blocks: models ready ({time.time() - t:.0f} s)", flush=True)
        procs[nb] = start_child(base, ft, work / f"delta{HIDDEN}x{nb}", calib, args.samples, args.seqlen)
        if not args.parallel:
            runs[nb] = child_result(procs[nb])
            print(f"{nb} blocks: {json.dumps(runs[nb])}", flush=True)
    progress = watch(procs, work, out)
    for nb, proc in procs.items():
        if nb not in runs:
            runs[nb] = child_result(proc)
            print(f"{nb} blocks: {json.dumps(runs[nb])}", flush=True)
    lo, hi = min(runs), max(runs)
    svd_s = bare_svd_seconds(*write_pair(work, lo, calib))
    # Per block: the deepest run's totals / its depth (its fixed costs, start-up and fingerprints,
    # are a few seconds; a difference of two runs would carry the noise of both, e.g. a slow ILP).
    per_block = runs[hi]["sizes"]["wall_seconds"] / hi
    split = {p: v / hi for p, v in runs[hi]["phases"].items()}
    split["other"] = per_block - sum(split.values())
    rss = {nb: r["sizes"]["peak_rss_mib"] for nb, r in runs.items()}
    result = {"commit": commit, "samples": args.samples, "seqlen": args.seqlen, "runs": runs, "per_block_s": per_block,
              "per_block_split_s": split, "bare_svd_block_s": svd_s, "block_done_s": progress, "rss_growth": rss[hi] / rss[lo] - 1}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem()}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Bounded memory: synthetic Llama-shaped models (hidden {HIDDEN}, intermediate {INTER}, {HEADS} heads)", "",
             f"Produced by `OMP_NUM_THREADS=1 python benchmarks/bounded_memory.py {' '.join(sys.argv[1:])}` at commit `{commit}`; calibration "
             f"{args.samples} windows x {args.seqlen} tokens of lee_background.cor, ratio 1/16, method adamix, CPU, 1 thread"
             + (" per run, runs side by side (--parallel)" if args.parallel else "") + ".", "",
             "| blocks | peak RSS (MiB) | wall (s) | artifact (MiB) | achieved alpha |", "|---|---|---|---|---|"]
    for nb, r in sorted(runs.items()):
        s = r["sizes"]
        lines.append(f"| {nb} | {s['peak_rss_mib']:.0f} | {s['wall_seconds']:.0f} | {s['total_bytes'] / 2**20:.1f} | {s['alpha_achieved']:.4f} |")
    lines += ["", f"Peak RSS {hi} blocks / {lo} blocks: **{rss[hi] / rss[lo]:.3f}** (target: within 10%, and below 4 GB = 3815 MiB).", "",
              f"Per block ({hi}-block run / {hi}): **{per_block:.0f} s**; a bare full SVD (`torch.linalg.svd`) of the same "
              f"block's 7 deltas in this run: {svd_s:.0f} s; ratio **{per_block / svd_s:.2f}x**.", "",
              "| phase | s per block | share |", "|---|---|---|"]
    for p, v in sorted(split.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {p} | {v:.1f} | {v / per_block:.0%} |")
    (out / f"{stem()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

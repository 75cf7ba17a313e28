"""The SmolLM2 task metric of `export-peft --lora-only` adapters loaded by `peft`, against the same
model built in memory (the base plus the artifact's low-rank deltas), with and without an export-time
rank cap.

    python benchmarks/peft_adapters.py ARTIFACT [--caps none,128,64] [--out docs/results]

ARTIFACT: a SmolLM2 adamix artifact of the cached word-reversal fine-tune (e.g. the one
benchmarks/peers.py writes to its work folder, adamix-1_16). For each cap: `export_peft(lora_only=True,
uniform_rank=True, max_rank=cap, dtype=float32)`, loaded with `peft.PeftModel`, exact match on the 200
held-out prompts; beside it, the in-memory model with the same factors (W + B A on the LoRA modules).
Writes docs/results/peft_adapters_smollm.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from make_smollm_finetune import exact_match, make_finetune, task_examples  # noqa: E402

from adamix.export.peft import export_peft  # noqa: E402
from adamix.io.checkpoint import Checkpoint  # noqa: E402
from adamix.io.hf import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--caps", default="none,128,64")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    ap.add_argument("--name", default="peft_adapters_smollm.md", help="the page's file name in --out")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, ft = make_finetune(log=print)
    tok, examples = AutoTokenizer.from_pretrained(ft), task_examples("test", 200)
    rows, t0 = [], time.time()
    for cap in [None if c == "none" else int(c) for c in args.caps.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            s = export_peft(base, args.artifact, out, lora_only=True, uniform_rank=True, max_rank=cap, dtype="float32")
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
            em_peft = exact_match(peft_model, tok, examples)
            tensors = load_file(str(out / "adapter_model.safetensors"))
            prefix = "base_model.model."
            deltas = {}
            for key, A in tensors.items():
                if key.endswith("lora_A.weight"):
                    module = key[len(prefix):-len(".lora_A.weight")]
                    deltas[module + ".weight"] = tensors[key.replace("lora_A", "lora_B")].double() @ A.double()
            base_ck = Checkpoint(base)
            model = build_model(base_ck, lambda n: (base_ck.get(n).double() + deltas[n]).float() if n in deltas
                                else base_ck.get(n))
            em_memory = exact_match(model, tok, examples)
        pooled = (s["capped"] or {}).get("pooled", {})
        rows.append({"cap": cap, "r": s["r"], "modules": len(s["lora"]), "bytes": s["bytes"], "peft": em_peft,
                     "memory": em_memory, "error_after": pooled.get("error_after")})
        print(rows[-1], flush=True)
    lines = ["# `export-peft --lora-only` adapters of SmolLM2 loaded by peft", "",
             f"`python {' '.join(sys.argv).replace(str(Path.home()), '~')}` at commit `{commit}`, CPU, {time.time() - t0:.0f} s. Exact match of greedy "
             "answers on 200 held-out word-reversal prompts: the adapter loaded by `peft.PeftModel` beside the base "
             "with the same low-rank deltas added in memory (float32). Without a cap the adapter holds the "
             "artifact's factors; with a cap, the pairs of largest stored gain (`export-peft --max-rank`).", "",
             "| cap | adapter r | LoRA modules | adapter bytes | exact match (peft) | exact match (in memory) | "
             "predicted error of the tensors cut |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cap'] or 'none'} | {r['r']} | {r['modules']} | {r['bytes']:,} | {r['peft']:.3f} | "
                     f"{r['memory']:.3f} | " + (f"{r['error_after']:.4f}" if r["error_after"] is not None else "-") + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / args.name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""The `adamix` command: compress, merge, export-peft, inspect, demo."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import AdamixError
from .methods import METHODS

CALIB_HELP = ("calibration text file; 'default' uses gensim's lee_background.cor (ships with gensim, "
              "a few hundred news paragraphs); 'none' = data-free (H = I, RTN)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adamix", description="Store a fine-tune as a tiny mixed-precision delta "
                                "against its base (ADAMIX), and restore it.")
    p.add_argument("--version", action="version", version=f"adamix {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress FINETUNED against BASE into a delta folder")
    c.add_argument("base", help="base model: Hugging Face folder (config.json + safetensors) or .gguf file")
    c.add_argument("finetuned", help="fine-tuned model, same forms as BASE")
    c.add_argument("-o", "--out", required=True, help="output delta folder (must not exist)")
    c.add_argument("--method", default="adamix", choices=METHODS,
                   help="adamix (default) or a peer at the same size: deltacome (fixed 8/3/2-bit schedule), "
                        "lowrank (fp16 truncated SVD), bitdelta (sign + scale, 1 bit per weight), "
                        "rtn / gptq (the delta quantized directly)")
    c.add_argument("--ratio", default="1/16", help="alpha = compressed bits / fp16 bits of the delta (default 1/16)")
    c.add_argument("--calib", default="default", help=CALIB_HELP)
    c.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    c.add_argument("--bits", default="0,2,3,4,8", help="allowed bit-widths per singular vector (default 0,2,3,4,8)")
    c.add_argument("--group-size", type=int, default=128, help="entries per quantization group (default 128)")
    c.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the calibration passes (default cpu)")
    c.add_argument("--whiten", action="store_true",
                   help="SVD of D H^1/2 instead of D: truncation optimal in the output error (see README)")
    c.add_argument("--budget-scope", choices=("tensor", "block"), default="tensor",
                   help="tensor: every matrix gets alpha of its own size; block: one ILP per transformer "
                        "block shares the block's budget among its linears (default tensor)")
    c.add_argument("--distill-steps", type=int, default=0,
                   help="bitdelta only: train the per-matrix scales this many steps to match the fine-tune's "
                        "hidden states on the calibration text (holds both models in memory; default 0)")
    c.add_argument("--seed", type=int, default=0, help="seed, recorded in the manifest (the method is deterministic)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists, and discard the work an interrupted run left")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the blocks it finished (same inputs and options; "
                        "the result is byte-identical to an uninterrupted run)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    m = sub.add_parser("merge", help="restore the fine-tune: BASE + DELTA -> Hugging Face checkpoint")
    m.add_argument("base")
    m.add_argument("delta")
    m.add_argument("-o", "--out", required=True, help="output model folder (must not exist)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("-q", "--quiet", action="store_true")

    e = sub.add_parser("export-peft", help="write DELTA as a PEFT LoRA adapter for BASE (low-rank deltas -> "
                       "lora_A/lora_B; the rest kept as listed in OUT/adamix_export.json)")
    e.add_argument("base")
    e.add_argument("delta")
    e.add_argument("-o", "--out", required=True, help="output adapter folder (must not exist)")
    e.add_argument("--lora-only", action="store_true",
                   help="only lora_A/lora_B (what vLLM loads): drop, and list, the deltas LoRA cannot express")
    e.add_argument("--uniform-rank", action="store_true",
                   help="pad every LoRA pair with zeros to the largest rank (no rank_pattern)")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the LoRA tensors (default float32: exact; half types halve the file)")
    e.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="sizes, achieved ratio, bit-widths and errors of a delta")
    i.add_argument("delta")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    d = sub.add_parser("demo", help="compress the all-MiniLM-L6-v2 -> sre-embedding-model pair, merge and evaluate")
    d.add_argument("-o", "--out", default="adamix-demo", help="working folder (default ./adamix-demo)")
    d.add_argument("--ratio", default="1/16")
    d.add_argument("--calib", default="default", help=CALIB_HELP)
    return p


def run(args: argparse.Namespace) -> int:
    from .report import print_summary
    if args.command == "compress":
        from .pipeline import compress
        manifest = compress(args.base, args.finetuned, args.out, method=args.method, ratio=args.ratio,
                            calib=None if args.calib == "none" else args.calib, samples=args.samples,
                            seqlen=args.seqlen, bits=args.bits, group_size=args.group_size, device=args.device,
                            seed=args.seed, whiten=args.whiten, distill_steps=args.distill_steps, budget_scope=args.budget_scope,
                            overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
        s = manifest["sizes"]
        resumed = f" (resumed: {manifest['resumed_chunks']} chunks were already done)" if manifest["resumed_chunks"] else ""
        if not manifest["tensors"]:  # every float tensor is bit-for-bit the base's
            print(f"the fine-tune is identical to the base: the delta is empty (wrote {args.out}, "
                  f"{s['total_bytes']} bytes){resumed}")
            return 0
        print_summary(manifest)
        print(f"wrote {args.out} in {s['wall_seconds']:.1f} s{resumed}, peak RSS {s['peak_rss_mib']:.0f} MiB")
        print("time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["seconds_by_phase"].items()))
    elif args.command == "merge":
        from .merge import merge
        out = merge(args.base, args.delta, args.out, overwrite=args.overwrite, progress=not args.quiet)
        print(f"wrote {out}")
    elif args.command == "export-peft":
        from .peft import export_peft
        s = export_peft(args.base, args.delta, args.out, lora_only=args.lora_only, uniform_rank=args.uniform_rank,
                        dtype=args.dtype, overwrite=args.overwrite)
        kept = {"lora_bias": len(s["lora_bias"]), "trainable_token_indices": len(s["trainable_tokens"]),
                "modules_to_save": len(s["modules_to_save"])}
        print(f"wrote {args.out}: {len(s['lora'])} LoRA modules (rank <= {s['rank_max']}), "
              f"{s['bytes']:,} bytes; {len(s['not_lora'])} tensors are not LoRA: "
              + ("dropped (--lora-only)" if s["lora_only"] else ", ".join(f"{v} as {k}" for k, v in kept.items() if v))
              + f"; see {args.out}/adamix_export.json")
    elif args.command == "inspect":
        from .artifact import Artifact
        art = Artifact(args.delta)
        if args.json:
            print(json.dumps(art.manifest, indent=2))
        else:
            print_summary(art.manifest, per_tensor=True)
    elif args.command == "demo":
        from .demo import demo
        demo(args.out, ratio=args.ratio, calib=None if args.calib == "none" else args.calib)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except AdamixError as e:
        print(f"adamix: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused midway (disk full, permissions changed): temporaries are removed
        kept = "; the finished blocks are kept: rerun with --resume to continue" if args.command == "compress" else ""
        print(f"adamix: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = "; the finished blocks are kept: rerun with --resume to continue" if args.command == "compress" else ""
        print(f"adamix: interrupted; nothing was written to the output{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

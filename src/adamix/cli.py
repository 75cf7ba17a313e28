"""The `adamix` command: compress, assemble, merge, export-peft, inspect, demo."""

from __future__ import annotations

import argparse
import json
import sys

from dataclasses import fields

from .compression.options import CALIB_HELP, Options, flag
from .errors import AdamixError
from .methods import get, names
from .methods.registry import accepting
from .version import __version__


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"adamix: error: {message}\n")


def add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of compression.options.Options, with its default and help."""
    for f in fields(Options):
        meta = dict(f.metadata)
        kw: dict = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if meta.get("negate"):
            kw["action"] = "store_false"
        elif meta.get("both_ways"):  # --x / --no-x; its default may be None (decided from the other options)
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            if meta.get("type"):
                kw["type"] = meta["type"]
            if meta.get("choices"):
                kw["choices"] = meta["choices"]()
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        if f.name == "method":
            kw["help"] += ": " + "; ".join(get(n).help for n in names())
        if meta.get("method_specific"):
            kw["help"] += f" (--method {' / '.join(accepting(f.name))} only)"
        parser.add_argument(*([meta["short"]] if meta.get("short") else []), flag(f), **kw)


def options_from(args: argparse.Namespace) -> dict:
    """The Options fields from parsed arguments (the CLI's spellings mapped to the API's values)."""
    out = {}
    for f in fields(Options):
        value = getattr(args, f.name)
        convert = f.metadata.get("cli_value")
        out[f.name] = convert(value) if convert and isinstance(value, str) else value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="adamix", description="Store a fine-tune as a tiny mixed-precision delta "
               "against its base (ADAMIX), and restore it.")
    p.add_argument("--version", action="version", version=f"adamix {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress FINETUNED against BASE into a delta folder")
    c.add_argument("base", help="base model: Hugging Face folder (config.json + safetensors) or .gguf file")
    c.add_argument("finetuned", help="fine-tuned model, same forms as BASE")
    c.add_argument("-o", "--out", required=True, help="output delta folder (must not exist)")
    add_options(c)

    a = sub.add_parser("assemble", help="write the delta folder OUT from the shard folders of one run "
                       "(compress --shard 1/N ... N/N)")
    a.add_argument("shards", nargs="+", help="the shard folders, in any order")
    a.add_argument("-o", "--out", required=True, help="output delta folder (must not exist)")
    a.add_argument("--overwrite", action="store_true")

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
                   help="pad every LoRA pair with zeros to the smallest rank vLLM accepts that holds every "
                        "matrix (no rank_pattern)")
    e.add_argument("--max-rank", type=int, metavar="R",
                   help="cut every LoRA pair to its R most valuable pairs (by the gains the artifact records) and "
                        "report the error that adds; compressing with --max-rank R does better")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="dtype of the LoRA tensors (default auto: the base's, e.g. bfloat16 for most LLMs; "
                        "float32 is exact, half types halve the file)")
    e.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="sizes, achieved ratio, bit-widths and errors of a delta")
    i.add_argument("delta")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    d = sub.add_parser("demo", help="compress the all-MiniLM-L6-v2 -> sre-embedding-model pair, merge and evaluate")
    d.add_argument("-o", "--out", default="adamix-demo", help="working folder (default ./adamix-demo)")
    d.add_argument("--ratio", default=Options.ratio, help=f"as for compress (default {Options.ratio})")
    d.add_argument("--calib", default=Options.calib, help=CALIB_HELP)
    return p


def run(args: argparse.Namespace) -> int:
    from .eval.report import capped_line, print_summary
    if args.command == "compress":
        from .compression import compress
        manifest = compress(args.base, args.finetuned, args.out, **options_from(args))
        s = manifest["sizes"]
        if "shard" in manifest:
            k, n = manifest["shard"]
            print(f"wrote shard {k}/{n} to {args.out}: {len(manifest['covered'])} tensors in {s['wall_seconds']:.1f} s, "
                  f"peak RSS {s['peak_rss_mib']:.0f} MiB; when all {n} are done: adamix assemble SHARDS... -o OUT")
            return 0
        resumed = f" (resumed: {manifest['resumed_chunks']} chunks were already done)" if manifest["resumed_chunks"] else ""
        if not manifest["tensors"]:  # every float tensor is bit-for-bit the base's
            print(f"the fine-tune is identical to the base: the delta is empty (wrote {args.out}, "
                  f"{s['total_bytes']} bytes){resumed}")
            return 0
        print_summary(manifest)
        device = manifest["settings"].get("device", "cpu")
        threads = (f"{device} and " if device != "cpu" else "") + \
            (f"{s['workers']} Ray worker{'s' if s['workers'] != 1 else ''} x " if s.get("workers") else "") + \
            f"{s['threads']} thread" + ("s" if s["threads"] != 1 else "") + \
            (f" (the ILPs beside them on {s['ilp_workers']} more core{'s' if s['ilp_workers'] != 1 else ''})"
             if s.get("ilp_workers") else "")
        print(f"wrote {args.out} in {s['wall_seconds']:.1f} s on {threads}{resumed}, "
              f"peak RSS {s['peak_rss_mib']:.0f} MiB")
        print("time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["seconds_by_phase"].items()))
    elif args.command == "assemble":
        from .compression.shards import assemble
        manifest = assemble(args.shards, args.out, overwrite=args.overwrite)
        print_summary(manifest)
        print(f"assembled {len(args.shards)} shards into {args.out}")
    elif args.command == "merge":
        from .export.merge import merge
        out = merge(args.base, args.delta, args.out, overwrite=args.overwrite, progress=not args.quiet)
        print(f"wrote {out}")
    elif args.command == "export-peft":
        from .export.peft import export_peft
        s = export_peft(args.base, args.delta, args.out, lora_only=args.lora_only, uniform_rank=args.uniform_rank,
                        dtype=None if args.dtype == "auto" else args.dtype, max_rank=args.max_rank,
                        overwrite=args.overwrite)
        kept = {"lora_bias": len(s["lora_bias"]), "trainable_token_indices": len(s["trainable_tokens"]),
                "modules_to_save": len(s["modules_to_save"])}
        padded = (f", every pair padded to rank {s['r']} (the smallest LoRA rank vLLM accepts that holds them)"
                  if s["uniform_rank"] else "")
        print(f"wrote {args.out}: {len(s['lora'])} LoRA modules (rank <= {s['rank_max']}{padded}) in {s['dtype']}, "
              f"{s['bytes']:,} bytes; {len(s['not_lora'])} tensors are not LoRA: "
              + ("dropped (--lora-only)" if s["lora_only"] else ", ".join(f"{v} as {k}" for k, v in kept.items() if v))
              + f"; see {args.out}/adamix_export.json")
        if s["capped"] is not None:
            print(capped_line(s["capped"]["pooled"], s["max_rank"]))
    elif args.command == "inspect":
        from .io.artifact import Artifact
        art = Artifact(args.delta)
        if args.json:
            print(json.dumps(art.manifest, indent=2))
        else:
            print_summary(art.manifest, per_tensor=True)
    elif args.command == "demo":
        from .eval.demo import demo
        demo(args.out, ratio=args.ratio, calib=None if args.calib == "none" else args.calib)
    return 0


def quiet_transformers() -> None:
    """The command shows one progress bar per step of its own: transformers' bars for every model
    it loads or saves ("Loading weights", "Writing model shards") and its warnings are turned off."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
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

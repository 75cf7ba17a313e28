"""Human-readable summaries of a manifest (used by `compress` at the end and by `inspect`)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from ..export.vllm import VLLM_RANKS, export_dtype, slot_bytes, slot_rank
from ..methods.kinds import factor_rank, part_metas


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def widths_text(meta: dict, kind: str | None = None) -> str:
    """The widths of an entry ("4b×2 2b×9"); for a kind stored as parts, each part's, labelled by its
    kind from the second on ("4b×1 2b×4 + rows 2b×147")."""
    split = part_metas(kind, meta) if kind is not None else None
    if split:
        return " + ".join(("" if i == 0 else f"{k} ") + widths_text(m) for i, (k, m) in enumerate(split))
    text = " ".join(f"{b}b×{c}" for b, c in meta.get("widths", [])) or "-"
    return f"{text} +{meta['new_rows']} new rows" if meta.get("new_rows") else text


def summary(manifest: dict) -> dict:
    """Per kind of tensor: count, fp16 bytes of the delta, stored bytes; plus totals."""
    by_kind: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "fp16_bytes": 0, "stored_bytes": 0})
    for e in manifest["tensors"].values():
        k = by_kind[e["kind"]]
        numel = 1
        for d in e["shape"]:
            numel *= d
        k["tensors"] += 1
        k["fp16_bytes"] += 2 * numel
        k["stored_bytes"] += e["bytes"]
    return {"by_kind": dict(by_kind), "sizes": manifest["sizes"]}


def print_summary(manifest: dict, per_tensor: bool = False, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    s = manifest["sizes"]
    if per_tensor:
        t = Table(title="tensors")
        for col in ("tensor", "kind", "shape", "rank", "widths", "bytes", "err pred", "err meas"):
            t.add_column(col, justify="left" if col in ("tensor", "kind", "widths") else "right")
        for name, e in manifest["tensors"].items():
            st = e.get("stats", {})
            meta = e.get("meta", {})
            rank = factor_rank(e["kind"], meta)
            if rank is None:  # a kind stored as parts: its low-rank part's
                rank = next((r for k, m in part_metas(e["kind"], meta) or () if (r := factor_rank(k, m)) is not None), None)
            t.add_row(name, e["kind"], "x".join(map(str, e["shape"])), "" if rank is None else str(rank),
                      widths_text(meta, e["kind"]),
                      str(e["bytes"]), f"{st['error_predicted']:.4f}" if "error_predicted" in st else "",
                      f"{st['error_measured']:.4f}" if "error_measured" in st else "")
        console.print(t)
    t = Table(title=f"adamix delta ({manifest['method']}, alpha asked {manifest['alpha']:.5g})")
    for col in ("part", "tensors", "fp16 delta", "stored", "ratio"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for kind, k in sorted(summary(manifest)["by_kind"].items()):
        ratio = k["stored_bytes"] / k["fp16_bytes"] if k["fp16_bytes"] else 0
        t.add_row(kind, str(k["tensors"]), human_bytes(k["fp16_bytes"]), human_bytes(k["stored_bytes"]), f"{ratio:.4f}")
    t.add_row("header + manifest", "", "", human_bytes(s["total_bytes"] - s["method_bytes"] - s["raw_bytes"]), "")
    t.add_row("total on disk", str(len(manifest["tensors"])), "", human_bytes(s["total_bytes"]), "")
    console.print(t)
    errs = [(e["stats"]["error_measured"], e["stats"].get("energy", 1.0)) for e in manifest["tensors"].values()
            if "error_measured" in e.get("stats", {})]
    energy = sum(w for _, w in errs)
    overall = (sum(w * x * x for x, w in errs) / energy) ** 0.5 if energy else 0.0
    console.print(f"achieved alpha (compressed tensors incl. header and manifest, raw deltas excluded): "
                  f"[bold]{s['alpha_achieved']:.5f}[/bold] = 1/{1 / s['alpha_achieved']:.2f}" if s["alpha_achieved"] else
                  "achieved alpha: nothing compressed")
    console.print(f"relative output error on the calibration text (energy-weighted over layers): [bold]{overall:.4f}[/bold]")
    if per_tensor and (line := vllm_line(manifest)):
        console.print(line)


def vllm_line(manifest: dict) -> str | None:
    """What serving the delta as a LoRA adapter in vLLM takes (export/vllm.py), or None if no tensor
    is low-rank."""
    lora = {n: (factor_rank(e["kind"], e.get("meta", {})), e) for n, e in manifest["tensors"].items()
            if len(e["shape"]) == 2}
    lora = {n: (k, e) for n, (k, e) in lora.items() if k}
    if not lora:
        return None
    top = max(k for k, _ in lora.values())
    dtype = export_dtype([e.get("dtype", "") for _, e in lora.values()])
    slot = slot_rank(top)
    if slot is None:
        return (f"vLLM LoRA: the largest rank is {top}, above vLLM's largest LoRA rank {VLLM_RANKS[-1]}: "
                f"compress with --max-rank {VLLM_RANKS[-1]} (or lower) to serve it there")
    size = slot_bytes([tuple(e["shape"]) for _, e in lora.values()], slot, dtype)
    return (f"vLLM LoRA: largest rank {top} -> --max-lora-rank {slot}; one LoRA slot of the {len(lora)} low-rank "
            f"modules takes {human_bytes(size)} of GPU memory in {dtype}")


def capped_line(pooled: dict, max_rank: int) -> str:
    """What export-peft --max-rank cut (export.peft.cap_summary) and the error it adds."""
    if not pooled["tensors"]:
        return f"--max-rank {max_rank}: every LoRA pair already has rank <= {max_rank}, nothing was cut"
    rise = (f"; the predicted relative error of the {pooled['predicted']} with a prediction rises from "
            f"{pooled['error_predicted']:.4f} to {pooled['error_after']:.4f} (pooled by energy)" if pooled["predicted"] else "")
    return (f"--max-rank {max_rank}: cut {pooled['tensors']} tensors to their {max_rank} most valuable pairs{rise}. "
            f"compress --max-rank {max_rank} does better: the bits the cap frees widen the kept triplets and target "
            f"correction refits them")

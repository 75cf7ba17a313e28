"""What vLLM's multi-LoRA serving needs of an adapter: its LoRA ranks, and the GPU memory of a slot.

vLLM accepts the LoRA ranks VLLM_RANKS (`--max-lora-rank` must be one of them and at least every
adapter's `r`), and reserves every adapter slot (`--max-loras`) at that rank for each module it
targets, lora_A (R x in) and lora_B (out x R), in the LoRA dtype (the model's, by default):

    slot bytes = R * sum over the LoRA modules of (in + out) * bytes per element.
"""

from __future__ import annotations

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPE_OF = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> export dtype


def slot_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts that holds `rank`; None above its largest."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def slot_bytes(shapes: list[tuple[int, int]], rank: int, dtype: str) -> int:
    """GPU bytes of one LoRA slot at `rank` for modules of weight shapes `shapes` (out, in)."""
    return rank * sum(m + n for m, n in shapes) * DTYPE_BYTES[dtype]


def export_dtype(safetensors_dtypes: list[str]) -> str:
    """The adapter dtype that matches the base: the floating dtype most of its LoRA weights have
    (float32 when there are none, or when they are float64)."""
    known = [DTYPE_OF[d] for d in safetensors_dtypes if d in DTYPE_OF]
    return max(sorted(set(known)), key=known.count) if known else "float32"

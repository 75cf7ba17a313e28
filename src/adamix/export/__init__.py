"""The export path: restore the fine-tune as a standard checkpoint (merge), or write the delta as a
PEFT LoRA adapter (peft) for PEFT and vLLM."""

from .merge import merge
from .peft import export_peft

__all__ = ["export_peft", "merge"]

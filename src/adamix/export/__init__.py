"""The export path: restore the fine-tune as a standard checkpoint (merge.merge), or write the delta
as a PEFT LoRA adapter (peft.export_peft) for PEFT and vLLM. (The functions are not re-exported
here: `adamix.export.merge` stays the module; `adamix.merge` is the function.)"""

"""base + artifact -> a standard Hugging Face checkpoint of the restored fine-tune."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import AdamixError
from ..io.artifact import CONFIG_DIR, AtomicFolder, Artifact, prepare_output
from ..io.checkpoint import Checkpoint


def merged_state(base: Checkpoint, art: Artifact, progress: bool = False) -> dict[str, torch.Tensor]:
    """W_base + D^ for every tensor of the base (in the base's dtype), less the artifact's 'dropped'.

    A tensor to which the fine-tune adds k rows (io/vocab.py) gets them: pad(W_base, k zero rows) + D^."""
    dropped = set(art.manifest.get("dropped", []))
    missing = [n for n in art.entries if n not in base]
    if missing:
        raise AdamixError(f"the base has no tensor {missing[0]} that the delta changes")
    state = {}
    for name in tqdm(base.keys(), desc="merge", disable=not progress, unit="tensor"):
        if name in dropped:
            continue
        w = base.get(name)
        if name in art:
            shape, k = list(art.entries[name]["shape"]), art.new_rows(name)
            if list(w.shape) != [shape[0] - k, *shape[1:]]:
                grown = f" less the {k} rows the fine-tune adds" if k else ""
                raise AdamixError(f"tensor {name}: base shape {list(w.shape)}, delta shape {shape}{grown}")
            wf = torch.cat([w.float(), w.new_zeros(k, shape[1], dtype=torch.float32)]) if k else w.float()
            w = (wf + art.delta(name)).to(w.dtype)
        state[name] = w.contiguous()
    return state


def merge(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
          overwrite: bool = False, progress: bool = True) -> Path:
    """Restore the fine-tune: write `out` with model.safetensors and the fine-tune's config/tokenizer
    (the artifact's finetune/ folder, which must hold config.json)."""
    out = prepare_output(out, overwrite)
    art = Artifact(delta)
    configs = art.path / CONFIG_DIR
    if not (configs / "config.json").is_file():
        raise AdamixError(f"{delta}: {CONFIG_DIR}/config.json is missing (an incomplete delta folder?)")
    base_ck = Checkpoint(base)
    art.check_base(base_ck.fingerprint())
    state = merged_state(base_ck, art, progress)
    with AtomicFolder(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in sorted(configs.glob("*")):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return out

"""Helpers for the runtime and PEFT tests: a second fine-tune of a synthetic base."""

from __future__ import annotations

import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file
from synthetic import perturb

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight",
              "embeddings.word_embeddings.weight")


def make_variant(base, out, seed: int, hot_rows: int = 20):
    """A second fine-tune of the same base: every tensor perturbed with another seed, except the
    token embedding (and an untied LM head), which change in `hot_rows` rows only: the structure
    that the data-free `rows` kind stores (and a tenant that differs from the first one)."""
    state = load_file(str(base / "model.safetensors"))
    new = perturb(state, seed)
    g = torch.Generator().manual_seed(seed)
    for name in EMBEDDINGS:
        if name in state:
            w = state[name]
            rows = torch.randperm(w.shape[0], generator=g)[:hot_rows]
            d = torch.zeros_like(w)
            d[rows] = 0.05 * w.norm() / hot_rows ** 0.5 * torch.randn(hot_rows, w.shape[1], generator=g) / w.shape[1] ** 0.5
            new[name] = w + d
    shutil.copytree(base, out)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def model_class(folder):
    return getattr(transformers, transformers.AutoConfig.from_pretrained(folder).architectures[0])


def two_artifacts(arch: str, request, calib_file, work):
    """(base, work) with two 1/16 artifacts of the `arch` pair in work: "a" (calibrated, low-rank
    matrices and raw 1-D deltas) and "b" (data-free, of a variant with hot embedding rows: kind rows)."""
    import adamix
    base, ft = request.getfixturevalue(f"{arch}_pair")
    ft_b = make_variant(base, work / "ft-b", seed=11)
    adamix.compress(base, ft, work / "a", ratio="1/16", calib=calib_file, samples=8, seqlen=64, progress=False)
    adamix.compress(base, ft_b, work / "b", ratio="1/16", calib=None, progress=False)
    return base

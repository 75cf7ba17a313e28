"""Held-out measures of how much of a fine-tune a delta keeps.

- relative output error: sqrt( sum_layers ||(D^ - D) X||_F^2 / sum_layers ||D X||_F^2 ), with X the
  inputs of each compressed linear in the fine-tune run on held-out text (never the calibration text);
- embedding agreement: mean cosine between mean-pooled last hidden states of two models.
Held-out text: gensim's lee.cor documents and pang_lee_polarity.cor sentences.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .artifact import Artifact
from .calibrate import BlockRunner, token_windows
from .checkpoint import Checkpoint
from .errors import AdamixError


def gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise AdamixError("held-out evaluation texts ship with gensim: pip install gensim==4.4.0")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name


def heldout_corpora() -> dict[str, list[str]]:
    """The held-out texts by corpus: the 50 Lee documents and the 200 polarity sentences."""
    def lines(name: str) -> list[str]:
        return [t.strip() for t in gensim_data(name).read_text(errors="replace").splitlines() if t.strip()]
    return {"lee": lines("lee.cor"), "polarity": lines("pang_lee_polarity.cor")}


def heldout_texts() -> list[str]:
    """All held-out texts (never the calibration text): Lee documents, then polarity sentences."""
    return [t for texts in heldout_corpora().values() for t in texts]


def relative_output_error(base: str, finetuned: str, delta: str, texts: list[str], samples: int = 64,
                          seqlen: int = 256, device: str = "cpu") -> dict:
    """Held-out relative output error of the delta's compressed linears (module doc); also per layer."""
    from transformers import AutoTokenizer
    base_ck, ft_ck, art = Checkpoint(base), Checkpoint(finetuned), Artifact(delta)
    tokenizer = AutoTokenizer.from_pretrained(ft_ck.folder)
    windows = token_windows("\n".join(texts), tokenizer, samples, seqlen)
    num = den = 0.0
    per_layer = {}
    for _, infos, grams in BlockRunner(ft_ck, windows, device).run():
        for info in infos:
            e = art.entries.get(info.name)
            if e is None or e["kind"] == "raw":
                continue
            D = ft_ck.get(info.name).double() - base_ck.get(info.name).double()
            E = art.delta(info.name).double() - D
            if info.transposed:
                D, E = D.T, E.T
            H = grams[info.name].double()
            a, b = float(((E @ H) * E).sum()), float(((D @ H) * D).sum())
            num, den = num + a, den + b
            per_layer[info.name] = (a / b) ** 0.5 if b > 0 else 0.0
    return {"relative_error": (num / den) ** 0.5 if den > 0 else 0.0, "per_layer": per_layer}


def mean_pooled(model_dir: str, texts: list[str], batch: int = 32, max_length: int = 256) -> torch.Tensor:
    """Mean-pooled last hidden states (len(texts), hidden) of the model in `model_dir`."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append((h * mask).sum(1) / mask.sum(1))
    return torch.cat(outs)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())

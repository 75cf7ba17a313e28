"""Held-out measures of how much of a fine-tune a delta keeps.

- relative output error: sqrt( sum_layers ||(D^ - D) X||_F^2 / sum_layers ||D X||_F^2 ), with X the
  inputs of each compressed linear in the fine-tune run on held-out text (never the calibration text);
- embedding agreement: mean cosine between mean-pooled last hidden states of two models.
Held-out text: gensim's lee.cor documents and pang_lee_polarity.cor sentences.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..compression.calibrate import BlockRunner, token_windows
from ..io.artifact import Artifact
from ..io.checkpoint import Checkpoint
from ..io.text import gensim_file
from ..methods.kinds import is_raw


def gensim_data(name: str) -> Path:
    """A held-out text file that ships with gensim."""
    return gensim_file(name, "held-out evaluation texts ship with gensim")


def polarity_labelled() -> tuple[list[str], list[int]]:
    """gensim's 200 polarity sentences without their "__label__pos/neg" prefix, and labels (1 = pos)."""
    texts, labels = [], []
    for line in gensim_data("pang_lee_polarity.cor").read_text(errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        if text:
            texts.append(text)
            labels.append(int(label == "__label__pos"))
    return texts, labels


def heldout_corpora() -> dict[str, list[str]]:
    """The held-out texts by corpus: the 50 Lee documents and the 200 polarity sentences."""
    lee = [t.strip() for t in gensim_data("lee.cor").read_text(errors="replace").splitlines() if t.strip()]
    return {"lee": lee, "polarity": polarity_labelled()[0]}


def heldout_texts() -> list[str]:
    """All held-out texts (never the calibration text): Lee documents, then polarity sentences."""
    return [t for texts in heldout_corpora().values() for t in texts]


def heldout_grams(finetuned: str, texts: list[str], samples: int | None = 64, seqlen: int = 256,
                  device: str = "cpu") -> dict[str, tuple[torch.Tensor, bool]]:
    """{weight name: (H (n x n float64), transposed)} of every linear of the fine-tune's blocks, H the
    Gram of its inputs on the first `samples` windows (None: all) of `texts` (held-out text, never
    the calibration text)."""
    from transformers import AutoTokenizer
    ft_ck = Checkpoint(finetuned)
    tokenizer = AutoTokenizer.from_pretrained(ft_ck.folder)
    windows = token_windows("\n".join(texts), tokenizer, samples, seqlen)
    out = {}
    for _, infos, grams in BlockRunner(ft_ck, windows, device).run():
        out.update({i.name: (grams[i.name].double(), i.transposed) for i in infos})
    return out


def error_on_grams(base: str, finetuned: str, art: Artifact, grams: dict[str, tuple[torch.Tensor, bool]]) -> dict:
    """Relative output error of the artifact's non-raw tensors on precomputed Grams (module doc)."""
    base_ck, ft_ck = Checkpoint(base), Checkpoint(finetuned)
    num = den = 0.0
    per_layer = {}
    for name, (H, transposed) in grams.items():
        e = art.entries.get(name)
        if e is None or is_raw(e["kind"]):
            continue
        D = ft_ck.get(name).double() - base_ck.get(name).double()
        E = art.delta(name).double() - D
        if transposed:
            D, E = D.T, E.T
        a, b = float(((E @ H) * E).sum()), float(((D @ H) * D).sum())
        num, den = num + a, den + b
        per_layer[name] = (a / b) ** 0.5 if b > 0 else 0.0
    return {"relative_error": (num / den) ** 0.5 if den > 0 else 0.0, "per_layer": per_layer, "energy": den}


def corpus_grams(finetuned: str, corpora: dict[str, list[str]], seqlen: int = 256,
                 device: str = "cpu") -> dict[str, dict[str, tuple[torch.Tensor, bool]]]:
    """{corpus: heldout_grams on every window of its texts}."""
    return {corpus: heldout_grams(finetuned, texts, None, seqlen, device) for corpus, texts in corpora.items()}


def pooled_grams(by_corpus: dict[str, dict[str, tuple[torch.Tensor, bool]]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """The Grams summed over the corpora: every held-out token weighs the same."""
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for grams in by_corpus.values():
        for name, (H, transposed) in grams.items():
            out[name] = (out[name][0] + H if name in out else H.clone(), transposed)
    return out


def errors_on_corpora(base: str, finetuned: str, art: Artifact, by_corpus: dict[str, dict[str, tuple[torch.Tensor, bool]]],
                      pooled: dict[str, tuple[torch.Tensor, bool]] | None = None) -> dict:
    """The relative output error on each corpus's Grams (corpus_grams) and on their sum (pooled_grams,
    computed if not given).

    Per corpus c: e_c^2 = sum_l ||E_l X_c||^2 / sum_l ||D_l X_c||^2 (error_on_grams on its Grams).
    Pooled: e^2 = sum_c E(0)_c e_c^2 / sum_c E(0)_c. Returns {"pooled": e, "per_corpus": {c: e_c},
    "energy": {c: E(0)_c = sum_l ||D_l X_c||^2}}.
    """
    out = {"per_corpus": {}, "energy": {}}
    for corpus, grams in by_corpus.items():
        r = error_on_grams(base, finetuned, art, grams)
        out["per_corpus"][corpus], out["energy"][corpus] = r["relative_error"], r["energy"]
    out["pooled"] = error_on_grams(base, finetuned, art, pooled or pooled_grams(by_corpus))["relative_error"]
    return out


def corpus_windows(finetuned: str, corpora: dict[str, list[str]], seqlen: int = 256) -> dict[str, int]:
    """{corpus: how many windows of `seqlen` tokens its texts fill} (what corpus_grams runs)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(Checkpoint(finetuned).folder)
    return {c: len(token_windows("\n".join(texts), tokenizer, None, seqlen)) for c, texts in corpora.items()}


def errors_by_corpus(base: str, finetuned: str, art: Artifact, corpora: dict[str, list[str]], seqlen: int = 256,
                     device: str = "cpu") -> dict:
    """errors_on_corpora on every window of each corpus of `corpora` ({name: texts}), plus
    "windows": corpus_windows."""
    return {**errors_on_corpora(base, finetuned, art, corpus_grams(finetuned, corpora, seqlen, device)),
            "windows": corpus_windows(finetuned, corpora, seqlen)}


def relative_output_error(base: str, finetuned: str, delta: str, texts: list[str], samples: int = 64,
                          seqlen: int = 256, device: str = "cpu") -> dict:
    """Held-out relative output error of the delta's compressed linears (module doc); also per layer."""
    grams = heldout_grams(finetuned, texts, samples, seqlen, device)
    return error_on_grams(base, finetuned, Artifact(delta), grams)


def mean_pooled(model_dir, texts: list[str], batch: int = 32, max_length: int = 256, model=None) -> torch.Tensor:
    """Mean-pooled last hidden states (len(texts), hidden) of the model in `model_dir` (or of `model`,
    an already built model, with the tokenizer of `model_dir`)."""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model if model is not None else AutoModel.from_pretrained(model_dir).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            h = out.hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append((h * mask).sum(1) / mask.sum(1))
    return torch.cat(outs)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())

"""The held-out error over every window of each corpus, and pooled over all of them (eval.heldout)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from adamix.compression.calibrate import token_windows
from adamix.eval.heldout import error_on_grams, errors_by_corpus, heldout_grams
from adamix.io.artifact import Artifact


def corpora(calib_file):
    """Two corpora of 40-word documents cut from the synthetic text."""
    words = calib_file.read_text().split()
    docs = [" ".join(words[i:i + 40]) for i in range(0, 1200, 40)]
    return {"first": docs[:10], "rest": docs[10:]}


def test_all_windows_enter_the_grams(llama_pair, calib_file):
    _, ft = llama_pair
    texts = corpora(calib_file)["rest"]
    windows = token_windows("\n".join(texts), AutoTokenizer.from_pretrained(ft), None, 16)
    assert len(windows) > 2  # short windows: the text fills several
    every = heldout_grams(ft, texts, None, 16)
    counted = heldout_grams(ft, texts, len(windows), 16)
    fewer = heldout_grams(ft, texts, len(windows) - 1, 16)
    name = next(iter(every))
    assert torch.equal(every[name][0], counted[name][0])
    assert not torch.equal(every[name][0], fewer[name][0])


def test_pooled_error_weighs_every_token_alike(llama_pair, calib_file, llama_delta):
    base, ft = llama_pair
    texts = corpora(calib_file)
    r = errors_by_corpus(base, ft, Artifact(llama_delta), texts, seqlen=16)
    assert set(r["per_corpus"]) == set(texts) and all(r["windows"][c] > 0 for c in texts)
    # the pooled squared error is the energy-weighted mean of the corpora's squared errors
    weighted = sum(r["energy"][c] * r["per_corpus"][c] ** 2 for c in texts) / sum(r["energy"].values())
    assert r["pooled"] ** 2 == pytest.approx(weighted, rel=1e-9)
    assert min(r["per_corpus"].values()) <= r["pooled"] <= max(r["per_corpus"].values())
    # and each corpus's error is the one on its own Grams, every window in
    grams = heldout_grams(ft, texts["first"], None, 16)
    assert r["per_corpus"]["first"] == pytest.approx(
        error_on_grams(base, ft, Artifact(llama_delta), grams)["relative_error"], rel=1e-12)

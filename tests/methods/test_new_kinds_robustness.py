"""The new peers' kinds under tiny budgets and malformed metadata or tensors: the budget still holds,
and a reader raises one AdamixError, never another exception or a huge allocation."""

from __future__ import annotations

import pytest
import torch
from synthetic import delta_and_gram

import adamix
from adamix.methods import Settings, compress_with, decode
from adamix.methods.kinds import check_meta
from adamix.methods.registry import budget_bits
from adamix.quant import eliasfano

NEW = ["dare", "impart", "deltadct", "ultradelta"]


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("alpha", [1e-4, 1e-3, 1 / 512])
def test_tiny_budgets_hold_and_decode(method, alpha):
    D, H = delta_and_gram(m=200, n=150)
    enc = compress_with(D, H, Settings(method=method, alpha=alpha))
    assert 8 * enc.nbytes <= budget_bits(200, 150, alpha)
    out = decode(enc.kind, enc.shape, enc.meta, enc.tensors)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(enc.tensors["params"].float()).all())


def test_an_all_zero_delta_encodes_for_every_new_method():
    for method in NEW:
        enc = compress_with(torch.zeros(64, 48), None, Settings(method=method, alpha=1 / 8))
        assert float(decode(enc.kind, enc.shape, enc.meta, enc.tensors).abs().sum()) == 0.0


BAD_META = [
    ("dare", {"seed": 1, "kept": 10**12, "bits": 16, "group_size": 128}),
    ("dare", {"seed": 1, "kept": 10, "bits": 4, "group_size": 2**62}),
    ("dare", {"seed": -1, "kept": 10, "bits": 16, "group_size": 128}),
    ("dare", {"seed": 1, "kept": True, "bits": 16, "group_size": 128}),
    ("impart", {"seed": 1, "rank": 10**9, "quantized": False, "group_size": 128}),
    ("impart", {"seed": 1, "rank": 2, "quantized": True, "group_size": 128, "widths": [[2.9, 1.0], [2, 1]]}),
    ("impart", {"seed": 1, "rank": 2, "quantized": True, "group_size": 128, "widths": [[float("inf"), 2]]}),
    ("impart", {"seed": 1, "rank": 2, "quantized": "yes", "group_size": 128}),
    ("deltadct", {"patch": 4096, "classes": [4, 2, 0]}),
    ("deltadct", {"patch": 16, "classes": [8, 2, 0]}),
    ("ultradelta", {"bits": 9, "kept": 3}),
    ("ultradelta", {"bits": 4, "kept": -1}),
]


@pytest.mark.parametrize("kind, meta", BAD_META)
def test_malformed_metadata_is_one_adamix_error(kind, meta):
    with pytest.raises(adamix.AdamixError, match=f"malformed {kind} metadata"):
        check_meta(kind, (64, 48), meta)


@pytest.mark.parametrize("method", NEW)
def test_truncated_tensors_are_one_adamix_error(method):
    D, H = delta_and_gram(m=64, n=48)
    enc = compress_with(D, H, Settings(method=method, alpha=1 / 8))
    for name, t in enc.tensors.items():
        if t.numel() < 2:
            continue
        broken = dict(enc.tensors, **{name: t[:-1]})
        with pytest.raises(adamix.AdamixError):
            decode(enc.kind, enc.shape, enc.meta, broken)


def test_corrupted_elias_fano_positions_are_refused():
    x = torch.tensor([1, 4, 9])
    low, high = eliasfano.encode(x, 10)
    for i in range(low.numel()):
        for bit in range(8):
            bad = low.clone()
            bad[i] ^= 1 << bit
            try:
                y = eliasfano.decode(bad, high, 10, 3)
            except ValueError:
                continue
            assert bool((y[1:] > y[:-1]).all()) and int(y[-1]) < 10  # whatever decodes is a valid set

"""DARE (drop and rescale) and the seeded masks it shares: budget, the mask from the seed, a float64
reference, the stored bytes decoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adamix
from adamix.compression.options import Options
from adamix.methods import Settings, compress_with, decode
from adamix.methods.dare import kept_count, value_bits
from adamix.methods.registry import budget_bits
from adamix.methods.seeded import column_subsets, keys, seed_for, subset


def splitmix64(x: int) -> int:
    """The reference SplitMix64 finaliser in Python integers."""
    mask = (1 << 64) - 1
    z = x & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_keys_are_splitmix64_of_a_counter():
    seed = 12345678901234567
    got = keys(seed, 5, start=7)
    want = [splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) for i in range(7, 12)]
    assert got.tolist() == want


def test_subset_is_the_k_smallest_keys_and_chunking_does_not_change_it(monkeypatch):
    seed, total, k = 99, 10_000, 700
    ref = np.sort(np.argsort(keys(seed, total))[:k])
    assert subset(seed, total, k).tolist() == ref.tolist()
    monkeypatch.setattr("adamix.methods.seeded.CHUNK", 333)  # the streaming selection over many chunks
    assert subset(seed, total, k).tolist() == ref.tolist()
    assert subset(seed, total, 0).numel() == 0 and subset(seed, total, total).tolist() == list(range(total))
    cols = column_subsets(seed, 50, [0, 10, 50])
    assert [len(c) for c in cols] == [0, 10, 50]
    assert cols[1].tolist() == sorted(np.argsort(keys(seed, 50, 50))[:10].tolist())


def test_the_seed_depends_on_the_delta_and_the_run_seed():
    D = torch.randn(8, 8)
    assert seed_for(D, 0) == seed_for(D.clone(), 0) != seed_for(D, 1)
    assert seed_for(D, 0) != seed_for(D + 1e-3, 0) and 0 <= seed_for(D, 0) < 2**63


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("alpha", [1 / 4, 1 / 16, 1 / 64])
def test_dare_fills_the_budget_and_matches_a_float64_reference(bits, alpha):
    g = torch.Generator().manual_seed(3)
    D = torch.randn(96, 80, generator=g) * 1e-2
    s = Settings(method="dare", alpha=alpha, value_bits=bits, group_size=64)
    enc = compress_with(D, None, s)
    budget = budget_bits(96, 80, alpha)
    k = enc.meta["kept"]
    assert 8 * enc.nbytes == value_bits(k, bits, 64) <= budget
    assert k == 96 * 80 or budget < value_bits(k + 1, bits, 64)
    assert k == kept_count(96 * 80, budget, bits, 64)
    # the mask regenerated from the stored seed, and the float64 reference D * M / q
    idx = subset(enc.meta["seed"], 96 * 80, k)
    q = k / (96 * 80)
    ref = torch.zeros(96 * 80, dtype=torch.float64)
    ref[idx] = D.reshape(-1)[idx].double() / q
    got = decode("dare", enc.shape, enc.meta, enc.tensors).double().reshape(-1)
    outside = torch.ones(96 * 80, dtype=torch.bool)
    outside[idx] = False
    assert bool((got[outside] == 0).all())  # nothing outside the mask
    if bits == 16:
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-7)
    else:  # no worse than a plain min-max grid per group of 64 kept values (float64 reference)
        x = ref[idx]
        err = 0.0
        for i in range(0, k, 64):
            grp = x[i:i + 64]
            lo, hi = grp.min(), grp.max()
            step = (hi - lo) / (2**bits - 1) if hi > lo else torch.tensor(1.0, dtype=torch.float64)
            err += float(((lo + torch.round((grp - lo) / step) * step - grp) ** 2).sum())
        assert float(((got[idx] - x) ** 2).sum()) <= err * 1.02
    # the relative error of drop-and-rescale is about sqrt(1/q - 1) (exactly, in expectation)
    if bits == 16:
        assert enc.stats["error_measured"] == pytest.approx((1 / q - 1) ** 0.5, rel=0.15)


def test_dare_through_the_pipeline_decodes_the_stored_bytes(bert_pair, calib_file, tmp_path):
    """The artifact's deltas are D * M / q with M regenerated from the seed of the delta's bytes."""
    from adamix.compression.plan import delta_of
    from adamix.io.checkpoint import Checkpoint
    base, ft = bert_pair  # calibrated: the linears go through the method (data-free ones may be row-sparse)
    m = adamix.compress(base, ft, tmp_path / "d", method="dare", ratio="1/8", calib=calib_file, samples=4,
                        seqlen=32, seed=5, progress=False)
    art = adamix.load(tmp_path / "d")
    assert m["sizes"]["alpha_achieved"] <= 1 / 8
    b, f = Checkpoint(base), Checkpoint(ft)
    checked = 0
    for name, e in art.entries.items():
        if e["kind"] != "dare":
            continue
        D = delta_of(b, f, name)
        D = D.T if e["transposed"] else D
        assert e["meta"]["seed"] == seed_for(D, 5)
        k, total = e["meta"]["kept"], D.numel()
        assert 0 < k < total / 8  # fp16 values within the budget, its share of the header taken off
        ref = torch.zeros(total, dtype=torch.float64)
        idx = subset(e["meta"]["seed"], total, k)
        ref[idx] = D.reshape(-1)[idx].double() * total / k
        got = art.delta(name)
        got = (got.T if e["transposed"] else got).double().reshape(-1)
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-7)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("changes, message", [
    ({"method": "dare", "value_bits": 12}, "--value-bits must be 16 (fp16) or 1..8, got 12"),
    ({"method": "adamix", "value_bits": 4}, "--value-bits 4 applies to --method dare / ultradelta only, not adamix"),
    ({"method": "ultradelta", "value_bits": 16}, "ultradelta quantizes at 1..8 bits, not --value-bits 16"),
])
def test_bad_value_bits_are_refused(changes, message):
    with pytest.raises(adamix.AdamixError) as e:
        Options(**changes).settings()
    assert str(e.value) == message

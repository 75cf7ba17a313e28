"""UltraDelta and the Elias-Fano coding of its positions: sizes, round trips, the per-level drops,
a float64 reference of the reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synthetic import delta_and_gram

import adamix
from adamix.methods import Settings, compress_with, decode
from adamix.methods.registry import budget_bits
from adamix.methods.ultradelta import total_bits
from adamix.quant import eliasfano
from adamix.quant.pack import unpack


@pytest.mark.parametrize("universe, count", [(1, 1), (7, 1), (1000, 10), (1000, 999), (100_000, 3_000), (5, 0)])
def test_elias_fano_round_trips_within_two_bits_of_the_bound(universe, count):
    g = torch.Generator().manual_seed(universe + count)
    x = torch.sort(torch.randperm(universe, generator=g)[:count]).values
    low, high = eliasfano.encode(x, universe)
    assert (low.numel(), high.numel()) == eliasfano.nbytes(universe, count)
    assert torch.equal(eliasfano.decode(low, high, universe, count), x)
    if count and universe >= 100:
        bound = (math.lgamma(universe + 1) - math.lgamma(count + 1) - math.lgamma(universe - count + 1)) / math.log(2)
        assert 8 * (low.numel() + high.numel()) <= bound + 2 * count + 16


def test_elias_fano_refuses_streams_that_do_not_match():
    x = torch.tensor([3, 17, 40])
    low, high = eliasfano.encode(x, 64)
    with pytest.raises(ValueError):
        eliasfano.decode(low, high, 64, 4)
    with pytest.raises(ValueError):
        eliasfano.decode(low, torch.zeros_like(high), 64, 3)
    with pytest.raises(ValueError):
        eliasfano.encode(torch.tensor([5, 5]), 64)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("alpha", [1 / 8, 1 / 32, 1 / 128])
def test_ultradelta_fits_the_budget_and_matches_a_float64_reference(bits, alpha):
    D, H = delta_and_gram(m=200, n=150)
    enc = compress_with(D, H, Settings(method="ultradelta", alpha=alpha, value_bits=bits))
    total, k = D.numel(), enc.meta["kept"]
    assert 8 * enc.nbytes == total_bits(total, k, bits) <= budget_bits(200, 150, alpha)
    assert total_bits(total, k + 2**bits + 1, bits) > budget_bits(200, 150, alpha)  # within a level's rounding
    # float64 reference: the per-tensor min-max grid (min and step in fp16), rescaled by 1 / (1 - s)
    x = D.reshape(-1).double()
    lo = float(np.float16(float(x.min())))
    step = float(np.float16((float(x.max()) - lo) / (2**bits - 1)))
    q = torch.clamp(torch.round((x - lo) / step), 0, 2**bits - 1)
    pos = eliasfano.decode(enc.tensors["low"], enc.tensors["high"], total, k)
    assert torch.equal(unpack(enc.tensors["codes"], bits, k).long(), q[pos].long())
    s = enc.stats["sparsity"]
    scale = float(torch.tensor(1 / (1 - s)).to(torch.float16))
    ref = torch.zeros(total, dtype=torch.float64)
    ref[pos] = (lo + step * q[pos]) * scale
    got = decode("ultradelta", enc.shape, enc.meta, enc.tensors).double().reshape(-1)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-9)
    # value-grouped dropping: each level keeps count - round(count r) of its entries (no level is 0 here)
    counts = torch.bincount(q.long(), minlength=2**bits)
    kept = torch.bincount(q[pos].long(), minlength=2**bits)
    assert torch.equal(kept, counts - torch.round(counts.double() * s).long())
    assert enc.stats["alpha_without_positions"] == pytest.approx(bits * k / (16 * total))


def test_ultradelta_through_the_pipeline(bert_pair, calib_file, tmp_path):
    base, ft = bert_pair
    m = adamix.compress(base, ft, tmp_path / "d", method="ultradelta", ratio="1/16", calib=calib_file, samples=4,
                        seqlen=32, progress=False)
    assert m["sizes"]["alpha_achieved"] <= 1 / 16
    art = adamix.load(tmp_path / "d")
    names = [n for n, e in art.entries.items() if e["kind"] == "ultradelta"]
    assert names and all(art.delta(n).count_nonzero() == art.entries[n]["meta"]["kept"] for n in names)

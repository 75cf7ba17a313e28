"""Per-triplet gains stored with svd-mixed factors: what a later rank cap (export-peft --max-rank)
ranks by and predicts its added error from."""

from __future__ import annotations


import pytest
import torch

import adamix
from adamix.export.peft import top_pairs
from adamix.methods import Settings, compress_with
from adamix.methods.adamix import analyse, compress_matrix
from adamix.methods.kinds import decode, low_rank_factors, pair_gains, parse_width_meta
from adamix.methods.svd_mixed import GAIN_BITS, expected_sizes, stored_bits
from adamix.quant.linalg import output_error

from synthetic import delta_and_gram


@pytest.fixture(scope="module", params=[0, 1])
def encoded(request):
    D, H = delta_and_gram(seed=request.param)
    s = Settings(alpha=1 / 4, group_size=32)
    return D, H, s, compress_matrix(D, H, s)


def test_gains_are_the_tables_and_complete_the_predicted_error(encoded):
    D, H, s, enc = encoded
    g = pair_gains("svd-mixed", enc.shape, enc.meta, enc.tensors)
    k = enc.stats["rank_kept"]
    assert g.shape == (k,) and bool((g >= 0).all())
    # float64 reference from an independent error table: (e_i(0) - e_i(b_i)) / ||D X||^2 in stored order
    a = analyse(D, H, s)
    chosen = enc.detail["widths_by_index"]
    kept = sorted((i for i in range(len(chosen)) if chosen[i] > 0), key=lambda i: (-chosen[i], i))
    zero, col = list(s.widths).index(0), {b: j for j, b in enumerate(s.widths)}
    ref = torch.tensor([a.table[i, zero] - a.table[i, col[int(chosen[i])]] for i in kept], dtype=torch.float64)
    ref /= output_error(None, D, H)
    assert torch.allclose(g.double(), ref, rtol=2e-3, atol=1e-7)  # fp16
    # the SVD's e_i(0) add up to ||D X||^2, so the kept gains and the predicted error make 1
    assert float(g.double().sum()) + enc.stats["error_predicted"] ** 2 == pytest.approx(1.0, abs=1e-4)


def test_gains_are_counted_in_the_stored_size(encoded):
    *_, enc = encoded
    k = enc.stats["rank_kept"]
    without = dict(enc.meta, gains=False)
    assert stored_bits(enc.shape, enc.meta) - stored_bits(enc.shape, without) == GAIN_BITS * k
    assert stored_bits(enc.shape, enc.meta) == 8 * enc.nbytes


def test_dropping_by_gain_adds_the_predicted_error(encoded):
    """Target correction leaves a residual orthogonal to V^ X, so dropping pairs adds their own
    energy: the sum of their gains, measured on D^ against D with the same H."""
    D, H, s, enc = encoded
    g = pair_gains("svd-mixed", enc.shape, enc.meta, enc.tensors)
    U, V = low_rank_factors("svd-mixed", enc.shape, enc.meta, enc.tensors)
    E0 = output_error(None, D, H)
    full = output_error(U @ V, D, H) / E0
    for R in (len(g) // 2, len(g) // 4, 2):
        keep = top_pairs(g, R)
        assert keep.tolist() == sorted(keep.tolist()) and len(keep) == R
        added = output_error(U[:, keep] @ V[keep], D, H) / E0 - full
        predicted = float(g.double().sum() - g[keep].double().sum())
        assert added == pytest.approx(predicted, rel=0.02)
        by_position = output_error(U[:, :R] @ V[:R], D, H) / E0 - full  # widest first, then index
        assert added <= by_position + 1e-9


def test_entries_written_before_gains_still_decode(encoded):
    *_, enc = encoded
    k = enc.stats["rank_kept"]
    old_meta = {key: v for key, v in enc.meta.items() if key != "gains"}
    old = {"codes": enc.tensors["codes"], "params": enc.tensors["params"][:-k]}
    assert expected_sizes(enc.shape, old_meta)[1] == old["params"].numel()
    assert torch.equal(decode("svd-mixed", enc.shape, old_meta, old), decode("svd-mixed", enc.shape, enc.meta, enc.tensors))
    assert pair_gains("svd-mixed", enc.shape, old_meta, old) is None


def test_a_malformed_gains_flag_is_refused():
    with pytest.raises(adamix.AdamixError, match="gains must be true or false, not 'yes'"):
        parse_width_meta({"group_size": 32, "widths": [[2, 1]], "gains": "yes"}, "svd-mixed")


def test_lowrank_gains_are_its_energy_shares():
    D, H = delta_and_gram()
    enc = compress_with(D, H, Settings(method="lowrank", alpha=1 / 4))
    g = pair_gains("lowrank", enc.shape, enc.meta, enc.tensors).double()
    U, V = low_rank_factors("lowrank", enc.shape, enc.meta, enc.tensors)
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-6) and bool((g[:-1] >= g[1:] - 1e-6).all())
    R = len(g) // 2  # dropping the tail removes its share of ||U V||_F^2
    tail = float(((U[:, R:].double() @ V[R:].double()) ** 2).sum() / ((U.double() @ V.double()) ** 2).sum())
    assert float(g[R:].sum()) == pytest.approx(tail, rel=1e-3)


def test_deltacome_stores_gains_too():
    D, H = delta_and_gram()
    enc = compress_with(D, H, Settings(method="deltacome", alpha=1 / 4, group_size=32))
    g = pair_gains("svd-mixed", enc.shape, enc.meta, enc.tensors)
    assert enc.meta["gains"] is True and g.shape == (enc.stats["rank_kept"],)
    assert float(g.double().sum()) + enc.stats["error_predicted"] ** 2 == pytest.approx(1.0, abs=1e-4)

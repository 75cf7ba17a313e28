"""The error table's model against what is stored. The table charges a dropped triplet its e_i(0) and
leaves out the cross terms between triplets. With the whitened SVD (the default) the truncation is
already optimal in the output error, so target correction (U refitted to the original outputs)
recovers nothing of it and the predicted error is close to the one measured after GPTQ and target
correction; with the plain SVD the refit removes part of the dropped error through the cross terms,
and the model overestimates the stored error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adamix.methods import Settings
from adamix.methods.adamix import analyse, compress_matrix, decide, finish, target_correction
from adamix.methods.allocate import stored_rows
from adamix.methods.svd_mixed import factors
from adamix.quant.gptq import gptq_rows
from adamix.quant.linalg import output_error


def correlated_pair(seed: int, m: int = 96, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat-spectrum delta (m x n) and the Gram of inputs with correlated, unequally scaled features."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, n, generator=g) * 0.01
    A = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[:, None]
    X = torch.randn(2048, n, generator=g) @ A
    return D, (X.T @ X).float()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [1 / 8, 1 / 16])
def test_the_whitened_model_predicts_the_stored_error_within_six_percent(seed, alpha):
    D, H = correlated_pair(seed)
    whitened = compress_matrix(D, H, Settings(alpha=alpha)).stats
    plain = compress_matrix(D, H, Settings(alpha=alpha, whiten=False)).stats
    assert 0.94 <= whitened["error_measured"] / whitened["error_predicted"] <= 1.02
    assert plain["error_measured"] / plain["error_predicted"] < 0.8  # the cross terms the model leaves out
    assert whitened["error_measured"] < plain["error_measured"]


@pytest.mark.parametrize("whiten", [True, False])
def test_target_correction_recovers_nothing_of_a_whitened_truncation(whiten):
    """Keep the leading k triplets exactly and refit U to the original outputs (target correction,
    undamped): whitened, the truncation is already the best rank-k fit in the output error, so the
    refit leaves exactly sum_{i >= k} e_i(0), the table's error for the drops; plain, the refit removes
    part of it (the cross terms through H), which is what the plain model misses."""
    D, H = correlated_pair(2)
    a = analyse(D, H, Settings(whiten=whiten))
    order = torch.argsort(torch.from_numpy(a.table[:, 0]), descending=True)
    for k in (8, 32, 64):
        keep = order[:k]
        Vk = a.V[:, keep].T.double()
        refit = target_correction(D.double(), H.double(), Vk, damp=0.0) @ Vk
        measured = output_error(refit, D.double(), H.double())
        dropped = float(a.table[order[k:].numpy(), 0].sum())
        if whiten:
            assert measured == pytest.approx(dropped, rel=1e-5)  # the factors are float32: ~1e-6 apart by rounding
        else:
            assert measured < 0.9 * dropped


def test_the_v_step_stores_the_rows_the_table_measured():
    """The error table quantizes every measured row of V^T at every width by GPTQ; the V step takes the
    kept ones from it. GPTQ's rows are independent, so they equal a fresh GPTQ of the kept rows alone,
    and the table's entry for a kept triplet is the error of exactly what is stored."""
    D, H = correlated_pair(4)
    settings = Settings(alpha=1 / 8)
    a = analyse(D, H, settings, prune=True)
    assert a.codes  # the table kept its codes
    enc = finish(a, decide(a, settings), a.budget, settings)
    chosen = enc.detail["widths_by_index"]
    keep = sorted(np.flatnonzero(chosen > 0).tolist(), key=lambda i: (-chosen[i], i))
    fresh = gptq_rows(a.V[:, keep].T.float().contiguous(), H, torch.tensor(chosen[keep]), settings.group_size)
    Ud, Vd = factors(tuple(D.shape), enc.meta, enc.tensors)
    assert torch.equal(Vd, fresh["deq"])
    reused = stored_rows(a.codes, keep, chosen[keep].tolist(), settings.group_size)
    assert torch.equal(reused["codes"], fresh["codes"]) and torch.equal(reused["deq"], fresh["deq"])
    assert stored_rows(a.codes, [len(a.s) + 5], [2], settings.group_size) is None  # a row never measured


@pytest.mark.parametrize("noise", [False, True])
def test_a_pruned_analysis_computes_the_vectors_of_the_measured_triplets_only(noise):
    # a truncated SVD: the pruned table's triplets get their vectors (linalg.Spectrum), the others not,
    # growing batch by batch where the table measures more (noise: a flat spectrum); its measured rows
    # equal the unpruned table's (every vector), and the stored result keeps the same widths and error
    from adamix.methods.allocate import max_kept
    from synthetic import delta_and_gram
    D, H = delta_and_gram(m=300, n=260)
    if noise:  # a flat spectrum: equal singular values, a Gram near a multiple of I
        g = torch.Generator().manual_seed(1)
        D = 1e-2 * torch.linalg.qr(torch.randn(300, 260, generator=g))[0]
        X = torch.randn(4000, 260, generator=g)
        H = X.T @ X
    settings = Settings(alpha=1 / 4 if noise else 1 / 16, group_size=32)
    pruned, full = analyse(D, H, settings, prune=True), analyse(D, H, settings)
    first = -(-max_kept(pruned.costs, pruned.budget) // 64) * 64  # error_table's first batch (chunk 64)
    measured = np.flatnonzero((pruned.table[:, 1:] != pruned.table[:, :1]).any(axis=1))
    assert full.U.shape[1] == len(full.table) == 260
    assert measured.max() < pruned.U.shape[1] == len(pruned.s) == pruned.V.shape[1]
    # fewer vectors than triplets, or (flat) more than the first batch: grown on demand
    assert pruned.U.shape[1] > first if noise else pruned.U.shape[1] < 260
    np.testing.assert_allclose(pruned.table[measured], full.table[measured], rtol=1e-5)
    torch.testing.assert_close(pruned.U, full.U[:, :pruned.U.shape[1]])
    torch.testing.assert_close(pruned.V, full.V[:, :pruned.V.shape[1]])
    alone, reference = compress_matrix(D, H, settings), finish(full, decide(full, settings), full.budget, settings)
    assert alone.meta["widths"] == reference.meta["widths"]
    assert alone.stats["error_measured"] == pytest.approx(reference.stats["error_measured"], rel=1e-4)

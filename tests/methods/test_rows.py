"""Row-sparse kind: the rows that carry a delta's energy, chosen by the knapsack under the budget."""

import numpy as np
import pytest
import torch

from adamix.methods.allocate import greedy_allocation, solve_allocation
from adamix.methods.adamix import Settings, budget_bits, compress_matrix
from adamix.methods.rows import compress_rows, decode_rows, row_cost

pytestmark = pytest.mark.usefixtures("single_thread")


def row_sparse_delta(m=400, n=64, hot=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = 1e-4 * torch.randn(m, n, generator=g)
    rows = torch.randperm(m, generator=g)[:hot]
    D[rows] += torch.randn(hot, n, generator=g)
    return D


def test_rows_round_trip_budget_and_error():
    D = row_sparse_delta()
    m, n = D.shape
    budget = budget_bits(m, n, 1 / 8)
    enc = compress_rows(D, (0, 2, 3, 4, 8), 32, budget)
    assert enc.nbytes * 8 <= budget
    Dhat = decode_rows((m, n), enc.meta, enc.tensors)
    rel = float((Dhat.double() - D.double()).norm() / D.double().norm())
    assert rel == pytest.approx(enc.stats["error_measured"], rel=1e-3)
    assert rel < 0.05
    # a row-sparse delta is far better served by rows than by a low-rank factorisation
    svd = compress_matrix(D, None, Settings(alpha=1 / 8, group_size=32))
    assert rel < 0.5 * svd.stats["error_measured"]


def test_rows_decode_rejects_out_of_range_index():
    from adamix import AdamixError
    D = row_sparse_delta()
    enc = compress_rows(D, (0, 8), 32, budget_bits(*D.shape, 1 / 8))
    bad = dict(enc.tensors, idx=enc.tensors["idx"].clone())
    bad["idx"][0] = D.shape[0]
    with pytest.raises(AdamixError, match="out of range"):
        decode_rows(tuple(D.shape), enc.meta, bad)


def test_greedy_allocation_feasible_and_near_milp_on_many_items():
    rng = np.random.default_rng(0)
    r = 300
    E = np.sort(rng.random((r, 4)) * rng.random((r, 1)) * 10, axis=1)[:, ::-1].copy()
    C = np.array([row_cost(64, b, 32) for b in (0, 2, 4, 8)], dtype=np.float64)
    for budget in (0.0, 1000.0, 20000.0, 1e9):
        g = greedy_allocation(E, C, budget)
        o = solve_allocation(E, C, budget)
        assert C[g].sum() <= budget
        rows = np.arange(r)
        # within one item of the exact optimum
        assert E[rows, g].sum() - E[rows, o].sum() <= E.max() + 1e-12

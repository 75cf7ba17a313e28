"""Bit allocation (allocate.py): exact knapsack vs brute force, error table vs a float64 reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from adamix.quant import linalg
from adamix.methods.allocate import error_table, keep_threshold, max_kept, solve_allocation
from adamix.methods.svd_mixed import triplet_bits as triplet_cost
from adamix.quant import grid
from adamix.quant.gptq import gptq_rows

ALL_WIDTHS = (1, 2, 3, 4, 5, 8)


pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force(errors: np.ndarray, costs: np.ndarray, budget: float) -> float:
    """Minimum of sum_i errors[i, choice_i] over all choices with sum_i costs[choice_i] <= budget."""
    r, nb = errors.shape
    best = math.inf
    for choice in itertools.product(range(nb), repeat=r):
        if sum(costs[c] for c in choice) <= budget:
            best = min(best, sum(errors[i, c] for i, c in enumerate(choice)))
    return best


def random_instance(seed: int):
    """An allocation problem shaped like ADAMIX's: costs from triplet_cost, errors decreasing in width."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(2, 6))
    widths = [0] + sorted(rng.choice(ALL_WIDTHS, size=int(rng.integers(2, 5)), replace=False).tolist())
    m, n = (int(v) for v in rng.integers(8, 300, size=2))
    group_size = int(rng.choice([16, 64, 128]))
    costs = np.array([triplet_cost(m, n, b, group_size) for b in widths], dtype=np.float64)
    s2 = np.sort(rng.lognormal(0.0, 1.0, size=r))[::-1]
    shrink = np.cumprod(rng.uniform(0.05, 0.6, size=(r, len(widths) - 1)), axis=1)
    errors = s2[:, None] * np.concatenate([np.ones((r, 1)), shrink], axis=1)
    budget = float(rng.uniform(0.0, 1.05) * r * costs.max())
    return errors, costs, budget


def objective(errors: np.ndarray, choice: np.ndarray) -> float:
    return float(errors[np.arange(len(choice)), choice].sum())


# ------------------------------------------------------------------------------- solve_allocation


@pytest.mark.parametrize("seed", range(20))
def test_solve_allocation_matches_brute_force(seed):
    errors, costs, budget = random_instance(seed)
    choice = solve_allocation(errors, costs, budget)
    assert choice.shape == (errors.shape[0],)
    assert costs[choice].sum() <= budget
    best = brute_force(errors, costs, budget)
    assert objective(errors, choice) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_solve_allocation_arbitrary_error_tables(seed):
    # errors need not be monotone in the width, nor costs sorted: the ILP must not rely on it
    rng = np.random.default_rng(100 + seed)
    r, nb = 4, 4
    errors = rng.uniform(0.1, 10.0, size=(r, nb))
    costs = np.array([0.0, 7.0, 3.0, 5.0])
    for budget in (0.0, 3.0, 6.0, 8.0, 11.0, 13.0, 20.0, 28.0):
        choice = solve_allocation(errors, costs, budget)
        assert costs[choice].sum() <= budget
        assert objective(errors, choice) == pytest.approx(brute_force(errors, costs, budget), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_reduction_before_the_milp_is_exact(seed):
    # equal costs per row: rows below keep_threshold are fixed at width 0 before the MILP; the
    # optimum must not change (brute force over 3^8 choices), and the reduction must really fire
    rng = np.random.default_rng(300 + seed)
    r = 8
    costs = np.array([0.0, 2.0, 3.0])
    e0 = np.sort(rng.lognormal(0.0, 1.5, size=r))[::-1]
    errors = e0[:, None] * np.concatenate([np.ones((r, 1)), rng.uniform(0.02, 0.7, size=(r, 2))], axis=1)
    for budget in (2.0, 4.0, 5.0, 7.0):
        T = keep_threshold(errors, 0, max_kept(costs, budget))
        assert (errors[:, 0] < T).any() or budget == 7.0
        choice = solve_allocation(errors, costs, budget)
        assert costs[choice].sum() <= budget
        assert objective(errors, choice) == pytest.approx(brute_force(errors, costs, budget), rel=1e-9)


def test_keep_threshold_hand_example():
    # gains at the cheapest useful width: 10 - 4 = 6, 7 - 1 = 6 ... g = e0 - max_{b>0} e(b)
    errors = np.array([[10.0, 4.0, 1.0], [7.0, 1.0, 0.5], [5.0, 4.5, 0.1], [2.0, 0.1, 0.0]])
    assert keep_threshold(errors, 0, 2) == 6.0   # g = 6, 6, 0.5, 1.9
    assert keep_threshold(errors, 0, 3) == 1.9
    assert keep_threshold(errors, 0, 5) == -np.inf
    assert max_kept(np.array([0.0, 3.0, 5.0]), 10.0) == 3 and max_kept(np.array([0.0, 3.0]), -1.0) == 0


def test_hand_example():
    # budget 5 with costs 0/2/5: A at width 2 (cost 5) gives 0 + 1 = 1; A and B at width 1 (cost 4)
    # give 5 + 0.5; A at width 1 alone 5 + 1. The optimum spends everything on A.
    errors = np.array([[10.0, 5.0, 0.0], [1.0, 0.5, 0.0]])
    costs = np.array([0.0, 2.0, 5.0])
    assert solve_allocation(errors, costs, 5.0).tolist() == [2, 0]
    assert solve_allocation(errors, costs, 4.0).tolist() == [1, 1]
    assert solve_allocation(errors, costs, 7.0).tolist() == [2, 1]
    assert solve_allocation(errors, costs, 10.0).tolist() == [2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_budget_below_every_nonzero_cost_keeps_nothing(seed):
    errors, costs, _ = random_instance(seed)
    budget = costs[costs > 0].min() - 1.0
    choice = solve_allocation(errors, costs, budget)
    assert (costs[choice] == 0).all()
    assert objective(errors, choice) == pytest.approx(errors[:, 0].sum(), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_budget_for_everything_keeps_everything_at_max_width(seed):
    errors, costs, _ = random_instance(seed)
    r = errors.shape[0]
    choice = solve_allocation(errors, costs, r * costs.max())
    assert (choice == len(costs) - 1).all()  # errors strictly decrease with width in these instances


def test_budget_below_zero_cost_raises_and_empty_problem():
    with pytest.raises(ValueError):
        solve_allocation(np.ones((2, 2)), np.array([0.0, 5.0]), -1.0)
    assert solve_allocation(np.zeros((0, 3)), np.array([0.0, 1.0, 2.0]), 10.0).shape == (0,)


def test_solve_allocation_exact_with_wide_dynamic_range():
    errors = np.array([[1000.0, 300.0, 200.0],
                       [4e-4, 1e-4, 7e-5],
                       [1.3e-3, 6.6e-4, 5.3e-4]])
    costs = np.array([0.0, 3.0, 5.0])
    choice = solve_allocation(errors, costs, 11.0)
    # optimum: triplet 0 at the widest, 1 and 2 at the middle width (cost 11): 200 + 1e-4 + 6.6e-4
    assert objective(errors, choice) == pytest.approx(brute_force(errors, costs, 11.0), rel=1e-9)


# ----------------------------------------------------------------------------------- triplet_cost


def test_triplet_cost_hand_computation():
    # m = 300 (groups of 128: 128 + 128 + 44 -> 3 groups), n = 100 (< 128: one group of 100)
    # 3 bits: 3 * (300 + 100) code bits + 16 + 16 bits (fp16 scale + offset) per group * (3 + 1) groups
    # + the triplet's 16-bit gain
    assert triplet_cost(300, 100, 3, 128) == 3 * 400 + 32 * 4 + 16 == 1344
    assert triplet_cost(300, 100, 8, 128) == 8 * 400 + 32 * 4 + 16
    # group size 10: 30 + 10 groups
    assert triplet_cost(300, 100, 2, 10) == 2 * 400 + 32 * 40 + 16
    assert triplet_cost(300, 100, 0, 128) == 0
    # cost is what is stored: one fp16 pair per group of each vector, ceil for a short last group
    m, n, b, g = 257, 33, 4, 64
    assert triplet_cost(m, n, b, g) == b * (m + n) + 2 * 16 * (math.ceil(m / g) + math.ceil(n / min(g, n))) + 16


# ------------------------------------------------------------------------------------ error_table


def _problem(m=24, n=40, T=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(2.0, 0.1, n, dtype=torch.float64))
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    X = A @ torch.randn(n, T, generator=g, dtype=torch.float64)  # correlated inputs
    X[3] *= 10.0  # an outlier input dimension
    U, s, Vh = torch.linalg.svd(D, full_matrices=False)
    return D, X, U, s, Vh.T


def _reference_table(s, U, V, X, widths, group_size, gptq_on=None):
    """e_i(b) = ||s_i (u_i v_i^T - u^_i v^_i^T) X||_F^2 computed directly in float64 (numpy), u^ by RTN,
    v^ by GPTQ of v_i alone on the Gram `gptq_on` (RTN if None), as the V step stores it."""
    m, n = U.shape[0], V.shape[0]
    Xn = X.double().numpy()
    out = np.zeros((len(s), len(widths)))
    for i in range(len(s)):
        u, v = U[:, i], V[:, i]
        for j, b in enumerate(widths):
            if b == 0:
                uq, vq = np.zeros(m), np.zeros(n)
            else:
                uq = grid.rtn(u[None], torch.tensor([b]), min(group_size, m))["deq"][0].double().numpy()
                vq = (grid.rtn(v[None], torch.tensor([b]), min(group_size, n)) if gptq_on is None else
                      gptq_rows(v[None].float(), gptq_on, torch.tensor([b]), group_size))["deq"][0].double().numpy()
            E = float(s[i]) * (np.outer(u.numpy(), v.numpy()) - np.outer(uq, vq)) @ Xn
            out[i, j] = (E ** 2).sum()
    return torch.from_numpy(out)


@pytest.mark.parametrize("group_size", [8, 16, 128])
def test_error_table_matches_direct_output_error(group_size):
    D, X, U, s, V = _problem()
    widths = [0, 1, 2, 3, 4, 8]
    H = X @ X.T
    table = error_table(s, U, V, H, widths, group_size)
    assert table.dtype == torch.float64 and table.shape == (len(s), len(widths))
    ref = _reference_table(s, U, V, X, widths, group_size, gptq_on=H)
    # dv^T H dv comes from GPTQ's float32 column errors: exact to float32 rounding of those
    torch.testing.assert_close(table, ref, rtol=3e-5, atol=0.0)
    # e_i(0) is the whole energy of the triplet's output
    torch.testing.assert_close(table[:, 0], s ** 2 * ((V.T @ X) ** 2).sum(1), rtol=1e-9, atol=0.0)


def test_error_table_without_gram_is_identity_gram():
    D, X, U, s, V = _problem(seed=1)
    widths = [0, 2, 3, 8]
    t_none = error_table(s, U, V, None, widths, 16)
    t_eye = error_table(s, U, V, torch.eye(V.shape[0], dtype=torch.float64), widths, 16)
    # the same codes (GPTQ on I is RTN); with H = I the error comes from GPTQ's float32 column errors
    torch.testing.assert_close(t_none, t_eye, rtol=1e-5, atol=1e-15)
    # and it is the Frobenius error of the rank-1 term (X = I)
    ref = _reference_table(s, U, V, torch.eye(V.shape[0], dtype=torch.float64), widths, 16)
    torch.testing.assert_close(t_none, ref, rtol=1e-6, atol=0.0)
    # data-free e_i(0) = s_i^2 exactly (unit singular vectors)
    torch.testing.assert_close(t_none[:, 0], s ** 2, rtol=1e-12, atol=0.0)


def test_error_table_float32_inputs():
    # float32 factors / Gram (as a caller may pass) give the same table up to float32 input rounding
    D, X, U, s, V = _problem(seed=2)
    H = X @ X.T
    t64 = error_table(s, U, V, H, [0, 4, 8], 16)
    t32 = error_table(s.float(), U.float(), V.float(), H.float(), [0, 4, 8], 16)
    assert t32.dtype == torch.float64
    torch.testing.assert_close(t32, t64, rtol=1e-3, atol=1e-6 * float(t64.max()))


def test_float32_gram_products_match_float64():
    # the pipeline hands methods its float32 Gram: products in float32, sums in float64, exact H B
    g = torch.Generator().manual_seed(7)
    n = 300
    X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10.0, n, dtype=torch.float64)[:, None]
    H64 = X @ X.T
    H32 = H64.float()
    A = torch.randn(40, n, generator=g, dtype=torch.float64)
    B = A + 1e-3 * torch.randn(40, n, generator=g, dtype=torch.float64)
    ref = ((A @ H32.double()) * B).sum(1)
    torch.testing.assert_close(linalg.gram_rows(A, B, H32, chunk=16), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(linalg.gram_rows(A, B, H64, chunk=16), ((A @ H64) * B).sum(1), rtol=1e-12, atol=0.0)
    # H B is exact (float64) whatever H's dtype, and whatever the chunk
    torch.testing.assert_close(linalg.matmul64(H32, A.T, chunk=7), H32.double() @ A.T, rtol=1e-10, atol=0.0)
    E = B - A
    assert linalg.output_error(B, A, H32, chunk=9) == pytest.approx(float(((E @ H64) * E).sum()), rel=1e-5)


def test_error_table_float32_gram_keeps_small_errors():
    # at 8 bits e_i(b) is ~1e-5 of e_i(0); a difference of large float32 terms would lose it entirely
    D, X, U, s, V = _problem(m=48, n=256, T=600, seed=3)
    widths = [0, 2, 8]
    H = X @ X.T
    ref = _reference_table(s, U, V, X, widths, 32, gptq_on=H)
    t32 = error_table(s, U, V, H.float(), widths, 32, chunk=5)
    assert float((ref[:, 2] / ref[:, 0]).max()) < 1e-3
    # within 1% (GPTQ's float32 updates round differently on different CPUs' BLAS); a difference of
    # large float32 terms would be off by more than the error itself
    torch.testing.assert_close(t32, ref, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("alpha", [1 / 8, 1 / 16, 1 / 32, 1 / 64])
def test_pruned_error_table_gives_the_same_optimum(alpha):
    # max_kept measures only the triplets an optimal choice may keep: the ILP's optimum is unchanged,
    # the measured rows equal the full table's, and at small ratios most rows are skipped
    from adamix.methods.adamix import budget_bits
    D, X, U, s, V = _problem(m=64, n=96, T=300, seed=4)
    H = (X @ X.T).float()
    widths, g = [0, 2, 3, 4, 8], 32
    costs = np.array([triplet_cost(64, 96, b, g) for b in widths], dtype=np.float64)
    budget = budget_bits(64, 96, alpha)
    full = error_table(s, U, V, H, widths, g, chunk=8).numpy()
    pruned = error_table(s, U, V, H, widths, g, chunk=8, max_kept=max_kept(costs, budget)).numpy()
    measured = (pruned[:, 1:] != pruned[:, :1]).any(axis=1)
    np.testing.assert_allclose(pruned[measured], full[measured], rtol=1e-6)
    if alpha <= 1 / 32:
        assert measured.sum() < 0.5 * len(s)
    assert objective(full, solve_allocation(pruned, costs, budget)) == pytest.approx(
        objective(full, solve_allocation(full, costs, budget)), rel=1e-9)
    # the same pruned table serves any smaller budget
    assert objective(full, solve_allocation(pruned, costs, budget / 2)) == pytest.approx(
        objective(full, solve_allocation(full, costs, budget / 2)), rel=1e-9)


def test_native_stdout_is_silenced_only_inside_the_solve():
    """HiGHS writes debug lines straight to file descriptor 1; the ILP points it at /dev/null for the
    solve only: what Python printed before is flushed out, and printing works again after."""
    import subprocess
    import sys
    code = ("import os, sys\n"
            "from adamix.methods.allocate import native_stdout_silenced\n"
            "print('before', end=' ')\n"
            "with native_stdout_silenced():\n"
            "    os.write(1, b'HighsMipSolverData::transformNewIntegerFeasibleSolution')\n"
            "print('after')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout == "before after\n" and r.stderr == ""


def test_priced_out_against_brute_force():
    # random small knapsacks: whenever the Lagrangian certificate says the rows outside the measured
    # ones (the top k by e_i(0)) are not needed, no optimal choice (brute force) keeps one of them
    from adamix.methods.allocate import priced_out
    rng = np.random.default_rng(0)
    costs = np.array([0.0, 2.0, 3.0])
    held = 0
    for _ in range(60):
        r = 9
        e0 = np.sort(rng.gamma(0.7, size=r))[::-1] * rng.uniform(1, 5)
        table = np.stack([e0, e0 * rng.uniform(0.05, 0.6, r), e0 * rng.uniform(0.0, 0.3, r)], axis=1)
        table[:, 2] = np.minimum(table[:, 2], table[:, 1])
        budget = float(rng.uniform(3, 14))
        best = min(itertools.product(range(3), repeat=r),
                   key=lambda c: np.inf if costs[list(c)].sum() > budget else table[np.arange(r), c].sum())
        optimum = table[np.arange(r), best].sum()
        for k in range(1, r):
            if priced_out(table[:k], 0, costs, budget, float(e0[k])):
                held += 1
                for c in itertools.product(range(3), repeat=r):
                    if costs[list(c)].sum() <= budget and any(c[k:]):
                        assert table[np.arange(r), c].sum() > optimum
                break
    assert held > 10  # the certificate is not vacuous


def test_the_price_certificate_measures_fewer_rows_for_the_same_optimum():
    # error_table with the budget (priced_out) stops earlier than with the swap argument alone; the
    # optimum at that budget is the full table's. Decaying spectrum plus noise, as real deltas.
    from adamix.methods.adamix import budget_bits
    g = torch.Generator().manual_seed(5)
    m, n, k = 160, 200, 40
    D = (torch.randn(m, k, generator=g, dtype=torch.float64) * torch.linspace(1, 0.2, k, dtype=torch.float64)) \
        @ torch.randn(k, n, generator=g, dtype=torch.float64) / 10 + torch.randn(m, n, generator=g, dtype=torch.float64) * 0.03
    X = torch.randn(n, 600, generator=g, dtype=torch.float64)
    H = (X @ X.T).float()
    U, s, Vh = torch.linalg.svd(D, full_matrices=False)
    V = Vh.T
    widths, gs = [0, 2, 3, 4, 8], 32
    costs = np.array([triplet_cost(m, n, b, gs) for b in widths], dtype=np.float64)
    full = error_table(s, U, V, H, widths, gs, chunk=8).numpy()
    fewer = []
    for alpha in (1 / 8, 1 / 16, 1 / 32):
        budget = budget_bits(m, n, alpha)
        swap = error_table(s, U, V, H, widths, gs, chunk=8, max_kept=max_kept(costs, budget)).numpy()
        price = error_table(s, U, V, H, widths, gs, chunk=8, max_kept=max_kept(costs, budget),
                            costs=costs, budget=budget).numpy()
        measured = lambda t: int((t[:, 1:] != t[:, :1]).any(axis=1).sum())  # noqa: E731
        assert measured(price) <= measured(swap) < len(s)
        fewer.append(measured(price) < measured(swap))
        assert objective(full, solve_allocation(price, costs, budget)) == pytest.approx(
            objective(full, solve_allocation(full, costs, budget)), rel=1e-9)
    assert any(fewer)

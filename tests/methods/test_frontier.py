"""The exact frontier solver of the allocation (methods/frontier.py) against brute force and HiGHS,
and the fallback to HiGHS when its frontier grows too large."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adamix.methods import allocate, frontier
from adamix.methods.svd_mixed import triplet_bits

from test_allocate import brute_force, objective, random_instance

WIDTHS = (0, 2, 3, 4, 8)


def best_gain(gains: np.ndarray, costs: np.ndarray, budget: float) -> float:
    """Brute force over every choice, per-row costs (r, nb)."""
    r, nb = gains.shape
    best = -np.inf
    for choice in itertools.product(range(nb), repeat=r):
        rows = np.arange(r)
        if costs[rows, choice].sum() <= budget:
            best = max(best, gains[rows, choice].sum())
    return best


@pytest.mark.parametrize("seed", range(40))
def test_frontier_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    r, nb = int(rng.integers(2, 7)), 4
    if seed % 2:  # per-row costs (a shared allocation over several matrices)
        costs = np.concatenate([np.zeros((r, 1)), rng.integers(1, 20, size=(r, nb - 1))], axis=1).astype(float)
    else:
        costs = np.broadcast_to(np.array([0.0, 3.0, 5.0, 9.0]), (r, nb)).copy()
    gains = np.concatenate([np.zeros((r, 1)), rng.uniform(-1.0, 10.0, size=(r, nb - 1))], axis=1)
    if seed % 3 == 0:
        gains = np.round(gains)  # exact ties between options and between items
    for budget in (0.0, 4.0, 9.0, 15.0, 30.0, 100.0):
        choice = frontier.solve(gains, costs, budget)
        rows = np.arange(r)
        assert costs[rows, choice].sum() <= budget
        assert gains[rows, choice].sum() == pytest.approx(best_gain(gains, costs, budget), rel=1e-12, abs=1e-12)


def adamix_like(seed: int, r: int = 400, m: int = 1024, n: int = 1024):
    """An error table shaped like a real one: decaying e_i(0), each wider width removing most of the
    error left, with near-ties between neighbouring triplets; costs of triplet_bits; alpha 1/16."""
    rng = np.random.default_rng(seed)
    e0 = (1.0 + np.arange(r)) ** -1.4 * rng.uniform(0.9, 1.1, size=r)
    left = np.array([1.0, 0.3, 0.09, 0.025, 0.0002]) * rng.uniform(0.8, 1.2, size=(r, 1))
    errors = e0[:, None] * np.minimum(left, 1.0)
    costs = np.array([triplet_bits(m, n, b, 128) for b in WIDTHS], dtype=float)
    return errors, costs, m * n * 16 / 16


@pytest.mark.parametrize("seed", range(4))
def test_frontier_matches_highs_on_adamix_shaped_tables(seed, monkeypatch):
    errors, costs, budget = adamix_like(seed)
    got = allocate.solve_allocation(errors, costs, budget)
    monkeypatch.setattr(frontier, "solve", lambda *a, **k: None)  # HiGHS alone
    ref = allocate.solve_allocation(errors, costs, budget)
    assert costs[got].sum() <= budget
    assert objective(errors, got) == pytest.approx(objective(errors, ref), rel=1e-9)


def test_a_frontier_past_its_limit_gives_up_and_highs_answers(monkeypatch):
    errors, costs, budget = adamix_like(0, r=60, m=256, n=256)
    gains = errors[:, :1] - errors
    C = np.broadcast_to(costs, errors.shape)
    assert frontier.solve(gains, C, budget, max_states=1) is None
    solve = frontier.solve
    monkeypatch.setattr(frontier, "solve", lambda g, c, b: solve(g, c, b, max_states=1))
    for seed in range(6):
        e, c, b = random_instance(seed)
        choice = allocate.solve_allocation(e, c, b)
        assert objective(e, choice) == pytest.approx(brute_force(e, c, b), rel=1e-9)


def test_lagrangian_price_is_where_the_priced_choice_starts_to_fit():
    errors, costs, budget = adamix_like(1, r=100)
    gains, C = errors[:, :1] - errors, np.broadcast_to(costs, errors.shape)
    lam = frontier.bit_price(gains, C, budget)
    rows = np.arange(len(gains))
    assert C[rows, frontier.priced_choice(gains, C, lam)].sum() <= budget
    assert C[rows, frontier.priced_choice(gains, C, lam * (1 - 1e-9))].sum() > budget

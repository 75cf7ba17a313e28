"""--max-rank: a rank cap as a constraint of the allocation (exact against brute force), held with
the byte budget by every method that has a rank, refused by the others."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import adamix
from adamix.compression.options import Options
from adamix.methods import Settings, compress_with
from adamix.methods.adamix import analyse, compress_jointly, compress_matrix
from adamix.methods.allocate import max_kept, solve_allocation, within_cap
from adamix.methods.registry import budget_bits
from adamix.methods.svd_mixed import stored_bits
from synthetic import delta_and_gram


def brute_force(errors, costs, budget, cap, groups):
    best = math.inf
    for c in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        c = np.array(c)
        if costs[c].sum() <= budget and within_cap(c, costs, cap, groups):
            best = min(best, errors[np.arange(len(c)), c].sum())
    return best


@pytest.mark.parametrize("seed", range(40))
def test_capped_ilp_is_exact(seed):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(2, 7))
    costs = np.array([0, 2, 3, 8.0]) * int(rng.integers(1, 4))
    e0 = rng.random(r) * 10
    errors = np.stack([e0] + [e0 * rng.random(r) * f for f in (0.6, 0.3, 0.05)], 1)
    budget, cap = float(rng.integers(2, 30)), int(rng.integers(1, r + 1))
    groups = rng.integers(0, 2, r) if seed % 2 else None
    got = solve_allocation(errors, costs, budget, cap=cap, groups=groups)
    assert costs[got].sum() <= budget and within_cap(got, costs, cap, groups)
    assert errors[np.arange(r), got].sum() == pytest.approx(brute_force(errors, costs, budget, cap, groups), rel=1e-9)


def test_within_cap_counts_per_group():
    costs = np.array([0, 2.0])
    assert within_cap(np.array([1, 1, 0]), costs, 2) and not within_cap(np.array([1, 1, 1]), costs, 2)
    assert within_cap(np.array([1, 1, 1, 1]), costs, 2, np.array([0, 0, 1, 1]))
    assert not within_cap(np.array([1, 1, 1, 0]), costs, 2, np.array([0, 0, 0, 1]))


def test_adamix_cap_holds_with_the_budget_and_frees_bits_for_widths():
    D, H = delta_and_gram()
    s = Settings(alpha=1 / 4, group_size=32)
    free = compress_matrix(D, H, s)
    k = free.stats["rank_kept"]
    assert k > 6
    capped = compress_matrix(D, H, dataclasses.replace(s, max_rank=k // 3))
    assert capped.stats["rank_kept"] <= k // 3
    for enc in (free, capped):
        assert stored_bits(enc.shape, enc.meta) == 8 * enc.nbytes <= budget_bits(*D.shape, 1 / 4)
    mean_width = {name: sum(b * c for b, c in e.meta["widths"]) / sum(c for _, c in e.meta["widths"])
                  for name, e in (("free", free), ("capped", capped))}
    assert mean_width["capped"] > mean_width["free"]  # the bits the cap frees widen the kept triplets
    # a constraint more can only raise the optimum of the model the ILP minimises
    assert capped.stats["error_predicted"] >= free.stats["error_predicted"] - 1e-12


def test_a_pruned_table_serves_the_budgets_and_caps_its_swap_argument_covers():
    D, H = delta_and_gram(m=300, n=260)
    s = Settings(alpha=1 / 4, group_size=32, max_rank=3)
    a = analyse(D, H, s, prune=True)
    assert a.pruned_count < max_kept(a.costs, a.budget) < len(a.table)  # measured for the cap, not for the budget
    with pytest.raises(ValueError, match="and rank 3; it cannot serve"):
        compress_matrix(D, H, dataclasses.replace(s, max_rank=None), analysis=a)
    within = dataclasses.replace(s, max_rank=a.pruned_count)  # a larger cap, still within what it serves
    reused, alone = compress_matrix(D, H, within, analysis=a), compress_matrix(D, H, within)
    assert reused.meta == alone.meta and reused.tensors.keys() == alone.tensors.keys()
    assert all(torch.equal(reused.tensors[k], alone.tensors[k]) for k in alone.tensors)


def test_joint_allocation_caps_every_matrix():
    s = Settings(alpha=1 / 4, group_size=32, max_rank=4, budget_scope="block")
    pairs = [delta_and_gram(seed=i) for i in range(3)]
    encs = compress_jointly([analyse(D, H, s, 0.0) for D, H in pairs], s)
    assert all(e.stats["rank_kept"] <= 4 for e in encs)
    assert sum(e.stats["rank_kept"] for e in encs) > 4  # the cap is per matrix, not for the block


@pytest.mark.parametrize("method", ["deltacome", "lowrank"])
def test_peers_with_a_rank_hold_the_cap(method):
    D, H = delta_and_gram()
    s = Settings(method=method, alpha=1 / 4, group_size=32)
    free, capped = compress_with(D, H, s), compress_with(D, H, dataclasses.replace(s, max_rank=2))
    assert free.stats["rank_kept"] > 2 and capped.stats["rank_kept"] == 2


@pytest.mark.parametrize("changes, message", [
    ({"max_rank": 0}, "--max-rank must be a positive integer, got 0"),
    ({"max_rank": 2.5}, "--max-rank must be a positive integer, got 2.5"),
    ({"max_rank": 8, "method": "bitdelta"}, "--max-rank 8 applies to --method adamix / deltacome / lowrank only, not bitdelta"),
    ({"max_rank": 8, "method": "rtn"}, "--max-rank 8 applies to --method adamix / deltacome / lowrank only, not rtn"),
])
def test_bad_caps_are_refused(changes, message):
    with pytest.raises(adamix.AdamixError) as e:
        Options(**changes).settings()
    assert str(e.value) == message


def test_the_cap_is_recorded_and_held_through_the_cli(llama_pair, calib_file, tmp_path):
    from adamix.cli import main
    out = tmp_path / "d"
    assert main(["compress", *map(str, llama_pair), "-o", str(out), "--ratio", "1/4", "--max-rank", "3",
                 "--calib", str(calib_file), "--samples", "4", "--seqlen", "32", "-q"]) == 0
    art = adamix.load(out)
    assert art.manifest["settings"]["max_rank"] == 3
    ranks = [sum(c for _, c in e["meta"]["widths"]) for e in art.entries.values() if e["kind"] == "svd-mixed"]
    assert ranks and max(ranks) <= 3
    assert art.manifest["sizes"]["alpha_achieved"] <= 1 / 4

"""Block-scope allocation: one ILP over several deltas under the sum of their budgets."""

import torch

from adamix.methods.adamix import Settings, analyse, budget_bits, compress_jointly, compress_matrix


def problem(m, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    D = scale * (torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.3 * torch.randn(m, n, generator=g))
    X = torch.randn(n, 4 * n, generator=g) * torch.linspace(0.2, 2.0, n)[:, None]
    return D, (X @ X.T).double()


def predicted_abs(enc):
    return enc.stats["error_predicted"] ** 2 * enc.stats["energy"]


def test_joint_allocation_beats_separate_and_keeps_total_budget():
    settings = Settings(alpha=1 / 8, group_size=32)
    probs = [problem(64, 96, 0, 1.0), problem(96, 64, 1, 5.0), problem(64, 64, 2, 0.2)]
    separate = [compress_matrix(D, H, settings) for D, H in probs]
    joint = compress_jointly([analyse(D, H, settings) for D, H in probs], settings)
    total_budget = sum(budget_bits(D.shape[0], D.shape[1], settings.alpha) for D, _ in probs)
    assert sum(e.nbytes * 8 for e in joint) <= total_budget
    # the separate allocation is feasible for the joint problem, so the joint optimum is no worse
    assert sum(map(predicted_abs, joint)) <= sum(map(predicted_abs, separate)) * (1 + 1e-9)
    # and bits move to the delta with the most output energy
    share = [e.nbytes / s.nbytes for e, s in zip(joint, separate)]
    assert share[1] > 1 > share[2]

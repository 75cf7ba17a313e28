"""ImPart and ImPart-Qt: the sparsity schedule against the paper's formula, the budget, the masks
from the seed, a float64 reference of the reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synthetic import delta_and_gram

import adamix
from adamix.compression.options import Options
from adamix.methods import Settings, compress_with, decode
from adamix.methods.impart import BETA, C_EXP, V_SALT, impart_factors, kept_counts, sparsities, stored_bits
from adamix.methods.registry import budget_bits
from adamix.methods.seeded import column_subsets
from adamix.quant.linalg import svd


def reference_sparsities(s, a, beta=BETA, c=C_EXP):
    """Algorithm 1 of the paper in plain Python (float64, before the fp16 rounding of storage)."""
    r = len(s)
    k = math.floor(r * (1 - beta))
    gamma = (a - beta) / (1 - beta)
    p = [gamma * (1 - (s[i] / s[0]) ** c) for i in range(k)]
    j = k - 1
    while j > 0 and sum(p) / k < gamma:
        p[j] = 1.0
        j -= 1
    return p + [1.0] * (r - k)


@pytest.mark.parametrize("a", [0.85, 0.9, 0.95, 0.99])
def test_the_schedule_is_the_papers(a):
    s = np.sort(np.random.default_rng(0).random(200) ** 3)[::-1] * 10
    ref = np.array(reference_sparsities(s, a))
    got = sparsities(s, a)
    assert np.allclose(got, ref.astype(np.float16).astype(np.float64))
    assert got[0] == 0.0  # the first triplet stays dense
    k = math.floor(200 * (1 - BETA))
    assert np.all(got[k:] == 1.0) and got[:k].mean() >= (a - BETA) / (1 - BETA) - 1e-3
    # the overall sparsity over the r (m + n) factor entries is the target (k gamma + r - k) / r, reached
    # from below: the boundary shift stops at the first triplet past it (at most 1 / r more)
    gamma = (a - BETA) / (1 - BETA)
    target = (k * gamma + 200 - k) / 200
    assert target - 1e-3 <= got.sum() / 200 <= target + 1 / 200 + 1e-3


def reference_reconstruction(D, enc):
    """sum_i s_i (M_u,i u_i)(M_v,i v_i)^T / (1 - p_i)^2 in float64, masks regenerated from the seed."""
    U, s, V = svd(D)
    K, seed = enc.meta["rank"], enc.meta["seed"]
    p = enc.tensors["params"][:K].double().numpy()
    m, n = D.shape
    ku = column_subsets(seed, m, kept_counts(p, m).tolist())
    kv = column_subsets(seed ^ V_SALT, n, kept_counts(p, n).tolist())
    out = torch.zeros(m, n, dtype=torch.float64)
    for i in range(K):
        u, v = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        u[ku[i]], v[kv[i]] = U[ku[i], i].double(), V[kv[i], i].double()
        out += float(s[i]) * torch.outer(u, v) / (1 - p[i]) ** 2
    return out, ku, kv


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("alpha", [1 / 2, 1 / 4, 1 / 8, 1 / 16])
def test_impart_fits_the_budget_and_matches_the_reference(quantize, alpha):
    D, H = delta_and_gram(m=120, n=96)
    enc = compress_with(D, H, Settings(method="impart", alpha=alpha, quantize=quantize, group_size=32))
    m, n = D.shape
    K = enc.meta["rank"]
    p = np.concatenate([enc.tensors["params"][:K].double().numpy(), np.ones(min(m, n) - K)])
    assert 8 * enc.nbytes == stored_bits(m, n, p, quantize, 32) <= budget_bits(m, n, alpha)
    assert K > 0
    ref, ku, kv = reference_reconstruction(D, enc)
    Uh, Vh = impart_factors(enc.shape, enc.meta, enc.tensors)
    for i in range(K):  # the masks regenerated from the seed hold every stored entry
        outside_u = torch.ones(m, dtype=torch.bool)
        outside_u[ku[i]] = False
        outside_v = torch.ones(n, dtype=torch.bool)
        outside_v[kv[i]] = False
        assert bool((Uh[outside_u, i] == 0).all()) and bool((Vh[i, outside_v] == 0).all())
    got = decode("impart", enc.shape, enc.meta, enc.tensors).double()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < (1e-3 if not quantize else 0.5)  # fp16 values; quantized: the grids' error, not a wrong mask
    if quantize:  # GPTQ of the masked factors beats keeping nothing and lands near the reference
        assert float((got - D.double()).norm()) < float(D.double().norm())


def test_impart_qt_uses_deltacomes_widths():
    D, H = delta_and_gram(m=120, n=96)
    enc = compress_with(D, H, Settings(method="impart", alpha=1 / 4, quantize=True, group_size=32))
    widths = [b for b, c in enc.meta["widths"] for _ in range(c)]
    assert widths == ([8, 8] + [3] * 32 + [2] * 200)[:enc.meta["rank"]]


def test_quantize_is_refused_by_other_methods():
    with pytest.raises(adamix.AdamixError) as e:
        Options(method="adamix", quantize=True).settings()
    assert str(e.value) == "--quantize applies to --method impart only, not adamix"


def test_impart_through_the_pipeline(bert_pair, calib_file, tmp_path):
    base, ft = bert_pair
    m = adamix.compress(base, ft, tmp_path / "d", method="impart", ratio="1/8", calib=calib_file, samples=4,
                        seqlen=32, progress=False)
    assert m["sizes"]["alpha_achieved"] <= 1 / 8
    art = adamix.load(tmp_path / "d")
    kinds = [e["kind"] for e in art.entries.values()]
    assert "impart" in kinds
    for name, e in art.entries.items():
        if e["kind"] == "impart":
            assert art.delta(name).shape == tuple(e["shape"])
            assert e["stats"]["error_measured"] < 1.0

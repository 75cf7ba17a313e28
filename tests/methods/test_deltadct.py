"""Delta-DCT: the DCT against scipy's, the budget, the allocation by patch norm, a float64 reference
of the reconstruction from the stored codes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from synthetic import delta_and_gram

import adamix
from adamix.methods import Settings, compress_with, decode
from adamix.methods.deltadct import CLASSES, PATCH, dct_matrix, patches, total_bits, unpatch
from adamix.methods.registry import budget_bits
from adamix.quant.pack import unpack


def test_the_dct_is_scipys_orthonormal_dct2():
    P = torch.randn(5, 16, 16, dtype=torch.float64)
    C = dct_matrix(16)
    assert torch.allclose(C @ C.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    ref = scipy.fft.dctn(P.numpy(), type=2, norm="ortho", axes=(1, 2))
    assert np.allclose((C @ P @ C.T).numpy(), ref, atol=1e-12)
    D = torch.randn(40, 37, dtype=torch.float64)
    assert torch.equal(unpatch(patches(D, 16), 40, 37, 16), D)


@pytest.mark.parametrize("alpha", [1 / 8, 1 / 16, 1 / 64, 1 / 128])
def test_deltadct_fills_the_budget_and_matches_a_float64_reference(alpha):
    D, H = delta_and_gram(m=200, n=150)
    enc = compress_with(D, H, Settings(method="deltadct", alpha=alpha))
    budget = budget_bits(200, 150, alpha)
    n_patches = 13 * 10
    widths = torch.tensor(CLASSES)[unpack(enc.tensors["classes"], 2, n_patches).long()]
    counts = {b: int((widths == b).sum()) for b in CLASSES}
    assert 8 * enc.nbytes == total_bits(n_patches, counts, PATCH) <= budget
    assert total_bits(n_patches, {4: counts[4], 2: counts[2] + 1}, PATCH) > budget or counts[0] == 0  # filled
    # widths follow the patches' norms: a wider patch never has a smaller norm than a narrower one
    norms = patches(D.double(), PATCH).reshape(n_patches, -1).norm(dim=1)
    for hi, lo in ((4, 2), (2, 0)):
        if counts[hi] and counts[lo]:
            assert float(norms[widths == hi].min()) >= float(norms[widths == lo].max())
    # float64 reference: dequantized coefficients from the stored codes, scipy's inverse DCT, cropped
    got = decode("deltadct", enc.shape, enc.meta, enc.tensors).double()
    grid = enc.tensors["params"].double().reshape(-1, 2)
    coef = np.zeros((n_patches, PATCH * PATCH))
    kept = torch.nonzero(widths > 0).flatten().tolist()
    pos = 0
    for b in (4, 2):
        idx = [i for i in kept if widths[i] == b]
        size = -(-len(idx) * PATCH * PATCH * b // 8)
        q = unpack(enc.tensors["codes"][pos:pos + size], b, len(idx) * PATCH * PATCH).reshape(len(idx), -1)
        pos += size
        for j, i in enumerate(idx):
            s, o = grid[kept.index(i)]
            coef[i] = float(o) + float(s) * q[j].double().numpy()
    rec = scipy.fft.idctn(coef.reshape(-1, PATCH, PATCH), type=2, norm="ortho", axes=(1, 2))
    ref = unpatch(torch.from_numpy(rec), 200, 150, PATCH)
    assert torch.allclose(got, ref, atol=1e-6 * float(ref.abs().max()) + 1e-9)
    assert enc.stats["error_measured"] < 1.0


def test_deltadct_through_the_pipeline(bert_pair, calib_file, tmp_path):
    base, ft = bert_pair
    m = adamix.compress(base, ft, tmp_path / "d", method="deltadct", ratio="1/8", calib=calib_file, samples=4,
                        seqlen=32, progress=False)
    assert m["sizes"]["alpha_achieved"] <= 1 / 8
    art = adamix.load(tmp_path / "d")
    entries = [n for n, e in art.entries.items() if e["kind"] == "deltadct"]
    assert entries and all(art.entries[n]["stats"]["error_measured"] < 1 for n in entries)


def test_deltadct_refuses_method_options():
    from adamix.compression.options import Options
    with pytest.raises(adamix.AdamixError) as e:
        Options(method="deltadct", max_rank=8).settings()
    assert str(e.value) == "--max-rank 8 applies to --method adamix / deltacome / lowrank only, not deltadct"

"""The peer methods (lowrank, bitdelta, deltacome, rtn, gptq): exact formats against float64
references, budgets, and the same artifact / merge path as adamix."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import adamix
from adamix.methods.svd_mixed import triplet_bits as triplet_cost
from adamix.io.artifact import Artifact
from adamix.cli import main as cli_main
from adamix.methods import compress_with, get, names
from adamix.methods.adamix import budget_bits
from adamix.methods import Settings, decode
from adamix.methods.deltacome import WIDTHS, schedule_widths
from adamix.methods.direct import plan
from adamix.methods.rows import stored_bits

pytestmark = pytest.mark.usefixtures("single_thread")


def spectrum_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A delta with a decaying spectrum plus noise, like a real fine-tune's."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = 1.0 / (1 + torch.arange(r, dtype=torch.float64)) ** 0.8
    return ((U * s) @ V.T + 0.002 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


def gram(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.5, n, dtype=torch.float64)
    return X.T @ X


def stored_bits_of(enc) -> int:
    return 8 * enc.nbytes


def test_lowrank_is_fp16_truncated_svd():
    m, n = 96, 80
    D = spectrum_delta(m, n)
    budget = budget_bits(m, n, 1 / 8)
    enc = compress_with(D, None, Settings(method="lowrank", alpha=1 / 8))
    k = int(budget // (16 * (m + n)))
    assert enc.kind == "lowrank" and enc.meta["rank"] == k == enc.tensors["U"].shape[1]
    assert stored_bits_of(enc) == 16 * k * (m + n) <= budget
    U, s, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    ref = (U[:, :k] * s[:k]) @ Vh[:k]
    Dhat = decode("lowrank", (m, n), enc.meta, enc.tensors).double()
    assert torch.allclose(Dhat, ref, atol=2e-3 * ref.abs().max().item())
    # error of the fp16 factors is the truncation error up to fp16 rounding
    trunc = float((s[k:] ** 2).sum().sqrt() / s.norm())
    assert enc.stats["error_measured"] == pytest.approx(trunc, rel=1e-2)


def test_bitdelta_sign_times_mean_abs():
    m, n = 40, 52
    D = spectrum_delta(m, n)
    enc = compress_with(D, None, Settings(method="bitdelta"))
    assert enc.tensors["signs"].numel() == math.ceil(m * n / 8) and enc.nbytes == math.ceil(m * n / 8) + 2
    Dhat = decode("bitdelta", (m, n), enc.meta, enc.tensors)
    scale = float(D.double().abs().mean().to(torch.float16))
    ref = torch.where(D >= 0, scale, -scale)
    assert torch.equal(Dhat, ref.float())


def test_deltacome_schedule():
    costs = {0: 0, 8: 80, 3: 30, 2: 20}
    # enough for the whole schedule: 2 x 8, 32 x 3, then 2 bits while the budget lasts
    w = schedule_widths(100, costs, 2 * 80 + 32 * 30 + 10 * 20 + 5)
    assert w == [8, 8] + [3] * 32 + [2] * 10 + [0] * 56
    # a budget that ends inside the 8-bit part falls back to narrower widths, then stops
    assert schedule_widths(6, costs, 80 + 30 + 20) == [8, 3, 2, 0, 0, 0]
    assert schedule_widths(3, costs, 10) == [0, 0, 0]


def test_deltacome_follows_schedule_and_skips_target_correction():
    m, n = 128, 96
    D, H = spectrum_delta(m, n), gram(n)
    settings = Settings(method="deltacome", alpha=1 / 8, group_size=32)
    enc = compress_with(D, H, settings)
    chosen = [b for b, c in enc.meta["widths"] for _ in range(c)]
    costs = {b: triplet_cost(m, n, b, 32) for b in WIDTHS}
    planned = [b for b in schedule_widths(min(m, n), costs, budget_bits(m, n, 1 / 8)) if b]
    # the packed size may drop the last few triplets, never change the schedule's order
    assert chosen == planned[:len(chosen)] and len(chosen) >= len(planned) - 2
    assert stored_bits_of(enc) <= budget_bits(m, n, 1 / 8)
    # adamix on the same delta: the ILP choice plus target correction must do at least as well
    ada = compress_with(D, H, dataclasses.replace(settings, method="adamix"))
    assert ada.stats["error_measured"] < enc.stats["error_measured"]
    # Delta-CoMe's SVD is the plain one, whatever adamix's default (the whitened SVD)
    plain = compress_with(D, H, dataclasses.replace(settings, whiten=False))
    assert settings.whiten and all(torch.equal(enc.tensors[k], plain.tensors[k]) for k in enc.tensors)


@pytest.mark.parametrize("alpha", [1 / 2, 1 / 8, 1 / 16, 1 / 64])
def test_direct_plan_fits(alpha):
    m, n = 200, 160
    budget = budget_bits(m, n, alpha)
    b, g, k = plan(m, n, budget)
    assert stored_bits(n, [[b, k]], g) <= budget
    if alpha >= 1 / 8:
        assert k == m and stored_bits(n, [[b + 1, m]], n) > budget  # widest width that fits
    else:
        assert b == 1 and 0 < k < m and stored_bits(n, [[1, k + 1]], n) > budget


def test_direct_rtn_and_gptq():
    m, n = 64, 96
    D, H = spectrum_delta(m, n), gram(n)
    rtn = compress_with(D, H, Settings(method="rtn", alpha=1 / 2))
    gq = compress_with(D, H, Settings(method="gptq", alpha=1 / 2))
    assert rtn.kind == gq.kind == "rows" and rtn.stats["bits"] == 7
    for enc in (rtn, gq):
        assert stored_bits_of(enc) <= budget_bits(m, n, 1 / 2)
        Dhat = decode("rows", (m, n), enc.meta, enc.tensors)
        # the measured error against an independent float64 reference on the decoded D^:
        # sqrt(tr(E H E^T) / tr(D H D^T)), E = D^ - D, with plain torch ops (not quant.linalg).
        # H is float64 here, so both sides are float64 sums of the same products: they agree to
        # ~n * 2^-53 relative; 1e-9 is a wide margin for summation order
        E = Dhat.double() - D.double()
        ref = math.sqrt(float(torch.trace(E @ H.double() @ E.T) / torch.trace(D.double() @ H.double() @ D.double().T)))
        assert enc.stats["error_measured"] == pytest.approx(ref, rel=1e-9)
    assert rtn.stats["error_measured"] < 0.05
    assert gq.stats["error_measured"] < rtn.stats["error_measured"]  # GPTQ uses H, RTN does not
    # below 1 bit per weight rows are dropped, the most energetic kept
    low = compress_with(D, H, Settings(method="gptq", alpha=1 / 32))
    assert 0 < low.stats["rows_kept"] < m and stored_bits_of(low) <= budget_bits(m, n, 1 / 32)


@pytest.mark.parametrize("method", names())
def test_every_method_through_the_artifact(method, bert_pair, calib_file, tmp_path):
    base, ft = bert_pair
    out = tmp_path / method
    manifest = adamix.compress(base, ft, out, method=method, ratio="1/16", calib=calib_file, samples=8,
                               seqlen=64, progress=False)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["method"] == method and on_disk["settings"]["method"] == method
    sizes = on_disk["sizes"]
    files = (out / "delta.safetensors").stat().st_size + (out / "manifest.json").stat().st_size
    assert files == sizes["total_bytes"]
    # the header and manifest take no more than the share each method tensor reserved for them
    from adamix.compression.plan import is_svd_shape, overhead_per_element, pair_tensors
    from adamix.io.checkpoint import Checkpoint
    from adamix.methods.kinds import stored_suffixes
    names, _ = pair_tensors(Checkpoint(base), Checkpoint(ft))
    reserved = overhead_per_element(Checkpoint(base), names, max(len(stored_suffixes(k)) for k in get(method).kinds))
    elements = sum(e["shape"][0] * e["shape"][1] for e in on_disk["tensors"].values()
                   if len(e["shape"]) == 2 and is_svd_shape(tuple(e["shape"])))
    assert 8 * (files - sum(e["bytes"] for e in on_disk["tensors"].values())) <= reserved * elements
    if method == "bitdelta":  # fixed size: 1 bit per weight and an fp16 scale (+ header, manifest)
        for e in manifest["tensors"].values():
            if e["kind"] == "bitdelta":
                rows, cols = e["shape"]
                assert e["bytes"] == math.ceil(rows * cols / 8) + 2
    else:
        assert sizes["alpha_achieved"] <= 1 / 16
    art = Artifact(out)
    expected_kind = get(method).kinds[0]  # the calibrated linears are stored in the method's own kind
    assert expected_kind in {e["kind"] for e in manifest["tensors"].values()}
    merged = tmp_path / f"{method}-merged"
    adamix.merge(base, out, merged, progress=False)
    from safetensors.torch import load_file
    b, m = load_file(str(base / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    for name in manifest["tensors"]:
        assert torch.equal(m[name], (b[name].float() + art.delta(name)).to(b[name].dtype))


def test_method_options_refused(bert_pair, tmp_path, capsys):
    base, ft = bert_pair
    cases = [
        (["--method", "bitdelta", "--ratio", "1/32"], "bitdelta stores 1 bit per weight"),
        (["--method", "lowrank", "--no-whiten"], "--no-whiten applies to --method adamix only"),
        (["--method", "gptq", "--budget-scope", "block"], "applies to --method adamix only"),
    ]
    for extra, message in cases:
        code = cli_main(["compress", str(base), str(ft), "-o", str(tmp_path / "x"), "--calib", "none", "-q", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_bitdelta_scale_distillation(llama_pair, calib_file, tmp_path):
    base, ft = llama_pair
    kw = dict(method="bitdelta", calib=calib_file, samples=8, seqlen=64, progress=False)
    plain = adamix.compress(base, ft, tmp_path / "plain", **kw)
    tuned = adamix.compress(base, ft, tmp_path / "tuned", distill_steps=40, **kw)
    d = tuned["settings"]["distill"]
    assert d["loss_after"] < d["loss_before"]
    a, b = Artifact(tmp_path / "plain"), Artifact(tmp_path / "tuned")
    changed = 0
    for name, e in plain["tensors"].items():
        if e["kind"] != "bitdelta":
            assert torch.equal(a.delta(name), b.delta(name))
            continue
        assert tuned["tensors"][name]["stats"] == {"scale_distilled": True}
        sa, sb = a.tensors(name)["scale"], b.tensors(name)["scale"]
        assert torch.equal(a.tensors(name)["signs"], b.tensors(name)["signs"])  # only the scales train
        changed += int(not torch.equal(sa, sb))
    assert changed > 0
    assert tuned["sizes"]["total_bytes"] - plain["sizes"]["total_bytes"] < 400  # same tensors; manifest grows


def test_shared_factors_and_analysis_give_identical_encodings():
    """The benchmark compresses one delta at many ratios from one SVD / error table: the result must be
    exactly what a standalone call produces."""
    from adamix.quant.linalg import svd
    from adamix.methods.adamix import analyse
    from adamix.methods.deltacome import deltacome_settings
    m, n = 96, 72
    D, H = spectrum_delta(m, n), gram(n)
    fac = svd(D)
    own = svd(D, H, Settings().whiten)  # adamix's own SVD (whitened by default), as peers.py computes it
    shared = {"adamix": analyse(D, H, Settings(alpha=1 / 8), factors=own, prune=True),  # as peers.py
              "deltacome": analyse(D, H, deltacome_settings(Settings()), factors=fac)}
    for method in ("adamix", "deltacome", "lowrank"):
        for alpha in (1 / 8, 1 / 32):
            settings = Settings(method=method, alpha=alpha)
            alone = compress_with(D, H, settings, 100.0)
            reused = compress_with(D, H, settings, 100.0, factors=fac, analysis=shared.get(method))
            assert alone.meta == reused.meta
            assert all(torch.equal(alone.tensors[k], reused.tensors[k]) for k in alone.tensors)
    with pytest.raises(ValueError, match="pruned"):  # a table pruned for 1/8 cannot serve 1/4
        compress_with(D, H, Settings(alpha=1 / 4), 100.0, factors=fac, analysis=shared["adamix"])

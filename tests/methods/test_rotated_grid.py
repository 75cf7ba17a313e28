"""adamix --grid normal: the seeded Hadamard rotation, the Gaussian (Lloyd-Max) grid, GPTQ on it, the
stored kind svd-rotated, and the whole pipeline with it (merge, runtime, PEFT export, model scope)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import integrate, stats

import adamix
from adamix import AdamixError
from adamix.methods import Settings
from adamix.methods.adamix import analyse, complete_joint, compress_matrix, stash, unstash
from adamix.methods.kinds import check_meta, decode, low_rank_factors, pair_gains
from adamix.methods.svd_rotated import expected_sizes, rotated_factors, stored_bits, triplet_bits
from adamix.quant import hadamard, normal
from adamix.quant.gptq import gptq_columns, gptq_rows
from adamix.quant.linalg import output_error

from synthetic import delta_and_gram


def dense_rotation(n: int, seed: int) -> torch.Tensor:
    """R (n, n) float64 built independently: scipy's Sylvester Hadamard blocks times the signs."""
    k = n & -n
    B = scipy.linalg.block_diag(*[scipy.linalg.hadamard(k) / math.sqrt(k)] * (n // k))
    return torch.from_numpy(B) @ torch.diag(hadamard.signs(n, seed))


@pytest.mark.parametrize("n", [1, 6, 64, 96, 384, 176])
def test_rotation_is_the_dense_orthogonal_matrix(n):
    R = dense_rotation(n, 5)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard.rotate(x, 5), x @ R.T, atol=1e-12)
    assert torch.allclose(hadamard.unrotate(hadamard.rotate(x, 5), 5), x, atol=1e-12)
    D = torch.randn(7, n, dtype=torch.float64)
    R7 = dense_rotation(7, 5)
    assert torch.allclose(hadamard.rotate_matrix(D, 5), R7 @ D @ R.T, atol=1e-12)


def test_signs_are_a_pure_function_of_seed_and_length():
    # what a reader on another machine derives from the manifest's seed: pinned, the format depends on it
    assert hadamard.signs(16, 0).tolist() == hadamard.signs(16, 0).tolist()
    assert hadamard.signs(16, 0).tolist() != hadamard.signs(16, 1).tolist()
    s = hadamard.signs(4096, 0)
    assert set(s.tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.06
    assert "".join("+" if v > 0 else "-" for v in hadamard.signs(16, 0).tolist()) == PINNED_SIGNS


PINNED_SIGNS = "---++++-+++-+--+"  # BLAKE2b of ("adamix-hadamard", seed 0, n 16, block 0), little-endian bits


# Max (1960), Table I: the mean squared error of the optimal 2-, 4-, 8- and 16-level quantizers of N(0, 1)
MAX_1960_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_levels_are_lloyd_max_for_the_standard_normal(bits):
    c = normal.levels(bits).double().numpy()
    assert np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1])
    t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    # the centroid condition, by numerical integration (scipy.stats), to fp16's resolution
    for i in range(len(c)):
        mass = stats.norm.cdf(t[i + 1]) - stats.norm.cdf(t[i])
        mean = integrate.quad(lambda x: x * stats.norm.pdf(x), t[i], t[i + 1])[0] / mass
        assert mean == pytest.approx(c[i], abs=2e-3 * max(1.0, abs(c[i])))
    mse = sum(integrate.quad(lambda x: (x - c[i]) ** 2 * stats.norm.pdf(x), t[i], t[i + 1])[0] for i in range(len(c)))
    assert mse == pytest.approx(MAX_1960_MSE[bits], rel=2e-3)


def test_rtn_on_the_normal_grid_beats_a_uniform_grid_per_vector_on_gaussian_rows():
    from adamix.quant.grid import rtn
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(0))
    for b in (2, 3, 4):
        bits = torch.full((200,), b)
        r = normal.rtn(x, bits)
        assert torch.equal(r["deq"], normal.dequantize(r["codes"], r["scale"], bits))
        assert torch.equal(r["scale"], r["scale"].half().float())
        e_normal = float(((r["deq"] - x) ** 2).mean())
        e_uniform = float(((rtn(x, bits, 512)["deq"] - x) ** 2).mean())
        assert e_normal < e_uniform
        assert e_normal < 1.05 * MAX_1960_MSE[b]


def test_gptq_on_the_normal_grid_reports_its_error_and_beats_rtn():
    D, H = delta_and_gram(seed=2)
    W = D[:24].float()
    bits = torch.tensor([2, 3, 4, 8] * 6)
    q = gptq_rows(W, H.float(), bits, 128, with_error=True, grid="normal")
    assert set(q) == {"codes", "scale", "deq", "error"}
    assert torch.equal(q["deq"], normal.dequantize(q["codes"], q["scale"], bits))
    E = q["deq"].double() - W.double()
    direct = ((E @ H.double()) * E).sum(1)
    assert torch.allclose(q["error"], direct, rtol=1e-4)
    R = normal.rtn(W, bits)["deq"].double() - W.double()
    assert float(direct.sum()) < float(((R @ H.double()) * R).sum())
    X = torch.randn(24, 300, generator=torch.Generator().manual_seed(1))
    c = gptq_columns(W.T.contiguous(), X @ X.T, bits, 128, grid="normal")  # column j of W^T (80, 24) at bits[j]
    assert torch.equal(c["deq"], normal.dequantize(c["codes"], c["scale"], bits).T)


@pytest.mark.parametrize("calibrated", [True, False])
def test_compress_matrix_stores_what_it_measures_within_the_budget(calibrated):
    D, H = delta_and_gram(seed=4)
    H = H if calibrated else None
    s = Settings(alpha=1 / 8, grid="normal", seed=3)
    enc = compress_matrix(D, H, s)
    m, n = D.shape
    assert enc.kind == "svd-rotated" and enc.meta["seed"] == 3
    nbytes, nparams = expected_sizes(enc.shape, enc.meta)
    assert enc.tensors["codes"].numel() == nbytes and enc.tensors["params"].numel() == nparams
    assert stored_bits(enc.shape, enc.meta) == 8 * enc.nbytes <= 16 * m * n / 8
    # decode = R_m^T U'^ V'^ R_n with dense rotations built here, in float64
    Ur, Vr = rotated_factors(enc.shape, enc.meta, enc.tensors)
    ref = dense_rotation(m, 3).T @ Ur.double() @ Vr.double() @ dense_rotation(n, 3)
    Dhat = decode(enc.kind, enc.shape, enc.meta, enc.tensors)
    assert torch.allclose(Dhat.double(), ref, atol=1e-5 * float(ref.abs().max()))
    U, V = low_rank_factors(enc.kind, enc.shape, enc.meta, enc.tensors)
    assert torch.allclose(U @ V, Dhat)
    Hd = None if H is None else H.double()
    E, energy = Dhat.double() - D.double(), output_error(None, D.double(), Hd)
    measured = float((E * E).sum() if Hd is None else ((E @ Hd) * E).sum()) / energy
    assert enc.stats["error_measured"] == pytest.approx(math.sqrt(measured), rel=1e-3)
    # the gains sum to what the kept widths remove: E(0) - predicted, relative
    g = pair_gains(enc.kind, enc.shape, enc.meta, enc.tensors)
    assert len(g) == enc.stats["rank_kept"]
    assert float(g.double().sum()) == pytest.approx(1 - enc.stats["error_predicted"] ** 2, rel=2e-3, abs=1e-4)


def test_the_rotated_grid_costs_what_the_allocation_counts():
    m, n = 48, 80
    assert triplet_bits(m, n, 0) == 0
    assert triplet_bits(m, n, 3) == 3 * (m + n) + 2 * 16 + 16
    a = analyse(*delta_and_gram(seed=1), Settings(grid="normal"))
    assert a.seed == 0 and list(a.costs) == [triplet_bits(*a.D.shape, b) for b in Settings().widths]


def test_the_two_pass_stash_rotates_again():
    D, H = delta_and_gram(seed=6)
    s = Settings(alpha=1 / 8, grid="normal", seed=9)
    a = analyse(D, H, s)
    choice = np.array([1 if i < 5 else 0 for i in range(len(a.s))])
    direct = complete_joint(a, choice, s)
    again = complete_joint(unstash(stash(a), D, H), choice, s)
    assert direct.meta == again.meta
    assert all(torch.equal(direct.tensors[k], again.tensors[k]) for k in direct.tensors)


@pytest.mark.parametrize("meta", [
    {"widths": [[2, 1]], "grid": "uniform", "rotation": "hadamard", "seed": 0, "gains": True},
    {"widths": [[2, 1]], "grid": "normal", "rotation": "none", "seed": 0, "gains": True},
    {"widths": [[2, 1]], "grid": "normal", "rotation": "hadamard", "seed": 1.5, "gains": True},
    {"widths": [[9, 1]], "grid": "normal", "rotation": "hadamard", "seed": 0, "gains": True},
    {"widths": [[2, 1]], "grid": "normal", "rotation": "hadamard", "gains": True},
])
def test_malformed_metadata_is_refused_in_one_line(meta):
    with pytest.raises(AdamixError, match="malformed svd-rotated metadata"):
        check_meta("svd-rotated", (8, 8), meta)


@pytest.fixture(scope="module")
def rotated_artifact(llama_pair, calib_file, tmp_path_factory):
    base, ft = llama_pair
    out = tmp_path_factory.mktemp("rotated") / "d"
    adamix.compress(base, ft, out, ratio="1/8", calib=calib_file, samples=8, seqlen=64, grid="normal", progress=False)
    return base, ft, out


def test_pipeline_writes_rotated_entries_within_the_ratio(rotated_artifact, llama_pair, calib_file, tmp_path):
    base, ft, out = rotated_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {e["kind"] for e in manifest["tensors"].values()}
    assert kinds == {"svd-rotated", "raw"}
    assert manifest["settings"]["grid"] == "normal"
    sizes = manifest["sizes"]
    files = (out / "delta.safetensors").stat().st_size + (out / "manifest.json").stat().st_size
    assert files == sizes["total_bytes"] <= sizes["fp16_bytes_method"] / 8 + sizes["raw_bytes"]
    # the same run with the uniform grid: both compress, the rotated one is a different artifact
    adamix.compress(base, ft, tmp_path / "u", ratio="1/8", calib=calib_file, samples=8, seqlen=64, progress=False)
    uniform = json.loads((tmp_path / "u" / "manifest.json").read_text())
    assert {e["kind"] for e in uniform["tensors"].values()} == {"svd-mixed", "raw"}


def test_merge_runtime_and_peft_export_reproduce_the_rotated_delta(rotated_artifact, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from adamix.serve import MultiTenantModel
    base, _, out = rotated_artifact
    art = adamix.load(out)
    adamix.merge(base, out, tmp_path / "merged", progress=False)
    b, merged = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name in art.entries:
        assert torch.equal(merged[name], (b[name].float() + art.delta(name)).to(b[name].dtype))
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    for factors in ("auto", "float", "packed"):
        mt = MultiTenantModel(base, factors=factors)
        mt.attach("r", out)
        with torch.no_grad():
            got = mt(input_ids=ids, tenants="r").logits
        assert float((got - ref).abs().max() / ref.abs().max()) < 2e-6, factors
    pytest.importorskip("peft")
    from peft import PeftModel
    from adamix.export.peft import export_peft
    export_peft(base, out, tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-6


def test_model_scope_with_the_rotated_grid(llama_pair, calib_file, tmp_path):
    base, ft = llama_pair
    adamix.compress(base, ft, tmp_path / "d", ratio="1/8", calib=calib_file, samples=8, seqlen=64, grid="normal",
                    budget_scope="model", progress=False)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert {e["kind"] for e in manifest["tensors"].values()} == {"svd-rotated", "raw"}
    sizes = manifest["sizes"]
    assert sizes["total_bytes"] <= sizes["fp16_bytes_method"] / 8 + sizes["raw_bytes"]


@pytest.mark.parametrize("options, message", [
    ({"grid": "hexagonal"}, "--grid must be one of uniform, normal"),
    ({"grid": "normal", "method": "deltacome"}, "--grid normal applies to --method adamix only"),
    ({"grid": "normal", "group_size": 64}, "--group-size applies to --grid uniform"),
])
def test_bad_grid_options_are_refused_in_one_line(llama_pair, tmp_path, options, message):
    base, ft = llama_pair
    with pytest.raises(AdamixError, match=message):
        adamix.compress(base, ft, tmp_path / "x", calib=None, progress=False, **options)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("alpha", [1e-4, 1 / 512])
def test_tiny_budgets_hold_and_decode(alpha):
    D, H = delta_and_gram(m=200, n=150)
    enc = compress_matrix(D, H, Settings(alpha=alpha, grid="normal"))
    assert 8 * enc.nbytes <= alpha * 16 * 200 * 150
    out = decode(enc.kind, enc.shape, enc.meta, enc.tensors)
    assert out.shape == (200, 150) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("suffix", ["codes", "params"])
def test_truncated_tensors_are_one_adamix_error(suffix):
    D, H = delta_and_gram(m=64, n=48)
    enc = compress_matrix(D, H, Settings(alpha=1 / 8, grid="normal"))
    cut = {**enc.tensors, suffix: enc.tensors[suffix][:-1]}
    with pytest.raises(AdamixError, match="the manifest implies"):
        decode(enc.kind, enc.shape, enc.meta, cut)

"""adamix export-peft: the adapter loaded by the `peft` library reproduces the merged fine-tune."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tenants import model_class, two_artifacts

import adamix
from adamix.cli import main
from adamix.export.peft import export_peft

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module", params=["bert", "llama", "gpt2"])
def setup(request, calib_file, tmp_path_factory):
    """base and two artifacts: a (calibrated: low-rank matrices, raw 1-D deltas) and b (data-free,
    with a row-sparse token embedding: kind rows), and the merged models."""
    arch = request.param
    work = tmp_path_factory.mktemp(f"peft-{arch}")
    base = two_artifacts(arch, request, calib_file, work)
    merged = {}
    for t in ("a", "b"):
        adamix.merge(base, work / t, work / f"merged-{t}", progress=False)
        merged[t] = model_class(base).from_pretrained(work / f"merged-{t}").eval()
    return arch, base, work, merged


def run(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def with_adapter(base, adapter):
    from peft import PeftModel
    return PeftModel.from_pretrained(model_class(base).from_pretrained(base), adapter).eval()


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


IDS = torch.randint(4, 60, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_peft_adapter_equals_merged_model(setup, tenant, tmp_path):
    arch, base, work, merged = setup
    summary = export_peft(base, work / tenant, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert all(config["alpha_pattern"][m] == k for m, k in config["rank_pattern"].items())  # scaling 1
    assert json.loads((tmp_path / "adapter" / "adamix_export.json").read_text())["lora"] == summary["lora"]
    assert summary["lora"] and summary["not_lora"]  # both parts are exercised
    kinds = {e["kind"] for e in adamix.load(work / tenant).entries.values()}
    if tenant == "b":
        assert "rows" in kinds
        if arch != "gpt2":  # the row-sparse embedding is kept as its new rows; the LM head follows if tied
            assert summary["trainable_tokens"]
    got = run(with_adapter(base, tmp_path / "adapter"), IDS)
    assert rel(got, run(merged[tenant], IDS)) < 2e-6


def test_lora_only_adapter_is_the_low_rank_part(setup, tmp_path):
    """--lora-only: lora_A / lora_B only; the model equals base + the deltas that became LoRA."""
    arch, base, work, merged = setup
    summary = export_peft(base, work / "b", tmp_path / "adapter", lora_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["trainable_token_indices"] is None
    assert config["lora_bias"] is False
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k for k in f.keys())
    art = adamix.load(work / "b")
    assert set(summary["dropped"]) == set(summary["not_lora"]) and summary["dropped"]
    ref = model_class(base).from_pretrained(base).eval()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name in art.entries:
            if name not in summary["dropped"]:
                params[name].add_(art.delta(name))
    assert rel(run(with_adapter(base, tmp_path / "adapter"), IDS), run(ref, IDS)) < 2e-6


def test_uniform_rank_pads_with_zeros(setup, tmp_path):
    arch, base, work, merged = setup
    summary = export_peft(base, work / "a", tmp_path / "adapter", uniform_rank=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and len(set(summary["lora"].values())) > 1
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith("lora_A.weight"):
                assert f.get_slice(k).get_shape()[0] == config["r"]
    assert rel(run(with_adapter(base, tmp_path / "adapter"), IDS), run(merged["a"], IDS)) < 2e-6


def test_half_precision_adapter(setup, tmp_path):
    """--dtype float16: half the bytes of the LoRA tensors, factors rounded to fp16 (close, not exact)."""
    arch, base, work, merged = setup
    full = export_peft(base, work / "a", tmp_path / "f32")
    half = export_peft(base, work / "a", tmp_path / "f16", dtype="float16")
    def lora_bytes(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k).nbytes for k in f.keys() if ".lora_" in k}, \
                {f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k}
    (b16, d16), (b32, _) = lora_bytes(tmp_path / "f16"), lora_bytes(tmp_path / "f32")
    assert d16 == {"F16"} and b16.keys() == b32.keys() and all(2 * b16[k] == b32[k] for k in b16)
    assert half["bytes"] < full["bytes"]
    assert rel(run(with_adapter(base, tmp_path / "f16"), IDS), run(merged["a"], IDS)) < 2e-3


@pytest.mark.parametrize("setup", ["llama"], indirect=True)
def test_cli_export_peft(setup, tmp_path, capsys):
    arch, base, work, _ = setup
    assert main(["export-peft", str(base), str(work / "a"), "-o", str(tmp_path / "ad")]) == 0
    assert "LoRA modules" in capsys.readouterr().out
    assert main(["export-peft", str(base), str(work / "a"), "-o", str(tmp_path / "ad")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-peft", str(base), str(work / "a"), "-o", str(tmp_path / "ad2"), "--lora-only",
                 "--uniform-rank", "--dtype", "bfloat16"]) == 0
    assert "dropped (--lora-only)" in capsys.readouterr().out
    # a model of the same shapes that is not the base (the second fine-tune) is refused, nothing written
    assert main(["export-peft", str(work / "ft-b"), str(work / "a"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adamix: error: wrong base") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# --- adapters sized for vLLM ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def capped(llama_pair, calib_file, tmp_path_factory):
    """A llama delta compressed with a rank cap, its merged model, and the cap."""
    work = tmp_path_factory.mktemp("capped")
    adamix.compress(*llama_pair, work / "d", ratio="1/4", max_rank=3, calib=calib_file, samples=4, seqlen=32,
                    progress=False)
    adamix.merge(llama_pair[0], work / "d", work / "m", progress=False)
    return llama_pair[0], work, model_class(llama_pair[0]).from_pretrained(work / "m").eval(), 3


def test_capped_export_loads_with_peft_and_equals_merge(capped, tmp_path):
    base, work, merged, cap = capped
    summary = export_peft(base, work / "d", tmp_path / "ad")
    assert 0 < summary["rank_max"] <= cap
    assert rel(run(with_adapter(base, tmp_path / "ad"), IDS), run(merged, IDS)) <= 1e-3


def test_lora_only_uniform_rank_is_a_rank_vllm_accepts(capped, tmp_path, capsys):
    from adamix.export.vllm import VLLM_RANKS
    base, work, merged, cap = capped
    assert main(["export-peft", str(base), str(work / "d"), "-o", str(tmp_path / "ad"), "--lora-only",
                 "--uniform-rank"]) == 0
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 8 == min(r for r in VLLM_RANKS if r >= cap)  # rank 3 pads to vLLM's 8
    assert config["rank_pattern"] == {} and config["lora_alpha"] == config["r"]
    assert "padded to rank 8" in capsys.readouterr().out
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A.weight")} == {8}


def test_uniform_rank_above_vllms_largest_is_refused(capped, tmp_path, monkeypatch):
    import adamix.export.vllm as vllm
    base, work, merged, cap = capped
    monkeypatch.setattr(vllm, "VLLM_RANKS", (1, 2))  # as if the delta's rank were above 512
    monkeypatch.setattr("adamix.export.peft.slot_rank", lambda r: next((k for k in (1, 2) if k >= r), None))
    monkeypatch.setattr("adamix.export.peft.VLLM_RANKS", (1, 2))
    with pytest.raises(adamix.AdamixError) as e:
        export_peft(base, work / "d", tmp_path / "ad", uniform_rank=True)
    assert str(e.value) == ("--uniform-rank pads to a rank vLLM accepts (1, 2), but the largest rank is 3: "
                            "compress with --max-rank 2 or lower")
    assert not (tmp_path / "ad").exists()


def test_the_export_dtype_follows_the_base():
    from adamix.export.vllm import export_dtype, slot_bytes, slot_rank
    assert export_dtype(["BF16", "BF16", "F32"]) == "bfloat16" and export_dtype(["F32"]) == "float32"
    assert export_dtype(["F16"]) == "float16" and export_dtype([]) == "float32" and export_dtype(["F64"]) == "float32"
    assert [slot_rank(k) for k in (1, 2, 138, 320, 321, 513)] == [1, 8, 256, 320, 512, None]
    # a 4096 x 4096 and a 11008 x 4096 module at rank 256 in bfloat16
    assert slot_bytes([(4096, 4096), (11008, 4096)], 256, "bfloat16") == 256 * (8192 + 15104) * 2


def test_inspect_shows_ranks_and_the_vllm_slot(capped, capsys):
    base, work, merged, cap = capped
    assert main(["inspect", str(work / "d")]) == 0
    out = capsys.readouterr().out
    art = adamix.load(work / "d")
    shapes = [e["shape"] for e in art.entries.values() if e["kind"] == "svd-mixed"]
    top = max(sum(c for _, c in e["meta"]["widths"]) for e in art.entries.values() if e["kind"] == "svd-mixed")
    size = 8 * sum(m + n for m, n in shapes) * 4  # vLLM's rank 8 holds rank <= 3; float32 base
    from adamix.eval.report import human_bytes
    assert f"largest rank {top} -> --max-lora-rank 8" in " ".join(out.split())
    assert f"takes {human_bytes(size)} of GPU memory in float32" in " ".join(out.split())


# --- a rank cap at export time ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def uncapped(llama_pair, calib_file, tmp_path_factory):
    """A llama delta compressed without a cap (ranks above 3)."""
    work = tmp_path_factory.mktemp("uncapped")
    adamix.compress(*llama_pair, work / "d", ratio="1/4", calib=calib_file, samples=4, seqlen=32, progress=False)
    return llama_pair[0], work


def truncated_reference(base, delta, cap):
    """The base model plus every low-rank delta cut to the `cap` pairs of largest stored gain, computed
    here from the artifact's factors and gains (float32), the other deltas added whole."""
    from adamix.methods.kinds import low_rank_factors, pair_gains
    art = adamix.load(delta)
    model = model_class(base).from_pretrained(base).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, e in art.entries.items():
            f = low_rank_factors(e["kind"], tuple(e["shape"]), e["meta"], art.tensors(name))
            if f is None:
                params[name] += art.delta(name).to(params[name].dtype)
                continue
            U, V = f
            g = pair_gains(e["kind"], tuple(e["shape"]), e["meta"], art.tensors(name))
            keep = sorted(sorted(range(len(g)), key=lambda i: (-float(g[i]), i))[:cap])
            params[name] += (U[:, keep] @ V[keep]).to(params[name].dtype)
    return model


def test_export_time_cap_keeps_the_most_valuable_pairs(uncapped, tmp_path, capsys):
    base, work = uncapped
    art = adamix.load(work / "d")
    ranks = {n: sum(c for _, c in e["meta"]["widths"]) for n, e in art.entries.items() if e["kind"] == "svd-mixed"}
    cap = 3
    assert max(ranks.values()) > cap
    assert main(["export-peft", str(base), str(work / "d"), "-o", str(tmp_path / "ad"), "--max-rank", str(cap),
                 "--dtype", "float32"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    summary = json.loads((tmp_path / "ad" / "adamix_export.json").read_text())
    assert summary["rank_max"] <= cap and summary["max_rank"] == cap
    cut = summary["capped"]["tensors"]
    assert set(cut) == {n for n, k in ranks.items() if k > cap}
    for name, c in cut.items():
        stats = art.entries[name]["stats"]
        assert c["rank"] == ranks[name] and c["kept"] == cap and c["gain_dropped"] > 0
        assert c["error_after"] == pytest.approx((stats["error_predicted"] ** 2 + c["gain_dropped"]) ** 0.5)
    pooled = summary["capped"]["pooled"]
    assert pooled["error_after"] > pooled["error_predicted"] > 0
    assert f"cut {len(cut)} tensors to their {cap} most valuable pairs" in out
    assert f"from {pooled['error_predicted']:.4f} to {pooled['error_after']:.4f}" in out
    assert f"compress --max-rank {cap} does better" in out
    reference = truncated_reference(base, work / "d", cap)
    assert rel(run(with_adapter(base, tmp_path / "ad"), IDS), run(reference, IDS)) <= 1e-3


def test_export_cap_above_every_rank_changes_nothing(uncapped, tmp_path, capsys):
    base, work = uncapped
    plain = export_peft(base, work / "d", tmp_path / "plain")
    big = export_peft(base, work / "d", tmp_path / "big", max_rank=10_000)
    assert big["capped"]["tensors"] == {} and big["lora"] == plain["lora"]
    assert (tmp_path / "big" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--max-rank", "0"], "--max-rank must be a positive integer, got 0"),
    (["--max-rank", "3", "--uniform-rank"],
     "--uniform-rank pads rank 3 to 8, above --max-rank 3: use a rank vLLM accepts as the cap (1 or 8)"),
])
def test_bad_export_caps_are_refused(uncapped, tmp_path, capsys, args, message):
    base, work = uncapped
    assert main(["export-peft", str(base), str(work / "d"), "-o", str(tmp_path / "ad"), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"adamix: error: {message}\n"
    assert not (tmp_path / "ad").exists()


def test_an_artifact_without_gains_is_refused_in_one_line(uncapped, tmp_path, monkeypatch):
    base, work = uncapped
    monkeypatch.setattr("adamix.export.peft.pair_gains", lambda *a: None)  # as an artifact written before gains
    with pytest.raises(adamix.AdamixError, match=r"records no gains to choose 3 of its pairs by: compress with "
                                                 r"--max-rank 3 instead"):
        export_peft(base, work / "d", tmp_path / "ad", max_rank=3)
    assert not (tmp_path / "ad").exists()

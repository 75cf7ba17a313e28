"""adamix.MultiTenantModel: one base, many attached deltas, per-row tenants in one batch (synthetic pairs)."""

from __future__ import annotations

import pytest
import torch
from tenants import model_class, two_artifacts

import adamix
from adamix import AdamixError
from adamix.serve import BASE, MultiTenantModel
from adamix.serve.deltas import RowDelta
from adamix.serve.modules import TenantParams
from adamix.serve.routing import Router

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["bert", "llama", "gpt2"])
def setup(request, calib_file, tmp_path_factory):
    """base, two artifacts (a: calibrated, all low-rank; b: data-free, row-sparse embedding), their
    merged models, and a runtime with both attached."""
    arch = request.param
    work = tmp_path_factory.mktemp(f"rt-{arch}")
    base = two_artifacts(arch, request, calib_file, work)
    cls = model_class(base)
    merged = {}
    for t in ("a", "b"):
        adamix.merge(base, work / t, work / f"merged-{t}", progress=False)
        merged[t] = cls.from_pretrained(work / f"merged-{t}").eval()
    merged[BASE] = cls.from_pretrained(base).eval()
    mt = MultiTenantModel(base, factors="codes")
    mt.attach("a", work / "a")
    mt.attach("b", work / "b")
    return arch, base, work, mt, merged


@pytest.fixture(scope="module")
def float_mt(setup):
    """The same two tenants with their factors de-quantized once (factors="float")."""
    mt = MultiTenantModel(setup[1], factors="float")
    mt.attach("a", setup[2] / "a")
    mt.attach("b", setup[2] / "b")
    return mt


def output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def ids_batch(rows: int, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 60, (rows, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_artifacts_hold_the_kinds_under_test(setup, float_mt):
    arch, base, work, mt, _ = setup
    kinds_b = {e["kind"] for e in adamix.load(work / "b").entries.values()}
    assert "rows" in kinds_b and "svd-mixed" in kinds_b and "raw" in kinds_b
    held = mt.tenants["b"].held_as
    assert "RowDelta" in held.values() and "LowBitDelta" in held.values() and "LowRankDelta" not in held.values()
    assert "LowRankDelta" in float_mt.tenants["b"].held_as.values()
    if arch == "gpt2":  # the tied wte / lm_head: one delta, applied by both modules
        assert isinstance(mt.model.lm_head.deltas["b"][0], RowDelta)
        assert mt.model.lm_head.deltas["b"][0] is mt.model.transformer.wte.deltas["b"]


def test_each_tenant_equals_its_merged_model(setup, float_mt):
    _, _, _, mt, merged = setup
    ids = ids_batch(3)
    for t in ("a", "b", BASE):
        with torch.no_grad():
            ref = output(merged[t](input_ids=ids))
        for model in (mt, float_mt):
            got = output(model(input_ids=ids, tenants=t))
            assert rel(got, ref) < 2e-6, (t, model.factors)


@pytest.mark.parametrize("mode", ["codes", "float"])
def test_mixed_batch_rows_equal_each_tenant_alone(setup, float_mt, mode):
    _, _, _, mt, merged = setup
    mt = mt if mode == "codes" else float_mt
    ids = ids_batch(6, seed=1)
    tenants = ["a", BASE, "b", "a", "b", BASE]  # not grouped: the index_select / index_add path
    got = output(mt(input_ids=ids, tenants=tenants))
    with torch.no_grad():
        plain = output(merged[BASE](input_ids=ids))
    for i, t in enumerate(tenants):
        with torch.no_grad():
            alone = output(merged[t](input_ids=ids[i:i + 1]))[0]
        assert rel(got[i], alone) < 2e-6, (i, t)
        if t == BASE:  # base rows take the base's own path: bit-for-bit the base on the same batch
            assert torch.equal(got[i], plain[i])
    # grouped rows (contiguous slices) give the same answer as the scattered ones
    order = [0, 3, 2, 4, 1, 5]
    grouped = output(mt(input_ids=ids[order], tenants=[tenants[i] for i in order]))
    assert rel(grouped, got[order]) < 1e-6
    # tenants really differ from one another and from the base
    assert rel(got[0], got[2]) > 1e-3 and rel(got[0], plain[0]) > 1e-3


def rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all outputs, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_float64_reference(setup):
    """Runtime and merge are both float32 evaluations of base + D^, whose float64 evaluation is the
    reference; each is off by float32 rounding only, and the runtime by no more than float32
    evaluation of a network costs anyway (it rounds differently: neither is always the closer).

    The float32 noise floor is measured here, not assumed: the base model run in float32 against
    itself in float64 (plain transformers, no adamix code), and the merged model (whose weights are
    exactly the reference's rounded to float32: b + D^ of two float32 numbers rounds once). The
    comparison is in RMS over all 4 x 16 x width outputs: thousands of roundings average out, so two
    float32 evaluations of the same network agree in RMS error to within ~10% (measured over 60
    inputs, 3 architectures: runtime / floor 0.95-1.14, merge / base 0.98-1.23), where the max-abs
    error of a single output fluctuates by 2x. The runtime does the same large products as the merged
    model plus a rank-k product and per-tenant norm terms whose rounding is relative to the delta's
    size (5% of the weights'), so 1.5 x the floor bounds it with margin."""
    arch, base, work, _, merged = setup
    art = adamix.load(work / "a")
    cls = model_class(base)
    ref_model = cls.from_pretrained(base, dtype=torch.float64).eval()
    base64 = cls.from_pretrained(base, dtype=torch.float64).eval()
    params = dict(ref_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in art.entries:
            params[name].add_(art.delta(name).double())
    mt64 = MultiTenantModel(base, dtype=torch.float64)
    mt64.attach("a", art)
    ids = ids_batch(4, length=16, seed=2)
    with torch.no_grad():
        ref = output(ref_model(input_ids=ids))
        merged32 = output(merged["a"](input_ids=ids))
        floor = rms_rel(output(merged[BASE](input_ids=ids)), output(base64(input_ids=ids)))
    assert rel(output(mt64(input_ids=ids, tenants="a")), ref) < 1e-6  # float64 runtime: factor rounding only
    setup[3].router.set(None)
    runtime32 = output(setup[3](input_ids=ids, tenants="a"))
    err_merge, err_runtime = rel(merged32, ref), rel(runtime32, ref)
    # the floor is float32-sized (u = 2^-24 = 6e-8; measured 1.1e-7 to 4e-7 on these 2-layer models),
    # so the relative bounds below are about rounding, not about a wrong delta
    assert 0 < floor < 2e-6
    assert err_runtime < 1e-5 and err_runtime < 3 * err_merge + 1e-7
    assert rms_rel(merged32, ref) < 1.5 * floor
    assert rms_rel(runtime32, ref) < 1.5 * max(floor, rms_rel(merged32, ref))


@pytest.mark.parametrize("setup", ["llama", "gpt2"], indirect=True)  # the causal LMs
def test_generate_mixed_tenants_equals_merged_greedy(setup, float_mt):
    arch, _, _, mt, merged = setup
    ids = ids_batch(4, length=5, seed=3)
    tenants = ["b", "a", BASE, "a"]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = mt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), tenants=tenants, **kw)
    got_float = float_mt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), tenants=tenants, **kw)
    for i, t in enumerate(tenants):
        with torch.no_grad():
            alone = merged[t].generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)
        assert torch.equal(got[i], alone[0]) and torch.equal(got_float[i], alone[0]), (i, t)
    # rows expanded by generate (beam search, two sequences per prompt) keep their tenant
    beams = mt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), tenants=tenants, num_beams=2,
                        num_return_sequences=2, **kw)
    assert beams.shape[0] == 8
    for i, t in enumerate(tenants):
        with torch.no_grad():
            alone = merged[t].generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]),
                                       num_beams=2, num_return_sequences=2, **kw)
        assert torch.equal(beams[2 * i:2 * i + 2], alone), (i, t)


def codes_bytes(e: dict, conv1d: bool) -> int:
    """Bytes a LowBitDelta holds for svd-mixed entry e (adamix.serve.kernels.lowbit): float32 grids on both sides;
    output side by rows: 32 ceil(m / 32) bytes per 8-bit code row, 32 ceil(m / 64) per narrower one;
    input side by columns: the 8-bit rows the same, the k4 narrower rows as n rows of 32 ceil(k4 / 64).
    The input side is the weight's second dimension, its first for GPT-2's Conv1D (in, out)."""
    shape, meta = e["shape"], e["meta"]
    n_in, m_out = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
    k8 = sum(c for b, c in meta["widths"] if b > 4)
    k = sum(c for _, c in meta["widths"])
    k4 = k - k8

    def groups(length):
        return -(-length // min(meta["group_size"], length))

    rows = k8 * 32 * -(-m_out // 32) + k4 * 32 * -(-m_out // 64)
    cols = k8 * 32 * -(-n_in // 32) + n_in * 32 * -(-k4 // 64)
    return rows + cols + 2 * 4 * k * (groups(m_out) + groups(n_in))


def is_conv1d_weight(name: str) -> bool:
    return ".attn.c_" in name or ".mlp.c_" in name  # GPT-2's Conv1D layers


def predicted_bytes(art, mode: str = "codes") -> tuple[int, int]:
    """(bytes a tenant holds, bytes of a dense float32 copy of the tensors it changes), from the
    manifest: factors as codes (codes_bytes), or float32 k (m + n) ("float"), or the stored bytes
    ("packed"); kept rows r (n + 2) (an int64 index and float32 values); every other tensor dense
    in float32."""
    held = dense = 0
    for name, e in art.entries.items():
        shape = e["shape"]
        numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
        dense += 4 * numel
        count = sum(c for _, c in e.get("meta", {}).get("widths", []))
        if e["kind"] == "svd-mixed":
            held += {"packed": e["bytes"], "float": 4 * count * (shape[0] + shape[1]),
                     "codes": codes_bytes(e, is_conv1d_weight(name))}[mode]
        elif e["kind"] == "rows":
            held += count * (8 + 4 * shape[1])
        else:
            held += 4 * numel
    return held, dense


def test_memory_per_tenant(setup, float_mt):
    """Bytes held are exactly as predicted from the manifest; far below a dense copy; factors
    de-quantized take at most 32 / 2 times the bytes on disk (a b-bit code, b >= 2, becomes a 32-bit
    float). (Codes padded to whole 64-entry blocks cost these tiny ranks more than real ones: the
    SmolLM2 tenants hold 1.4x their bytes on disk, benchmarks/results/runtime.md.)"""
    arch, base, work, mt, _ = setup
    for t in ("a", "b"):
        art = adamix.load(work / t)
        for mode, model in (("codes", mt), ("float", float_mt)):
            tenant = model.tenants[t]
            held, dense = predicted_bytes(art, mode)
            assert tenant.nbytes == held, (t, mode)
            assert tenant.nbytes < 0.4 * dense
        on_disk = (work / t / "delta.safetensors").stat().st_size + (work / t / "manifest.json").stat().st_size
        assert float_mt.tenants[t].nbytes < 32 / 2 * on_disk
        print(f"{arch} tenant {t}: held {mt.tenants[t].nbytes} B as codes, {float_mt.tenants[t].nbytes} B de-quantized, "
              f"on disk {on_disk} B, dense fp32 {dense} B")


def test_packed_factors_same_output_disk_sized_memory(setup):
    arch, base, work, mt, _ = setup
    art = adamix.load(work / "a")
    packed = MultiTenantModel(base, factors="packed")
    packed.attach("a", art)
    ids = ids_batch(2, seed=4)
    assert rel(output(packed(input_ids=ids, tenants="a")), output(mt(input_ids=ids, tenants="a"))) < 1e-6
    assert packed.tenants["a"].nbytes == predicted_bytes(art, "packed")[0]


def test_detach_restores_the_base_and_reattach(setup):
    arch, base, work, _, merged = setup
    mt = MultiTenantModel(base)
    before = {n for n, _ in mt.model.named_modules()}
    mt.attach("a", work / "a")
    mt.detach("a")
    assert {n for n, _ in mt.model.named_modules()} == before
    ids = ids_batch(2, seed=5)
    with torch.no_grad():
        assert torch.equal(output(mt(input_ids=ids)), output(merged[BASE](input_ids=ids)))
    mt.attach("a2", work / "a")
    with torch.no_grad():
        assert rel(output(mt(input_ids=ids, tenants="a2")), output(merged["a"](input_ids=ids))) < 2e-6
    with pytest.raises(AdamixError, match="no tenant 'a'"):
        mt.detach("a")


@pytest.mark.parametrize("setup", ["bert"], indirect=True)
def test_user_mistakes_are_refused(setup, llama_pair, tmp_path):
    arch, base, work, mt, _ = setup
    with pytest.raises(AdamixError, match="wrong base"):
        MultiTenantModel(llama_pair[0]).attach("x", work / "a")
    with pytest.raises(AdamixError, match="already attached"):
        mt.attach("a", work / "a")
    with pytest.raises(AdamixError, match="not allowed"):
        mt.attach(BASE, work / "a")
    with pytest.raises(AdamixError, match="not an adamix delta"):
        mt.attach("c", tmp_path)
    ids = ids_batch(2)
    with pytest.raises(AdamixError, match="no tenant 'nobody'"):
        mt(input_ids=ids, tenants=["a", "nobody"])
    with pytest.raises(AdamixError, match="3 tenant names for a batch of 2"):
        mt(input_ids=ids, tenants=["a", "b", "a"])
    assert sorted(mt.tenants) == ["a", "b"]


def test_norms_take_the_affine_path_and_equal_a_rerun(setup):
    """LayerNorm / RMSNorm deltas: y += A(x) * (w_t - w) + (b_t - b) equals running the norm again with
    the tenant's parameters (the path every non-affine module takes)."""
    arch, base, work, _, _ = setup
    mt = MultiTenantModel(base, factors="float")
    mt.attach("a", work / "a")
    mt.attach("b", work / "b")
    norms = [w for w in mt._wrappers.values() if isinstance(w, TenantParams)]
    assert norms and all(w.is_affine() for w in norms)
    ids = ids_batch(4, seed=7)
    tenants = ["a", "b", BASE, "a"]
    affine = output(mt(input_ids=ids, tenants=tenants))
    for w in norms:
        w._affine = ()  # as if the probe had failed: run the module again per tenant
    rerun = output(mt(input_ids=ids, tenants=tenants))
    assert rel(affine, rerun) < 1e-6 and rel(affine[0], affine[2]) > 1e-3


def test_affine_probe():
    class Squared(torch.nn.Module):  # y = x * w^2: not affine in w
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight ** 2

    class Extra(torch.nn.LayerNorm):  # a third parameter: not handled by the affine path
        def __init__(self):
            super().__init__(4)
            self.gain = torch.nn.Parameter(torch.ones(1))

    router = Router()
    assert TenantParams(torch.nn.LayerNorm(4), router).is_affine()
    assert TenantParams(torch.nn.LayerNorm(4, bias=False), router).is_affine()
    assert not TenantParams(Squared(), router).is_affine()
    assert not TenantParams(Extra(), router).is_affine()


def test_reattaching_a_name_uses_the_new_delta(setup):
    """What modules prepare per batch layout (fused kernel jobs, per-row norm deltas) is dropped when
    tenants change: the same name and batch answered by another artifact gives that artifact's output."""
    arch, base, work, _, merged = setup
    mt = MultiTenantModel(base)
    mt.attach("keep", work / "b")  # keeps every module wrapped (and its prepared state) across the detach
    mt.attach("x", work / "a")
    ids = ids_batch(2, seed=8)
    with torch.no_grad():
        assert rel(output(mt(input_ids=ids, tenants=["x", "x"])), output(merged["a"](input_ids=ids))) < 2e-6
        mt.detach("x")
        mt.attach("x", work / "b")
        assert rel(output(mt(input_ids=ids, tenants=["x", "x"])), output(merged["b"](input_ids=ids))) < 2e-6

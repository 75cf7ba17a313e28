"""`--budget-scope model`: the weighted model-wide knapsack against brute force, the budget held
across the model, resume between and within the two passes (identical bytes), the slopes of the
layer weights against known values, and the refusals."""

from __future__ import annotations

import itertools
import math
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import adamix
from adamix import AdamixError
from adamix.compression.options import Options
from adamix.compression.partial import partial_dir
from adamix.compression.calibrate import token_windows
from adamix.compression.plan import delta_of
from adamix.compression.sensitivity import divergence, fisher_slopes, input_slope, layer_errors, layer_slopes
from adamix.io.hf import build_model, state_name_map
from adamix.io.artifact import Artifact
from adamix.io.checkpoint import Checkpoint
from adamix.methods import Settings
from adamix.methods.adamix import allocate_jointly, joint_reserve_bits
from adamix.methods.svd_mixed import triplet_bits

from test_resume import child_env, compress_cmd, files  # noqa: E402 (a sibling test module)


# ------------------------------------------------------------------ the weighted knapsack


def instance(seed: int):
    """2-3 matrices of 1-3 triplets, ADAMIX-shaped costs, errors decreasing in width, weights 1e-3..1e3."""
    rng = np.random.default_rng(seed)
    settings = Settings(widths=(0, 2, 4), group_size=16)
    parts = []
    for _ in range(int(rng.integers(2, 4))):
        r, (m, n) = int(rng.integers(1, 4)), (int(v) for v in rng.integers(16, 96, size=2))
        costs = np.array([triplet_bits(m, n, b, 16) for b in settings.widths], dtype=np.float64)
        s2 = np.sort(rng.lognormal(0, 1, size=r))[::-1]
        table = s2[:, None] * np.c_[np.ones(r), np.cumprod(rng.uniform(0.05, 0.6, size=(r, 2)), axis=1)]
        budget = float(rng.uniform(0.2, 1.5) * r * costs[1]) + joint_reserve_bits(settings)
        parts.append((table, costs, budget))
    weights = list(10.0 ** rng.uniform(-3, 3, size=len(parts)))
    return parts, weights, settings


@pytest.mark.parametrize("seed", range(12))
def test_weighted_model_knapsack_matches_brute_force(seed):
    parts, weights, settings = instance(seed)
    reserve = joint_reserve_bits(settings)
    budget = sum(b - reserve for _, _, b in parts)
    rows = [(w * t[i], c) for (t, c, _), w in zip(parts, weights) for i in range(len(t))]
    best = math.inf
    for pick in itertools.product(range(3), repeat=len(rows)):
        if sum(c[k] for (_, c), k in zip(rows, pick)) <= budget:
            best = min(best, sum(e[k] for (e, _), k in zip(rows, pick)))
    choices = allocate_jointly(parts, settings, weights)
    assert [len(c) for c in choices] == [len(t) for t, _, _ in parts]
    spent = sum(float(c[k].sum()) for (_, c, _), k in zip(parts, choices))
    assert spent <= budget
    got = sum(w * float(t[np.arange(len(k)), k].sum()) for (t, _, _), w, k in zip(parts, weights, choices))
    assert got == pytest.approx(best, rel=1e-9)


# ------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def model_run(deep_pair, calib_file, tmp_path_factory):
    """The uninterrupted model-scope CLI run, in a child process like the interrupted ones."""
    out = tmp_path_factory.mktemp("model") / "d"
    subprocess.run(compress_cmd(deep_pair, calib_file, out, "--budget-scope", "model"), check=True, env=child_env())
    return out


def test_budget_held_across_the_model_and_moved_between_matrices(deep_pair, model_run):
    art = Artifact(model_run)
    base = Checkpoint(deep_pair[0])
    mixed = {n: e for n, e in art.entries.items() if e["kind"] == "svd-mixed"}
    elements = {n: math.prod(base.slice_info(n)[0]) for n in mixed}
    with open(model_run / "delta.safetensors", "rb") as f:
        import json
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    stored = {n: sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.startswith(n + "."))
              for n in mixed}
    alpha = art.manifest["alpha"]
    assert 8 * sum(stored.values()) <= alpha * 16 * sum(elements.values())
    assert art.manifest["sizes"]["alpha_achieved"] <= alpha  # the manifest's slopes record included
    shares = [8 * stored[n] / (16 * elements[n]) for n in mixed]
    assert max(shares) > 1.5 * alpha and min(shares) < 0.5 * alpha  # bits went where the weights sent them
    record = art.manifest["settings"]["model_scope"]
    assert record["end_divergence"] == "kl" and set(record["slopes"]) >= set(mixed)
    assert all(v >= 0 for v in record["slopes"].values())


KILLER = """
import os, signal, sys
import adamix.compression.partial as partial
where, count = sys.argv[1], int(sys.argv[2])
seen = [0]
write = partial.Stash.write
def patched(self, chunk, *a, **k):
    write(self, chunk, *a, **k)
    first = self.folder.name == "pass1"
    if (where == "pass1" and first) or (where == "pass2" and not first) or where == chunk:
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
partial.Stash.write = patched
from adamix.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, count", [("pass1", 3), ("slopes", 1), ("allocation", 1), ("pass2", 2)])
def test_sigkill_in_either_pass_then_resume_is_byte_identical(deep_pair, calib_file, model_run, tmp_path, where, count):
    out = tmp_path / "d"
    cmd = compress_cmd(deep_pair, calib_file, out, "--budget-scope", "model")
    r = subprocess.run([sys.executable, "-c", KILLER, where, str(count), *cmd[3:]], env=child_env(), capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not out.exists() and (partial_dir(out) / "pass1").is_dir()
    subprocess.run(cmd + ["--resume"], check=True, env=child_env())
    assert files(out) == files(model_run)
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("extra, message", [
    (dict(calib=None), "--budget-scope model needs calibration text"),
    (dict(shard="1/2"), "--budget-scope model runs in one process .*: drop --shard"),
    (dict(executor="ray"), "--budget-scope model runs in one process .*: drop --executor ray"),
    (dict(method="rtn"), "--budget-scope model applies to --method adamix only, not rtn"),
])
def test_model_scope_refusals(bert_pair, calib_file, tmp_path, extra, message):
    opts = {**dict(calib=calib_file, budget_scope="model", samples=4, seqlen=32, progress=False), **extra}
    with pytest.raises(AdamixError, match=message):
        adamix.compress(*bert_pair, tmp_path / "d", **opts)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ the layer slopes


class Linear2(nn.Module):
    """ids -> embedding -> A -> B, no nonlinearity: the output change of a perturbation d of A is
    B d x, so with B = c Q (Q orthogonal) A's slope is exactly c^2 and B's is 1."""

    def __init__(self, c: float, vocab: int = 11, d: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.data = torch.randn(vocab, d, generator=g)
        self.A, self.B = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.A.weight.data = torch.randn(d, d, generator=g)
        self.B.weight.data = c * torch.linalg.qr(torch.randn(d, d, generator=g))[0]

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.B(self.A(self.emb(input_ids))))

    def get_input_embeddings(self):
        return self.emb


def test_slopes_reproduce_known_values_on_a_linear_model():
    model = Linear2(c=3.0)
    windows = [torch.tensor([[1, 4, 2, 9, 4]]), torch.tensor([[0, 3, 3]])]
    deltas = {n: 0.01 * torch.ones(6, 6) if n != "emb" else 0.01 * torch.ones(11, 6) for n in ("A", "B", "emb")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kind, slopes = layer_slopes(model, {"A": "A.weight", "B": "B.weight", "emb": "emb.weight"}, deltas.__getitem__,
                                {"emb"}, windows, seed=3)
    assert kind == "hidden"
    assert slopes["A"] == pytest.approx(9.0, rel=1e-4) and slopes["B"] == pytest.approx(1.0, rel=1e-4)  # float32 forward
    # the embedding (data-free: per ||d||_F^2): float64 reference with the same seeded perturbation
    from adamix.compression.sensitivity import SLOPE_RHO, seeded_normal
    G = seeded_normal((11, 6), 3, "emb").double()
    d = G * (SLOPE_RHO ** 0.5 * float(deltas["emb"].norm()) / float(G.norm()))
    M = (model.B.weight.double() @ model.A.weight.double()).detach()
    tokens = torch.cat([w[0] for w in windows])
    expected = float(((d[tokens] @ M.T) ** 2).sum()) / len(tokens) / float((d ** 2).sum())
    assert slopes["emb"] == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored exactly
    # layer_errors measures E with the same inputs: sum_l c_l E_l predicts the divergence of a linear model exactly
    change = 0.05 * torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    E = layer_errors(model, {"A": ("A.weight", change)}, set(), windows)
    x = torch.cat([model.emb(w[0]) for w in windows]).double().detach()
    assert E["A"] == pytest.approx(float(((x @ change.double().T) ** 2).sum()) / len(x), rel=1e-5)


def test_kl_divergence_is_float64_and_never_negative():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 50, generator=g)
    out = ref + 1e-4 * torch.randn(5, 50, generator=g)
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
    assert divergence("kl", ref, out) == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-9)
    assert divergence("kl", ref, ref) == 0.0


def test_fisher_slopes_match_the_linear_model_in_expectation():
    model = Linear2(c=3.0)
    windows = [torch.tensor([[1, 4, 2, 9, 4]]), torch.tensor([[0, 3, 3]])]
    kind, slopes = fisher_slopes(model, {"A": "A.weight", "B": "B.weight", "emb": "emb.weight"}, {"emb"}, windows,
                                 seed=1, probes=400)
    assert kind == "hidden"
    assert slopes["A"] == pytest.approx(9.0, rel=0.1) and slopes["B"] == pytest.approx(1.0, rel=0.1)
    with torch.no_grad():  # embedding: E||grad||^2 = T ||B A||_F^2, over T * numel
        assert slopes["emb"] == pytest.approx(float((model.B.weight @ model.A.weight).norm() ** 2) / 66, rel=0.1)
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_fisher_slopes_agree_with_perturbation_on_a_transformer(llama_pair, calib_file):
    """The pipeline's estimate (a few backward passes) against the direct one (a perturbed forward
    pass per matrix) on a causal LM whose slopes span orders of magnitude."""
    from transformers import AutoTokenizer
    base, ft = Checkpoint(llama_pair[0]), Checkpoint(llama_pair[1])
    model = build_model(ft)
    params = {ck: p for p, ck in state_name_map(model, ft.keys()).items() if len(ft.slice_info(ck)[0]) == 2}
    free = {ck for ck in params if ".layers." not in ck}
    windows = token_windows(calib_file.read_text(), AutoTokenizer.from_pretrained(ft.folder), 8, 32)
    _, direct = layer_slopes(model, params, lambda n: delta_of(base, ft, n), free, windows)
    kind, fisher = fisher_slopes(model, params, free, windows, probes=8)
    assert kind == "kl" and max(direct.values()) > 1e3 * min(direct.values()) > 0
    ratios = [fisher[n] / direct[n] for n in params]
    assert 0.6 < min(ratios) and max(ratios) < 1.6, ratios


# ------------------------------------------------------------------ --slope-power


def test_layer_weights_shrink_the_calibrated_slopes_toward_their_geometric_mean():
    from adamix.compression.model_scope import layer_weights
    slopes = {"a": 4.0, "b": 0.25, "c": 1e-3, "z": 0.0, "emb": 7.0}  # "unused": stashed, no slope
    names, free, T = ["a", "b", "c", "z", "emb", "unused"], {"emb"}, 50
    g = (4.0 * 0.25 * 1e-3) ** (1 / 3)  # the calibrated linears with a positive slope
    for P in (1.0, 0.5, 0.0):
        w = layer_weights(slopes, names, free, T, P)
        for n in ("a", "b", "c"):
            assert w[n] == pytest.approx(slopes[n] ** P * g ** (1 - P) / T, rel=1e-12)
        assert w["emb"] == 7.0 and w["z"] == 0.0 and w["unused"] == 0.0
    flat = layer_weights(slopes, names, free, T, 0.0)
    assert flat["a"] == pytest.approx(flat["c"], rel=1e-12)  # P = 0: equal weights, the pooled layer error
    assert layer_weights(slopes, names, free, T) == {n: (slopes.get(n, 0.0) if n in free else slopes.get(n, 0.0) / T)
                                                     for n in names}  # P = 1: the slopes as measured, bit for bit


def test_slope_power_is_recorded_and_changes_the_allocation(deep_pair, calib_file, model_run, tmp_path):
    # the same measured slopes, another allocation (P = 0: equal weights), P in the manifest
    out = tmp_path / "flat"
    subprocess.run(compress_cmd(deep_pair, calib_file, out, "--budget-scope", "model", "--slope-power", "0"),
                   check=True, env=child_env())
    flat, sloped = Artifact(out).manifest, Artifact(model_run).manifest
    assert flat["settings"]["model_scope"]["slope_power"] == 0.0
    assert sloped["settings"]["model_scope"]["slope_power"] == 1.0
    assert flat["settings"]["model_scope"]["slopes"] == sloped["settings"]["model_scope"]["slopes"]
    assert files(out) != files(model_run)  # another allocation


@pytest.mark.parametrize("extra, message", [
    (dict(slope_power=0.5), "--slope-power applies to --budget-scope model only"),
    (dict(budget_scope="model", slope_power=1.5), "--slope-power must be a number from 0 to 1, got 1.5"),
    (dict(budget_scope="model", slope_power=-0.1), "--slope-power must be a number from 0 to 1"),
])
def test_slope_power_refusals(bert_pair, calib_file, tmp_path, extra, message):
    with pytest.raises(AdamixError, match=message):
        adamix.compress(*bert_pair, tmp_path / "d", **{**dict(calib=calib_file, samples=4, seqlen=32, progress=False),
                                                        **extra})
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ --token-rows


def test_input_slope_matches_the_linear_model_in_expectation():
    # h_t = B A e_t: a change d of one position's embedding moves h_t by B A d, so per unit |d|^2
    # (per entry) the divergence ||dh||^2 grows by ||B A||_F^2 / n on average over d's direction
    model = Linear2(c=3.0)
    windows = [torch.tensor([[1, 4, 2, 9, 4]]), torch.tensor([[0, 3, 3]])]
    c_in = input_slope(model, windows, seed=1, probes=400)
    with torch.no_grad():
        expected = float((model.B.weight @ model.A.weight).norm() ** 2) / 6
    assert c_in == pytest.approx(expected, rel=0.1)
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    # the same slope by perturbation: one token's row moved by d, its positions' outputs with it
    d = 1e-3 * torch.randn(6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        refs = [model(w).last_hidden_state for w in windows]
        model.emb.weight[4] += d
        div = sum(divergence("hidden", r[0], model(w).last_hidden_state[0]) for r, w in zip(refs, windows)) / 8
    M = (model.B.weight @ model.A.weight).detach().double()
    assert div == pytest.approx(2 * float((M @ d.double()).norm() ** 2) / 8, rel=1e-3)  # token 4: 2 of 8 positions


@pytest.fixture(scope="module")
def rows_pair(calib_file, tmp_path_factory):
    """A 2-block Llama pair with a 2048-row vocabulary (the text reads 61 of them) whose fine-tune,
    beside synthetic.perturb's low-rank change, moves the rows of the tokens the calibration text
    reads by a full-rank 50% of their norm: a task-like embedding change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from synthetic import config, perturb, tokenizer
    root = tmp_path_factory.mktemp("rows-pair")
    torch.manual_seed(0)
    cfg = config("llama", 2)
    cfg.vocab_size = 2048
    model = AutoModelForCausalLM.from_config(cfg)
    tok = tokenizer()
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    state = perturb(model.state_dict(), 1)
    windows = token_windows(calib_file.read_text(), tok, 8, 32)
    seen = torch.unique(torch.cat([w.reshape(-1) for w in windows]))
    E = state["model.embed_tokens.weight"]
    noise = torch.randn(len(seen), E.shape[1], generator=torch.Generator().manual_seed(5))
    E[seen] += 0.5 * E[seen].norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True)
    model.load_state_dict(state)
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    assert AutoTokenizer.from_pretrained(ft).vocab_size < 100
    return base, ft


def rows_cmd(rows_pair, calib_file, out, *extra) -> list[str]:
    """At 1/64, where the embedding's low-rank part keeps fewer triplets than the text reads tokens."""
    return compress_cmd(rows_pair, calib_file, out, "--budget-scope", "model", "--ratio", "1/64", *extra)


def rows_pair_run(rows_pair, calib_file, out, *extra):
    subprocess.run(rows_cmd(rows_pair, calib_file, out, *extra), check=True, env=child_env())
    return out


@pytest.fixture(scope="module")
def token_rows_run(rows_pair, calib_file, tmp_path_factory):
    return rows_pair_run(rows_pair, calib_file, tmp_path_factory.mktemp("rows") / "d", "--token-rows")


@pytest.fixture(scope="module")
def plain_rows_run(rows_pair, calib_file, tmp_path_factory):
    return rows_pair_run(rows_pair, calib_file, tmp_path_factory.mktemp("plain") / "d", "--no-token-rows")


def test_token_rows_store_seen_rows_beside_the_low_rank_embedding_within_the_model_budget(
        rows_pair, calib_file, token_rows_run, plain_rows_run):
    from transformers import AutoTokenizer
    art = Artifact(token_rows_run)
    base = Checkpoint(rows_pair[0])
    emb = [n for n, e in art.entries.items() if e["kind"].endswith("+rows")]
    assert emb == ["model.embed_tokens.weight"]
    entry = art.entries[emb[0]]
    assert entry["kind"] == "svd-mixed+rows" and entry["stats"]["rows_kept"] > 0
    # the kept rows are tokens the calibration text reads
    windows = token_windows(calib_file.read_text(), AutoTokenizer.from_pretrained(rows_pair[1]), 8, 32)
    seen = set(torch.cat([w.reshape(-1) for w in windows]).tolist())
    kept = art.tensors(emb[0])["row_idx"].tolist()
    assert set(kept) <= seen and len(set(kept)) == len(kept)
    # the budget holds over every allocated matrix, the composite included
    allocated = {n: e for n, e in art.entries.items() if e["kind"].startswith("svd-mixed")}
    elements = {n: math.prod(base.slice_info(n)[0]) for n in allocated}
    stored = {n: sum(t.numel() * t.element_size() for t in art.tensors(n).values()) for n in allocated}
    assert 8 * sum(stored.values()) <= art.manifest["alpha"] * 16 * sum(elements.values())
    # and the whole artifact, its header and manifest included, spends the budget as the run without rows
    sizes, plain = art.manifest["sizes"], Artifact(plain_rows_run).manifest["sizes"]
    assert sizes["alpha_achieved"] <= art.manifest["alpha"]
    assert abs(sizes["total_bytes"] - plain["total_bytes"]) < 0.01 * plain["total_bytes"]
    record = art.manifest["settings"]["model_scope"]["token_rows"]
    assert record["embedding"] == emb[0] and record["input_slope"] > 0 and record["candidates"] >= len(kept)
    # the seen rows are closer to the fine-tune's than without token rows
    D = delta_of(base, Checkpoint(rows_pair[1]), emb[0]).double()
    without = Artifact(plain_rows_run).delta(emb[0]).double()
    err = lambda X: float(((X - D)[kept] ** 2).sum())  # noqa: E731
    assert err(art.delta(emb[0]).double()) < 0.5 * err(without)


def test_token_rows_are_the_model_scopes_default(rows_pair, calib_file, token_rows_run, tmp_path):
    assert files(rows_pair_run(rows_pair, calib_file, tmp_path / "d")) == files(token_rows_run)


@pytest.mark.parametrize("given, expected", [
    (dict(), False), (dict(budget_scope="block"), False), (dict(budget_scope="model"), True),
    (dict(budget_scope="model", max_rank=4), False), (dict(budget_scope="model", token_rows=False), False),
    (dict(budget_scope="model", token_rows=True), True), (dict(token_rows=False), False),
])
def test_token_rows_default_on_with_the_model_scope_unless_a_rank_cap(given, expected):
    opts = Options(**given)
    assert opts.uses_token_rows is expected
    assert ("token_rows" in opts.run_record()) is expected


@pytest.mark.parametrize("where, count", [("slopes", 1), ("allocation", 1), ("pass2", 1)])
def test_token_rows_sigkill_then_resume_is_byte_identical(rows_pair, calib_file, token_rows_run, tmp_path, where, count):
    out = tmp_path / "d"
    cmd = rows_cmd(rows_pair, calib_file, out, "--token-rows")
    r = subprocess.run([sys.executable, "-c", KILLER, where, str(count), *cmd[3:]], env=child_env(), capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    subprocess.run(cmd + ["--resume"], check=True, env=child_env())
    assert files(out) == files(token_rows_run)


def test_token_rows_run_is_served_as_merged(rows_pair, token_rows_run):
    from adamix.serve import MultiTenantModel
    out = token_rows_run.parent / "merged"
    adamix.merge(rows_pair[0], token_rows_run, out, progress=False)
    ref = build_model(Checkpoint(out)).eval()
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    for factors in ("float", "auto"):
        mt = MultiTenantModel(rows_pair[0], factors=factors)
        mt.attach("t", token_rows_run)
        assert mt.tenants["t"].held_as["model.embed_tokens.weight"] == "SumDelta"
        with torch.no_grad():
            expected, got = ref(input_ids=ids).logits, mt(input_ids=ids, tenants="t").logits
        assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6, factors


def test_token_rows_export_peft(rows_pair, token_rows_run, tmp_path):
    from safetensors.torch import load_file
    from adamix.methods import decode
    name, module = "model.embed_tokens.weight", "model.embed_tokens"
    art = Artifact(token_rows_run)
    e = art.entries[name]
    whole = adamix.export_peft(rows_pair[0], token_rows_run, tmp_path / "whole")
    assert module in whole["modules_to_save"] and not whole["parts_dropped"]  # kept exactly
    lora = adamix.export_peft(rows_pair[0], token_rows_run, tmp_path / "lora", lora_only=True)
    assert lora["parts_dropped"] == {name: "token rows (only the low-rank part is a LoRA pair)"}
    assert module in lora["lora"] and name not in lora["dropped"]
    t = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    A = t[f"base_model.model.{module}.lora_embedding_A"]
    B = t[f"base_model.model.{module}.lora_embedding_B"]
    low = {k: v for k, v in art.tensors(name).items() if k in ("codes", "params")}
    expected = decode(e["meta"]["lowrank"], tuple(e["shape"]), e["meta"]["lowrank_meta"], low)
    assert torch.allclose((B @ A).T, expected, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (dict(token_rows=True), "--token-rows applies to --budget-scope model only"),
    (dict(budget_scope="model", token_rows=True, max_rank=4), "--token-rows cannot be combined with --max-rank"),
    (dict(budget_scope="model", token_rows="yes"), "token_rows must be True, False or None"),
])
def test_token_rows_refusals(bert_pair, calib_file, tmp_path, extra, message):
    with pytest.raises(AdamixError, match=message):
        adamix.compress(*bert_pair, tmp_path / "d", **{**dict(calib=calib_file, samples=4, seqlen=32, progress=False),
                                                        **extra})
    assert not (tmp_path / "d").exists()


def test_linears_fed_the_same_input_share_one_gram(llama_pair, calib_file):
    """q, k and v (and gate and up) read the very tensor the block passes them: one Gram, one object
    (computed once, held once, and its factors made once: quant.memo), equal to the X^T X of what
    k_proj received; o and down have their own."""
    from transformers import AutoTokenizer
    from adamix.compression.calibrate import BlockRunner
    ft = Checkpoint(llama_pair[1])
    windows = token_windows(calib_file.read_text(), AutoTokenizer.from_pretrained(ft.folder), 4, 32)
    runner = BlockRunner(ft, windows)
    block = runner.blocks[0]
    seen = []
    hook = block.self_attn.k_proj.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    _, _, grams = next(iter(runner.run()))
    hook.remove()

    def gram(part):
        return next(g for n, g in grams.items() if f".{part}." in n)
    assert gram("q_proj") is gram("k_proj") is gram("v_proj")
    assert gram("gate_proj") is gram("up_proj")
    assert gram("o_proj") is not gram("q_proj") and gram("down_proj") is not gram("up_proj")
    X = torch.cat(seen).double()
    ref = X.T @ X
    assert float((gram("k_proj").double() - ref).abs().max() / ref.abs().max()) < 1e-5

"""The linear algebra on the device given by --device: which method runs where, how the CPU is shared
between torch's threads and the ILP workers, and (where CUDA is present) that a run on the GPU stores
what the CPU run stores, up to rounding.

CI has no GPU: there the CUDA tests skip and the CPU path of the same code is what every other test
runs. benchmarks/gpu_check.sh runs this module on a GPU machine."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import adamix
from adamix import threads as threads_module
from adamix.compression import pipeline
from adamix.compression.encode import encode_block, placed
from adamix.eval.heldout import relative_output_error
from adamix.io.artifact import Artifact
from adamix.methods import Settings, get
from adamix.quant.gptq import gptq_rows

from test_encode import block_of_deltas

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cores", [1, 2, 16])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_threads_and_ilp_workers_never_exceed_the_cores(monkeypatch, cores, on_gpu):
    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    monkeypatch.setattr(threads_module, "available_cores", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for asked in [None, *range(1, cores + 1)]:
        threads, workers = pipeline.cpu_plan(asked, on_gpu, staged=True)
        assert threads >= 1 and workers >= 0 and threads + workers <= max(cores, 1)
        assert asked is None or threads == asked
        assert pipeline.cpu_plan(asked, on_gpu, staged=False)[1] == 0
    threads, workers = pipeline.cpu_plan(None, on_gpu, staged=True)
    if on_gpu:  # the device does the linear algebra: the ILP workers come first
        assert workers == min(pipeline.MAX_ILP_WORKERS_GPU, cores - 1)
    else:  # every core to torch by default, so none is left for a worker
        assert (threads, workers) == (cores, 0)


def test_only_device_resident_methods_leave_the_cpu():
    D, H = torch.randn(8, 4), torch.eye(4)
    for name in ("adamix", "deltacome"):
        d, h = placed(D, H, get(name), "meta")
        assert d.device.type == h.device.type == "meta"
    for name in ("lowrank", "bitdelta", "rtn", "gptq"):
        d, h = placed(D, H, get(name), "meta")
        assert d.device.type == h.device.type == "cpu"
    assert placed(D, None, get("adamix"), "meta")[1] is None


@cuda
def test_gptq_on_the_gpu_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 96, generator=g)
    X = torch.randn(96, 400, generator=g)
    H = X @ X.T
    bits = torch.tensor([8, 4, 4, 3, 2, 2])
    cpu = gptq_rows(W, H, bits, 32)
    gpu = gptq_rows(W.cuda(), H.cuda(), bits.cuda(), 32)
    assert gpu["codes"].device.type == "cuda"
    err = lambda q: float(torch.einsum("ij,jk,ik->", q - W, H, q - W))  # noqa: E731
    assert err(gpu["deq"].cpu()) == pytest.approx(err(cpu["deq"]), rel=0.02)
    assert (gpu["codes"].cpu() != cpu["codes"]).float().mean() < 0.02  # rounding ties and error feedback only


@cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_a_block_on_the_gpu_stores_what_the_cpu_stores(workers):
    settings = Settings(alpha=1 / 8, group_size=16)
    runs = {}
    for device in ("cpu", "cuda"):
        names, deltas = block_of_deltas()
        if device == "cuda":
            names = {k: (None if H is None else H.cuda(), t) for k, (H, t) in names.items()}
        runs[device] = encode_block(names, deltas.__getitem__, settings, 0.0, workers, device)
    assert list(runs["cuda"]) == list(runs["cpu"])
    for name, (enc, _) in runs["cuda"].items():
        ref = runs["cpu"][name][0]
        assert all(t.device.type == "cpu" for t in enc.tensors.values())
        assert enc.nbytes == pytest.approx(ref.nbytes, rel=0.1)
        if "error_measured" in ref.stats:
            assert enc.stats["error_measured"] == pytest.approx(ref.stats["error_measured"], rel=0.02)


def gpu_and_cpu_runs_agree(pair, calib_file, tmp_path, ratio: str, rel: float, **options) -> None:
    """The same compression on the CPU and on the GPU: sizes within 5%, the same entries, held-out
    error (on the calibration text) within `rel` relative."""
    base, ft = pair
    manifests = {d: adamix.compress(base, ft, tmp_path / d, ratio=ratio, samples=8, seqlen=64, device=d,
                                    progress=False, **options) for d in ("cpu", "cuda")}
    gpu, cpu = (manifests[d]["sizes"] for d in ("cuda", "cpu"))
    alpha = float(Fraction(ratio))
    assert gpu["alpha_achieved"] <= alpha and gpu["alpha_achieved"] == pytest.approx(cpu["alpha_achieved"], rel=0.05)
    assert set(Artifact(tmp_path / "cuda").entries) == set(Artifact(tmp_path / "cpu").entries)
    text = calib_file.read_text().splitlines()
    errors = {d: relative_output_error(base, ft, tmp_path / d, text, samples=8, seqlen=64)["relative_error"]
              for d in ("cpu", "cuda")}
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=rel)
    assert errors["cpu"] < 0.9


@cuda
@pytest.mark.parametrize("calibrated", [True, False])
def test_a_whole_run_on_the_gpu_agrees_with_the_cpu(llama_pair, calib_file, tmp_path, calibrated):
    gpu_and_cpu_runs_agree(llama_pair, calib_file, tmp_path, "1/8", 0.01, calib=calib_file if calibrated else None)


@cuda
def test_a_model_scope_run_on_the_gpu_agrees_with_the_cpu(llama_pair, calib_file, tmp_path):
    """The model-wide path (slopes, both passes, token rows, the Gaussian grid) on the device."""
    gpu_and_cpu_runs_agree(llama_pair, calib_file, tmp_path, "1/16", 0.02, calib=calib_file, budget_scope="model",
                           grid="normal", token_rows=True)

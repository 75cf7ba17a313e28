"""compression.options: one Options object behind both the CLI and the Python API."""

from __future__ import annotations

import dataclasses

import pytest

import adamix
from adamix.cli import build_parser, options_from
from adamix.compression.options import Options
from adamix.methods import Settings, registry


def test_the_cli_flags_are_the_options_fields_with_their_defaults():
    args = build_parser().parse_args(["compress", "b", "f", "-o", "out"])
    want = {f.name: f.default for f in dataclasses.fields(Options)}
    assert options_from(args) == want
    # the defaults the methods see are written once, in Settings
    s = Options().settings()
    assert (s.alpha, s.widths, s.group_size, s.whiten, s.budget_scope) == \
        (Settings().alpha, Settings().widths, Settings().group_size, Settings().whiten, Settings().budget_scope)


def test_cli_spellings_map_to_api_values():
    args = build_parser().parse_args(["compress", "b", "f", "-o", "o", "--calib", "none", "-q", "--ratio", "1/8"])
    got = options_from(args)
    assert got["calib"] is None and got["progress"] is False and got["ratio"] == "1/8"
    assert Options(**got).settings().alpha == 1 / 8


def test_whiten_is_on_by_default_and_switched_off_by_no_whiten():
    parse = build_parser().parse_args
    assert options_from(parse(["compress", "b", "f", "-o", "o"]))["whiten"] is True
    assert options_from(parse(["compress", "b", "f", "-o", "o", "--whiten"]))["whiten"] is True
    off = options_from(parse(["compress", "b", "f", "-o", "o", "--no-whiten"]))
    assert off["whiten"] is False and Options(**off).settings().whiten is False


def test_unknown_option_is_refused_in_one_line(tmp_path):
    with pytest.raises(adamix.AdamixError, match="unknown compression option 'ration'"):
        adamix.compress(tmp_path / "b", tmp_path / "f", tmp_path / "o", ration="1/8")


@pytest.mark.parametrize("changes, message", [
    ({"method": "rtn", "distill_steps": 3}, "--distill-steps 3 applies to --method bitdelta only, not rtn"),
    ({"method": "lowrank", "whiten": False}, "--no-whiten applies to --method adamix only, not lowrank"),
    ({"method": "bitdelta", "distill_steps": 2, "calib": None}, "--distill-steps needs calibration text (not --calib none)"),
    ({"method": "nope"}, "--method 'nope' is not one of adamix, deltacome, lowrank, bitdelta, rtn, gptq, dare, impart, "
                         "deltadct, ultradelta"),
    ({"distill_steps": -1, "method": "bitdelta"}, "--distill-steps must be >= 0, got -1"),
])
def test_refusals_come_from_the_registry(changes, message):
    with pytest.raises(adamix.AdamixError) as e:
        Options(**changes).settings()
    assert str(e.value) == message


def test_a_method_that_needs_calibration_refuses_the_data_free_mode():
    class Needs(registry.Method):
        name = "needs-h"
        needs_calibration = True

    registry.register(Needs())
    try:
        Options(method="needs-h").settings()  # with calibration text: accepted
        with pytest.raises(adamix.AdamixError, match="--method needs-h needs calibration text"):
            Options(method="needs-h", calib=None).settings()
    finally:
        registry.unregister("needs-h")
    assert "needs-h" not in registry.names()


def test_registering_checks_names_and_kinds():
    class NoDecoder(registry.Method):
        name = "no-decoder"
        kinds = ("nowhere-kind",)

    with pytest.raises(ValueError, match="no registered decoder: \\['nowhere-kind'\\]"):
        registry.register(NoDecoder())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("adamix"))
    assert "no-decoder" not in registry.names()


def test_threads_are_checked_against_the_cores():
    from adamix.threads import available_cores
    cores = available_cores()
    for bad in (0, cores + 1, 1.5):
        with pytest.raises(adamix.AdamixError) as e:
            Options(threads=bad).settings()
        assert str(e.value) == (f"--threads must be an integer from 1 to {cores} (the cores this process may use), "
                                f"got {bad!r}")
    Options(threads=cores).settings()


def test_default_threads_follow_omp_num_threads(monkeypatch):
    from adamix.threads import available_cores, default_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "999")
    assert default_threads() == available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == available_cores()


def test_svd_algorithm_is_checked_and_method_specific():
    with pytest.raises(adamix.AdamixError) as e:
        Options(svd="qr").settings()
    assert str(e.value) == "--svd must be one of gram, full, got 'qr'"
    with pytest.raises(adamix.AdamixError) as e:
        Options(svd="full", method="rtn").settings()
    assert str(e.value) == "--svd full applies to --method adamix / deltacome / lowrank / impart only, not rtn"
    assert Options(svd="full", method="lowrank").settings().svd == "full"
    assert Options().settings().svd == "gram"


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(adamix.AdamixError) as e:
        Options(device="cuda").settings()
    assert str(e.value) == "--device cuda: no CUDA device is available"

"""Shards: `compress --shard K/N` then `assemble` gives the single run's artifact byte for byte; the
shard and assemble refusals are one line each and write nothing."""

from __future__ import annotations

import json

import pytest

import adamix
from adamix.cli import main
from adamix.compression.shards import assemble, parse_shard, share

FILES = ("delta.safetensors", "manifest.json")


def compress(pair, out, calib, **kw):
    return adamix.compress(*pair, out, calib=calib, samples=4, seqlen=32, ratio="1/8", progress=False, threads=1, **kw)


def test_shares_are_contiguous_and_cover_everything_once():
    for count in (0, 1, 2, 5, 12):
        for n in (1, 2, 3, 7):
            parts = [list(share(count, (k, n))) for k in range(1, n + 1)]
            assert sum(parts, []) == list(range(count))
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None


@pytest.mark.parametrize("calibrated", [True, False])
def test_sharded_run_is_byte_identical(llama_pair, calib_file, tmp_path, calibrated):
    calib = calib_file if calibrated else None
    compress(llama_pair, tmp_path / "single", calib)
    shards = []
    for k in (3, 1, 2):  # any order
        m = compress(llama_pair, tmp_path / f"s{k}", calib, shard=f"{k}/3")
        assert m["shard"] == [k, 3] and m["covered"]
        shards.append(tmp_path / f"s{k}")
    covered = [set(json.loads((s / "shard.json").read_text())["covered"]) for s in shards]
    assert not (covered[0] & covered[1]) and not (covered[1] & covered[2]) and not (covered[0] & covered[2])
    assemble(shards, tmp_path / "assembled")
    for f in FILES:
        assert (tmp_path / "assembled" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
    assert sorted(p.name for p in (tmp_path / "assembled" / "finetune").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single" / "finetune").iterdir())


@pytest.fixture(scope="module")
def two_shards(llama_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for k in (1, 2):
        compress(llama_pair, root / f"s{k}", None, shard=f"{k}/2")
    compress(llama_pair, root / "other", None, shard="2/2", seed=5)
    compress(llama_pair, root / "of3", None, shard="2/3")
    return root


def refused(capsys, args, message, folder):
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adamix: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in folder.iterdir()) == before
    return err


@pytest.mark.parametrize("bad", ["0/3", "4/3", "a/b", "2", "1/0", "-1/2"])
def test_malformed_shard_refused(llama_pair, tmp_path, capsys, bad):
    refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", "--calib", "none", "-q", f"--shard={bad}"],
            f"--shard must be K/N with 1 <= K <= N (e.g. 2/4), got '{bad}'", tmp_path)


def test_shard_with_distillation_refused(llama_pair, tmp_path, capsys):
    refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", "-q", "--method", "bitdelta", "--distill-steps", "2",
                     "--shard", "1/2"], "--shard cannot split --distill-steps", tmp_path)


@pytest.mark.parametrize("given, message", [
    (["s1"], "shard 2/2 is missing (given: 1/2)"),
    (["s1", "s2", "s2"], "shard 2/2 is given twice"),
    (["s1", "other"], "comes from other inputs or settings than"),
    (["s1", "of3"], "is shard 2/3 of a run split in 3"),
    (["s1", "nowhere"], "nowhere: no such shard folder"),
])
def test_assemble_refusals(two_shards, capsys, given, message):
    refused(capsys, ["assemble", *[two_shards / g for g in given], "-o", two_shards / "out"], message, two_shards)


def test_assemble_refuses_an_unfinished_shard(two_shards, tmp_path, capsys):
    (tmp_path / "s2").mkdir()  # e.g. a shard still running elsewhere: no shard.json yet
    refused(capsys, ["assemble", two_shards / "s1", tmp_path / "s2", "-o", tmp_path / "out"],
            "not a finished adamix shard (no shard.json", tmp_path)


def test_assemble_cli_writes_the_artifact(two_shards, tmp_path, capsys):
    assert main(["assemble", str(two_shards / "s2"), str(two_shards / "s1"), "-o", str(tmp_path / "a")]) == 0
    assert "assembled 2 shards into" in capsys.readouterr().out
    adamix.load(tmp_path / "a")

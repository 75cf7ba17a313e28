"""User mistakes get one clear line and leave nothing behind."""

from __future__ import annotations

import json

import pytest

import adamix
from adamix import AdamixError
from adamix.io.artifact import Artifact
from adamix.cli import main


@pytest.fixture(scope="module")
def delta(bert_delta):
    return bert_delta


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_wrong_base_refused_naming_both_fingerprints(delta, tmp_path):
    from synthetic import make_pair
    other_base, _ = make_pair(tmp_path, "bert", seed=7)
    with pytest.raises(AdamixError, match="wrong base") as e:
        adamix.merge(other_base, delta, tmp_path / "m", progress=False)
    want = json.loads((delta / "manifest.json").read_text())["base_fingerprint"][:16]
    assert want in str(e.value)
    assert not (tmp_path / "m").exists()


def test_unknown_format_version_refused(delta, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdamixError, match="format version 99"):
        Artifact(bad)


def test_manifest_byte_count_mismatch_refused(delta, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    m = json.loads((bad / "manifest.json").read_text())
    name = next(n for n, e in m["tensors"].items() if e["kind"] == "svd-mixed")
    m["tensors"][name]["bytes"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdamixError, match="bytes"):
        Artifact(bad)


def test_mismatched_pair_refused_and_nothing_written(bert_pair, llama_pair, tmp_path, capsys):
    base, _ = bert_pair
    _, other = llama_pair
    before = listing(tmp_path)
    code = main(["compress", str(base), str(other), "-o", str(tmp_path / "out"), "--calib", "none", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("adamix: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "not in the" in err or "shape" in err
    assert listing(tmp_path) == before  # no output folder, no temporary folder left behind


def test_shape_mismatch_message(tmp_path):
    from synthetic import make_pair
    import synthetic
    base, _ = make_pair(tmp_path / "a", "llama")
    cfg = synthetic.config("llama")
    cfg.intermediate_size = 192
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "wide")
    synthetic.tokenizer().save_pretrained(tmp_path / "wide")
    with pytest.raises(AdamixError, match=r"down_proj.weight has shape \[128, 256\] in the base but \[128, 192\]"):
        adamix.compress(base, tmp_path / "wide", tmp_path / "o", calib=None, progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--ratio", "abc"], "not a number"),
    (["--ratio", "0"], "must be in (0, 1]"),
    (["--ratio", "3/2"], "must be in (0, 1]"),
    (["--bits", "2,9"], "between 1 and 8"),
    (["--calib", "does-not-exist.txt"], "does-not-exist.txt"),
])
def test_bad_options_one_line(bert_pair, tmp_path, capsys, args, message):
    base, ft = bert_pair
    code = main(["compress", str(base), str(ft), "-o", str(tmp_path / "o"), "-q", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_refused(delta, bert_pair, capsys):
    base, ft = bert_pair
    code = main(["compress", str(base), str(ft), "-o", str(delta), "--calib", "none", "-q"])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_inspect_prints_summary_and_json(delta, capsys):
    assert main(["inspect", str(delta)]) == 0
    out = capsys.readouterr().out
    assert "svd-mixed" in out and "achieved alpha" in out
    assert main(["inspect", str(delta), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["format"] == "adamix-delta" and m["tensors"]

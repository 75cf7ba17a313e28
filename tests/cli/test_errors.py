"""User mistakes get one clear line and leave nothing behind."""

from __future__ import annotations

import json
import re

import pytest

import adamix
from adamix import AdamixError
from adamix.io.artifact import Artifact
from adamix.cli import main
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def delta(bert_delta):
    return bert_delta


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def one_error_line(err: str, message: str) -> None:
    """stderr is exactly the line `adamix: error: <message>`: one line, no traceback."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == f"adamix: error: {message}\n"


def test_wrong_base_refused_naming_both_fingerprints(delta, tmp_path):
    from synthetic import make_pair
    other_base, _ = make_pair(tmp_path, "bert", seed=7)
    with pytest.raises(AdamixError, match="wrong base") as e:
        adamix.merge(other_base, delta, tmp_path / "m", progress=False)
    want = json.loads((delta / "manifest.json").read_text())["base_fingerprint"][:16]
    got = re.fullmatch(f"wrong base model: its fingerprint is ([0-9a-f]{{16}}), the delta was made against {want}",
                       str(e.value))
    assert got and got.group(1) != want, str(e.value)
    assert not (tmp_path / "m").exists()


def test_unknown_format_version_refused(delta, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdamixError, match="format version 99") as e:
        Artifact(bad)
    assert str(e.value) == (f"{bad / 'manifest.json'}: format version 99 is not supported "
                            f"(this adamix {adamix.__version__} reads version 1)")


def test_manifest_byte_count_mismatch_refused(delta, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    m = json.loads((bad / "manifest.json").read_text())
    name = next(n for n, e in m["tensors"].items() if e["kind"] == "svd-mixed")
    stored = m["tensors"][name]["bytes"]  # what the untouched manifest says: the true size
    m["tensors"][name]["bytes"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdamixError, match="bytes") as e:
        Artifact(bad)
    assert str(e.value) == f"{name}: stored tensors take {stored} bytes, the manifest says {stored + 1}"


def test_mismatched_pair_refused_and_nothing_written(bert_pair, llama_pair, tmp_path, capsys):
    base, _ = bert_pair
    _, other = llama_pair
    before = listing(tmp_path)
    code = main(["compress", str(base), str(other), "-o", str(tmp_path / "out"), "--calib", "none", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("adamix: error: ") and err.count("\n") == 1 and "Traceback" not in err
    # the pair is checked tensor by tensor in name order: the first base tensor, missing from the Llama
    tensors = load_file(str(base / "model.safetensors"))
    first = sorted(tensors)[0]
    shape = list(tensors[first].shape)
    one_error_line(err, f"tensor {first} {shape} is in the base but not in the fine-tune: not a fine-tune of this base?")
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
    (["--ratio", "abc"], "--ratio 'abc' is not a number or fraction such as 1/16"),
    (["--ratio", "0"], "--ratio must be in (0, 1], got 0"),
    (["--ratio", "3/2"], "--ratio must be in (0, 1], got 3/2"),
    (["--bits", "2,9"], "--bits must list widths between 1 and 8 (0 is implied), got '2,9'"),
    (["--calib", "does-not-exist.txt"], "calibration file does-not-exist.txt: No such file or directory"),
])
def test_bad_options_one_line(bert_pair, tmp_path, capsys, args, message):
    base, ft = bert_pair
    code = main(["compress", str(base), str(ft), "-o", str(tmp_path / "o"), "-q", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    one_error_line(err, message)
    assert not (tmp_path / "o").exists()


def test_existing_output_refused(delta, bert_pair, capsys):
    base, ft = bert_pair
    code = main(["compress", str(base), str(ft), "-o", str(delta), "--calib", "none", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err
    one_error_line(err, f"{delta} already exists (pass --overwrite to replace it)")


def test_inspect_prints_summary_and_json(delta, capsys):
    assert main(["inspect", str(delta)]) == 0
    out = capsys.readouterr().out
    assert "svd-mixed" in out and "achieved alpha" in out
    assert main(["inspect", str(delta), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["format"] == "adamix-delta" and m["tensors"]

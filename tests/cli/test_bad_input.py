"""Bad input through the CLI: one line on stderr ("adamix: error: ..."), exit status 2, no traceback,
and the output's parent folder exactly as before (no output, no temporary folder). And the two
unusual inputs that are valid: a fine-tune identical to its base, and a fine-tune that adds
vocabulary rows. The cases and messages are the table "Bad input and what you see" in docs/bad-input.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adamix
from adamix.io.artifact import Artifact
from adamix.cli import main

FAST = ["--calib", "none", "-q"]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def run(capsys, *args):
    capsys.readouterr()  # drop what building the inputs printed
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, args, message, folder):
    """Run the CLI; assert one clear line containing `message`, status 2, `folder` unchanged."""
    before = listing(folder)
    code, out, err = run(capsys, *args)
    assert code == 2, (code, out, err)
    assert err.startswith("adamix: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert listing(folder) == before  # no output folder, no temporary folder left behind
    return err


def edited_copy(src, dst, edit=None, drop=(), add=None):
    """A copy of model folder `src` with its state dict edited (edit(sd) in place), names dropped or added."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    for name in drop:
        del sd[name]
    if edit:
        edit(sd)
    sd.update(add or {})
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def set_nan(name, value=float("nan")):
    def edit(sd):
        sd[name][1, 2] = value
    return edit


@pytest.fixture(scope="module")
def delta(llama_delta):
    return llama_delta


# --- compress: the two models ---------------------------------------------------------------------

EMB, UP = "model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("case, make, message", [
    ("tensor missing in the fine-tune", lambda b, f, t: (b, edited_copy(f, t / "ft", drop=[UP])),
     f"tensor {UP} [256, 128] is in the base but not in the fine-tune: not a fine-tune of this base?"),
    ("extra tensor in the fine-tune", lambda b, f, t: (b, edited_copy(f, t / "ft", add={"extra.weight": torch.ones(4, 4)})),
     "tensor extra.weight is in the fine-tune but not in the base: not a fine-tune of this base?"),
    ("NaN in the base", lambda b, f, t: (edited_copy(b, t / "base", set_nan(UP)), f),
     f"tensor {UP} of the base contains NaN or Inf"),
    ("Inf in the fine-tune", lambda b, f, t: (b, edited_copy(f, t / "ft", set_nan(UP, float("inf")))),
     f"tensor {UP} of the fine-tune contains NaN or Inf"),
    ("base missing", lambda b, f, t: (t / "nowhere", f), "nowhere: no such file or folder"),
    ("fine-tune missing", lambda b, f, t: (b, t / "nowhere"), "nowhere: no such file or folder"),
])
def test_compress_refuses_bad_models(llama_pair, tmp_path, capsys, case, make, message):
    base, ft = make(*llama_pair, tmp_path)
    assert_refused(capsys, ["compress", base, ft, "-o", tmp_path / "out", *FAST], message, tmp_path)


def test_compress_refuses_other_architecture(bert_pair, llama_pair, tmp_path, capsys):
    err = assert_refused(capsys, ["compress", bert_pair[0], llama_pair[1], "-o", tmp_path / "out", *FAST],
                         "is in the base but not in the fine-tune: not a fine-tune of this base?", tmp_path)
    assert "embeddings" in err


def test_compress_refuses_other_shapes(llama_pair, tmp_path, capsys):
    import synthetic
    from transformers import AutoModelForCausalLM
    cfg = synthetic.config("llama")
    cfg.intermediate_size = 192
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "wide")
    assert_refused(capsys, ["compress", llama_pair[0], tmp_path / "wide", "-o", tmp_path / "out", *FAST],
                   "down_proj.weight has shape [128, 256] in the base but [128, 192] in the fine-tune: "
                   "the two models do not match", tmp_path)


def test_nan_in_fine_tune_embedding_refused_before_calibration_breaks(llama_pair, calib_file, tmp_path, capsys):
    """With calibration the embedding's NaN would turn every Gram into NaN: refused when it is loaded."""
    ft = edited_copy(llama_pair[1], tmp_path / "ft", set_nan(EMB))
    assert_refused(capsys, ["compress", llama_pair[0], ft, "-o", tmp_path / "out", "--calib", calib_file,
                            "--samples", 4, "--seqlen", 32, "-q"],
                   f"tensor {EMB} of the fine-tune contains NaN or Inf", tmp_path)


def test_folder_without_config_and_pickle_only_checkpoint(llama_pair, tmp_path, capsys, monkeypatch):
    (tmp_path / "noconfig").mkdir()
    shutil.copy(llama_pair[1] / "model.safetensors", tmp_path / "noconfig")
    assert_refused(capsys, ["compress", llama_pair[0], tmp_path / "noconfig", "-o", tmp_path / "out", *FAST],
                   "noconfig: not a model folder (no config.json)", tmp_path)
    (tmp_path / "pickled").mkdir()
    shutil.copy(llama_pair[1] / "config.json", tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not to be unpickled")

    def no_unpickling(*a, **k):
        raise AssertionError("a pickled checkpoint was loaded")
    monkeypatch.setattr(torch, "load", no_unpickling)
    assert_refused(capsys, ["compress", llama_pair[0], tmp_path / "pickled", "-o", tmp_path / "out", *FAST],
                   "pickled: no .safetensors weights (pickled .bin checkpoints are not read)", tmp_path)


def test_unreadable_config_refused(llama_pair, tmp_path, capsys):
    ft = tmp_path / "ft"
    shutil.copytree(llama_pair[1], ft)
    (ft / "config.json").write_text("{oops")
    assert_refused(capsys, ["compress", llama_pair[0], ft, "-o", tmp_path / "out", *FAST],
                   f"{ft / 'config.json'}: unreadable (Expecting property name", tmp_path)


def test_disk_full_while_writing_keeps_the_work_for_resume(llama_pair, tmp_path, capsys, monkeypatch):
    """A file-system failure midway (here: ENOSPC from the artifact writer): one line, exit 1, OUT and
    its temporary folder absent; the finished blocks stay in the work folder, and once the disk has
    room again --resume gives the artifact of an uninterrupted run."""
    import errno

    import adamix.io.artifact
    from adamix.compression.partial import partial_dir

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "delta.safetensors")
    real = adamix.io.artifact.save_streaming
    monkeypatch.setattr(adamix.io.artifact, "save_streaming", full)
    before = listing(tmp_path)
    code, _, err = run(capsys, "compress", *llama_pair, "-o", tmp_path / "out", *FAST)
    assert code == 1 and err == ("adamix: error: delta.safetensors: No space left on device; "
                                 "the finished blocks are kept: rerun with --resume to continue\n")
    assert listing(tmp_path) == sorted(before + [partial_dir(tmp_path / "out").name])
    assert not any(p.name.startswith(".out.tmp") for p in partial_dir(tmp_path / "out").iterdir())
    monkeypatch.setattr(adamix.io.artifact, "save_streaming", real)
    assert run(capsys, "compress", *llama_pair, "-o", tmp_path / "out", *FAST, "--resume")[0] == 0
    assert run(capsys, "compress", *llama_pair, "-o", tmp_path / "ref", *FAST)[0] == 0
    assert listing(tmp_path) == sorted(before + ["out", "ref"])
    for f in ("manifest.json", "delta.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()


@pytest.mark.parametrize("command", ["merge", "export-peft"])
def test_disk_full_while_writing_merge_or_adapter(command, llama_pair, delta, tmp_path, capsys, monkeypatch):
    """The same file-system failure for merge and export-peft: one line without resume advice (they
    keep no work), exit 1, nothing left in the output's parent folder."""
    import errno

    import adamix.export.merge
    import adamix.export.peft

    def full(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), Path(path).name)
    module = adamix.export.merge if command == "merge" else adamix.export.peft
    monkeypatch.setattr(module, "save_file", full)
    before = listing(tmp_path)
    quiet = ["-q"] if command == "merge" else []  # merge's progress bar would share stderr
    code, _, err = run(capsys, command, llama_pair[0], delta, "-o", tmp_path / "out", *quiet)
    name = "model.safetensors" if command == "merge" else "adapter_model.safetensors"
    assert code == 1 and err == f"adamix: error: {name}: No space left on device\n"
    assert listing(tmp_path) == before


# --- compress: Ctrl-C, and what rerunning after it says -------------------------------------------

SRC = str(Path(adamix.__file__).parents[1])

# The CLI in a child process, as a user runs it, with one change: after writing its first chunk it
# waits, so that the parent's SIGINT (a Ctrl-C) lands midway through the run whatever the machine's
# speed (the run would otherwise often finish first). SIGINT gets Python's own handler back, as in a
# terminal, even where the test runner started with SIGINT ignored (children inherit that).
CTRL_C_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import adamix.compression.partial as partial
write = partial.PartialRun.write
def write_then_wait(self, *a, **k):
    write(self, *a, **k)
    time.sleep(120)
partial.PartialRun.write = write_then_wait
from adamix.cli import main
sys.exit(main(sys.argv[1:]))
"""
CTRL_C_ARGS = ["--calib", "none", "--ratio", "1/8", "-q"]
INTERRUPTED = ("adamix: interrupted; nothing was written to the output; the finished blocks are kept: "
               "rerun with --resume to continue\n")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted(llama_pair, tmp_path_factory):
    """`adamix compress` stopped by SIGINT once its first chunk is in the work folder:
    (parent folder, its listing before, return code, stderr)."""
    from adamix.compression.partial import partial_dir
    root = tmp_path_factory.mktemp("ctrl-c")
    out = root / "d"
    before = listing(root)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, "compress", *map(str, llama_pair), "-o", str(out),
                             *CTRL_C_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in partial_dir(out).glob("*.json") if p.name != "run.json"]:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return root, before, proc.returncode, err.decode()


def copy_of_interrupted(interrupted, tmp_path) -> Path:
    """The interrupted run's work folder under tmp_path (for a test that goes on from it); returns OUT."""
    from adamix.compression.partial import partial_dir
    root = interrupted[0]
    shutil.copytree(partial_dir(root / "d"), partial_dir(tmp_path / "d"))
    return tmp_path / "d"


def test_ctrl_c_during_compress_writes_nothing_and_keeps_the_work(interrupted):
    from adamix.compression.partial import partial_dir
    root, before, code, err = interrupted
    assert code == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == INTERRUPTED
    work = partial_dir(root / "d")
    assert not (root / "d").exists()
    assert listing(root) == sorted(before + [work.name])  # the work folder, nothing else
    chunks = [p.name for p in work.iterdir() if p.suffix == ".json" and p.name != "run.json"]
    assert (work / "run.json").is_file() and chunks
    assert not [p.name for p in work.iterdir() if ".tmp" in p.name]  # no half-written file, no artifact folder


def test_rerun_after_ctrl_c_without_resume_or_with_other_options_refused(llama_pair, interrupted, tmp_path, capsys):
    """The two refusals of the table's last rows, exact lines; the work folder stays as it was."""
    from adamix.compression.partial import partial_dir
    out = copy_of_interrupted(interrupted, tmp_path)
    work = partial_dir(out)
    kept = tree(work)
    err = assert_refused(capsys, ["compress", *llama_pair, "-o", out, *CTRL_C_ARGS],
                         "an interrupted run left", tmp_path)
    assert err == (f"adamix: error: an interrupted run left {work}: pass --resume to continue it, "
                   "or --overwrite to start over\n")
    args = ["compress", *llama_pair, "-o", out, "--calib", "none", "--ratio", "1/16", "-q", "--resume"]
    err = assert_refused(capsys, args, "cannot resume from", tmp_path)
    assert err == (f"adamix: error: cannot resume from {work}: it was made with alpha 0.125 (now 0.0625); "
                   "rerun without --resume, with --overwrite\n")
    assert tree(work) == kept


def test_resume_after_ctrl_c_gives_the_uninterrupted_artifact(llama_pair, interrupted, tmp_path, capsys):
    """What the Ctrl-C message promises: --resume continues, to the bytes of a run never interrupted."""
    from adamix.compression.partial import partial_dir
    out = copy_of_interrupted(interrupted, tmp_path)
    code, stdout, err = run(capsys, "compress", *llama_pair, "-o", out, *CTRL_C_ARGS, "--resume")
    assert code == 0, err
    assert not partial_dir(out).exists()
    assert run(capsys, "compress", *llama_pair, "-o", tmp_path / "ref", *CTRL_C_ARGS)[0] == 0
    assert tree(out) == tree(tmp_path / "ref")


def test_ctrl_c_during_merge_writes_nothing(llama_pair, delta, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while merge writes its model file: status 130, the line without the
    resume advice (only compress keeps work), no output and no temporary folder."""
    import importlib
    merge_module = importlib.import_module("adamix.export.merge")  # (adamix.export.merge is the function)
    real = merge_module.save_file

    def write_then_interrupt(*a, **k):
        real(*a, **k)  # the file is half the output: the temporary folder must go with it
        raise KeyboardInterrupt
    monkeypatch.setattr(merge_module, "save_file", write_then_interrupt)
    before = listing(tmp_path)
    code, _, err = run(capsys, "merge", llama_pair[0], delta, "-o", tmp_path / "m", "-q")
    assert code == 130
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == "adamix: interrupted; nothing was written to the output\n"
    assert listing(tmp_path) == before


# --- compress: options --------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--ratio", "abc"], "--ratio 'abc' is not a number or fraction such as 1/16"),
    (["--ratio", "1/0"], "--ratio '1/0' is not a number or fraction such as 1/16"),
    (["--ratio", "0"], "--ratio must be in (0, 1], got 0"),
    (["--ratio=-1/16"], "--ratio must be in (0, 1], got -1/16"),
    (["--ratio", "3/2"], "--ratio must be in (0, 1], got 3/2"),
    (["--ratio", "1/100000"], "--ratio 1/100000 is too small to store anything: no matrix can keep even one "
                              "singular triplet or row; the smallest ratio that stores something is "),
    (["--ratio", "1/100000", "--method", "lowrank"], "no matrix can keep even one rank-1 factor pair or row"),
    (["--ratio", "1/100000", "--method", "rtn"], "no matrix can keep even one row;"),
    (["--ratio", "1/32", "--method", "bitdelta"], "bitdelta stores 1 bit per weight (ratio 1/16); it cannot meet --ratio 0.03125"),
    (["--max-rank", "0"], "--max-rank must be a positive integer, got 0"),
    (["--max-rank", "8", "--method", "bitdelta"], "--max-rank 8 applies to --method adamix / deltacome / lowrank only, not bitdelta"),
    (["--grid", "normal", "--method", "deltacome"], "--grid normal applies to --method adamix only, not deltacome"),
    (["--grid", "normal", "--group-size", "64"], "--group-size applies to --grid uniform (the normal grid has one scale per vector)"),
])
def test_bad_ratio_refused(llama_pair, tmp_path, capsys, args, message):
    assert_refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", *FAST, *args], message, tmp_path)


@pytest.mark.parametrize("method", ["adamix", "lowrank", "rtn"])
def test_smallest_ratio_named_stores_something(llama_pair, tmp_path, capsys, method):
    """The ratio the refusal names is enough for at least one matrix to keep one item."""
    err = assert_refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", *FAST, "--method", method,
                                  "--ratio", "0.001"], "the smallest ratio that stores something is ", tmp_path)
    smallest = err.split("stores something is ")[1].split()[0]
    code, _, _ = run(capsys, "compress", *llama_pair, "-o", tmp_path / "out", *FAST, "--method", method, "--ratio", smallest)
    assert code == 0
    kept = [n for n, e in Artifact(tmp_path / "out").entries.items() if e["kind"] != "raw" and e["bytes"] > 0]
    assert kept


def test_calibrated_smallest_ratio_stores_something(llama_pair, calib_file, tmp_path, capsys):
    """With calibration the block linears get no row-sparse alternative: the named ratio accounts for it."""
    calib = ["--calib", calib_file, "--samples", 4, "--seqlen", 32, "-q"]
    err = assert_refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", *calib, "--ratio", "0.001"],
                         "the smallest ratio that stores something is ", tmp_path)
    smallest = err.split("stores something is ")[1].split()[0]
    assert run(capsys, "compress", *llama_pair, "-o", tmp_path / "out", *calib, "--ratio", smallest)[0] == 0
    assert any(e["bytes"] > 0 for e in Artifact(tmp_path / "out").entries.values() if e["kind"] != "raw")


@pytest.mark.parametrize("content, message", [
    (None, "calibration file {path}: No such file or directory"),
    ("", "calibration file {path} is empty"),
    (" \n\t\n  \n", "calibration file {path} is empty"),
])
def test_bad_calibration_file_refused(llama_pair, tmp_path, capsys, content, message):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    assert_refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", "--calib", path, "-q"],
                   message.format(path=path), tmp_path)


# --- outputs ------------------------------------------------------------------------------------

def test_output_exists_refused(llama_pair, delta, capsys):
    for args in (["compress", *llama_pair, "-o", delta, *FAST], ["merge", llama_pair[0], delta, "-o", delta, "-q"]):
        assert_refused(capsys, args, f"{delta} already exists (pass --overwrite to replace it)", delta.parent)


def test_output_parent_missing_refused(llama_pair, delta, tmp_path, capsys):
    out = tmp_path / "missing" / "out"
    for args in (["compress", *llama_pair, "-o", out, *FAST], ["merge", llama_pair[0], delta, "-o", out, "-q"]):
        assert_refused(capsys, args, f"cannot write {out}: folder {tmp_path / 'missing'} does not exist", tmp_path)


def test_output_parent_not_writable_refused(llama_pair, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o555 folder is still writable")
        assert_refused(capsys, ["compress", *llama_pair, "-o", locked / "out", *FAST],
                       f"cannot write {locked / 'out'}: folder {locked} is not writable", locked)
    finally:
        locked.chmod(0o755)


def test_output_parent_not_writable_message(llama_pair, tmp_path, capsys, monkeypatch):
    """The same refusal where the test runs as root (os.access says what it says for a normal user)."""
    import adamix.io.artifact
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(adamix.io.artifact.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    assert_refused(capsys, ["compress", *llama_pair, "-o", locked / "out", *FAST],
                   f"cannot write {locked / 'out'}: folder {locked} is not writable", locked)


# --- merge: wrong base, damaged artifacts ---------------------------------------------------------

def test_merge_onto_wrong_base_refused(bert_pair, delta, tmp_path, capsys):
    want = json.loads((delta / "manifest.json").read_text())["base_fingerprint"][:16]
    err = assert_refused(capsys, ["merge", bert_pair[0], delta, "-o", tmp_path / "m", "-q"],
                         "wrong base model: its fingerprint is ", tmp_path)
    assert f"the delta was made against {want}" in err


def edit_manifest(fn):
    def damage(folder):
        m = json.loads((folder / "manifest.json").read_text())
        fn(m)
        (folder / "manifest.json").write_text(json.dumps(m))
    return damage


def first(m, kind):
    return next(e for e in m["tensors"].values() if e["kind"] == kind)


def resave_weights(fn):
    def damage(folder):
        sd = load_file(folder / "delta.safetensors")
        fn(sd)
        save_file(sd, folder / "delta.safetensors")
    return damage


def truncate(name, keep):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return damage


def random_bytes(folder):
    size = (folder / "delta.safetensors").stat().st_size
    (folder / "delta.safetensors").write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.uint8).numpy().tobytes())


def set_svd(key, value):
    return edit_manifest(lambda m: first(m, "svd-mixed").__setitem__(key, value))


DAMAGE = [
    ("manifest not JSON", lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json: invalid JSON"),
    ("manifest truncated", truncate("manifest.json", 0.5), "manifest.json: invalid JSON"),
    ("unknown format version", edit_manifest(lambda m: m.__setitem__("format_version", 99)),
     "manifest.json: format version 99 is not supported (this adamix 0.1.0 reads version 1)"),
    ("not an adamix manifest", edit_manifest(lambda m: m.__setitem__("format", "other")),
     "manifest.json: not an adamix manifest (format 'other')"),
    ("byte count edited", edit_manifest(lambda m: first(m, "svd-mixed").__setitem__("bytes", first(m, "svd-mixed")["bytes"] + 1)),
     "stored tensors take"),
    ("unknown kind", set_svd("kind", "zip"), "unknown tensor kind 'zip' in artifact"),
    ("negative shape", set_svd("shape", [-128, 128]), "shape [-128, 128] is not a list of dimensions in 1..2147483647"),
    ("shape not a list", set_svd("shape", "128x128"), "shape '128x128' is not a list of dimensions in 1..2147483647"),
    ("huge shape", set_svd("shape", [2**30, 2**30]), "has 1152921504606846976 elements, more than 8589934592"),
    ("shape edited", set_svd("shape", [100000, 128]), "sizes.fp16_bytes_method is"),
    ("meta widths do not match the stored bytes (found when decoding)",
     edit_manifest(lambda m: first(m, "svd-mixed")["meta"]["widths"][0].__setitem__(1, first(m, "svd-mixed")["meta"]["widths"][0][1] + 1)),
     "lm_head.weight: stored factors have"),
    ("bit-width out of range", edit_manifest(lambda m: first(m, "svd-mixed")["meta"]["widths"][0].__setitem__(0, 9)),
     "malformed svd-mixed metadata: group size"),
    ("codes stored with the wrong dtype",
     resave_weights(lambda sd: sd.update({k: v.view(torch.int8) for k, v in sd.items() if k.endswith(".codes")})),
     "is I8, a svd-mixed entry stores U8"),
    ("stored values corrupted to Inf (found when decoding)",
     resave_weights(lambda sd: next(v for k, v in sorted(sd.items()) if k.endswith(".params")).__setitem__(0, float("inf"))),
     "the stored delta decodes to NaN or Inf (corrupted artifact?)"),
    ("delta.safetensors truncated", truncate("delta.safetensors", 0.7), "delta.safetensors: cannot read safetensors"),
    ("delta.safetensors random bytes", random_bytes, "delta.safetensors: cannot read safetensors"),
    ("delta.safetensors missing", lambda f: (f / "delta.safetensors").unlink(),
     "not an adamix delta (needs manifest.json and delta.safetensors)"),
    ("finetune/config.json missing (merge needs it)", lambda f: (f / "finetune" / "config.json").unlink(),
     "finetune/config.json is missing (an incomplete delta folder?)"),
]


@pytest.mark.parametrize("case, damage, message", DAMAGE, ids=[c for c, _, _ in DAMAGE])
def test_merge_refuses_damaged_artifact(llama_pair, delta, tmp_path, capsys, case, damage, message):
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    damage(bad)
    assert_refused(capsys, ["merge", llama_pair[0], bad, "-o", tmp_path / "m", "-q"], message, tmp_path)
    if "(" not in case:  # inspect reads the manifest and checks the stored tensors, without decoding
        assert_refused(capsys, ["inspect", bad], message, tmp_path)


# --- valid: identical fine-tune ---------------------------------------------------------------------

def test_identical_fine_tune_gives_empty_delta_and_merges_to_the_base(llama_pair, tmp_path, capsys):
    base = llama_pair[0]
    code, out, err = run(capsys, "compress", base, base, "-o", tmp_path / "d", *FAST)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith("the fine-tune is identical to the base: the delta is empty")
    art = Artifact(tmp_path / "d")
    assert art.entries == {} and art.manifest["sizes"]["total_bytes"] > 0
    code, out, _ = run(capsys, "merge", base, tmp_path / "d", "-o", tmp_path / "m", "-q")
    assert code == 0
    merged, original = load_file(tmp_path / "m" / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads((base / "config.json").read_text())


# --- valid: added vocabulary ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    from synthetic import make_grown_pair
    return make_grown_pair(tmp_path_factory.mktemp("grown"), added=8)


def test_added_vocabulary_rows_are_stored_whole_and_merged(grown, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # inspect's table unwrapped
    base, ft = grown
    code, out, err = run(capsys, "compress", base, ft, "-o", tmp_path / "d", "--calib", calib_file,
                         "--samples", 4, "--seqlen", 32, "-q")
    assert code == 0, err
    art = Artifact(tmp_path / "d")
    assert {n: art.new_rows(n) for n in art.entries if art.new_rows(n)} == {EMB: 8, "lm_head.weight": 8}
    assert run(capsys, "merge", base, tmp_path / "d", "-o", tmp_path / "m", "-q")[0] == 0
    merged, want, old = (load_file(p / "model.safetensors") for p in (tmp_path / "m", ft, base))
    assert merged.keys() == want.keys()
    for name, w in want.items():
        assert merged[name].shape == w.shape and merged[name].dtype == w.dtype
    for name in (EMB, "lm_head.weight"):
        rows = old[name].shape[0]
        assert torch.allclose(merged[name][rows:], want[name][rows:].half().float(), atol=1e-3)
        shared = (merged[name][:rows] - want[name][:rows]).norm() / (want[name][:rows] - old[name]).norm()
        assert shared < 0.5  # the shared rows' delta went through the method
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads((ft / "config.json").read_text())
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.get_input_embeddings().weight.shape[0] == want[EMB].shape[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, want[EMB].shape[0] - 1]])).logits
    assert logits.shape[-1] == want[EMB].shape[0] and torch.isfinite(logits).all()
    assert run(capsys, "inspect", tmp_path / "d")[1].count("+8 new rows") == 2


def test_added_vocabulary_refused_by_runtime_and_export(grown, tmp_path, capsys):
    base, ft = grown
    adamix.compress(base, ft, tmp_path / "d", calib=None, progress=False)
    message = "cannot use a delta that adds vocabulary rows (lm_head.weight gains 8 rows); restore the fine-tune with `adamix merge` instead"
    assert_refused(capsys, ["export-peft", base, tmp_path / "d", "-o", tmp_path / "p"], "export-peft " + message, tmp_path)
    from adamix import AdamixError
    from adamix.serve import MultiTenantModel
    with pytest.raises(AdamixError, match="the runtime cannot use a delta that adds vocabulary rows"):
        MultiTenantModel(base).attach("a", tmp_path / "d")


def test_added_vocabulary_with_distillation_refused(grown, calib_file, tmp_path, capsys):
    base, ft = grown
    assert_refused(capsys, ["compress", base, ft, "-o", tmp_path / "d", "--method", "bitdelta", "--distill-steps", 1,
                            "--calib", calib_file, "-q"],
                   "--distill-steps runs the base on the fine-tune's tokens, but the fine-tune adds vocabulary rows "
                   "to lm_head.weight; compress without --distill-steps", tmp_path)


def test_rows_removed_or_columns_added_still_refused(llama_pair, tmp_path, capsys):
    def shrink(sd):
        sd[EMB] = sd[EMB][:-2].clone()
    ft = edited_copy(llama_pair[1], tmp_path / "ft", shrink)
    rows = load_file(llama_pair[0] / "model.safetensors")[EMB].shape[0]
    assert_refused(capsys, ["compress", llama_pair[0], ft, "-o", tmp_path / "out", *FAST],
                   f"tensor {EMB} has shape [{rows}, 128] in the base but [{rows - 2}, 128] in the fine-tune", tmp_path)

    def widen(sd):  # columns added (a wider hidden size is not added vocabulary)
        sd[EMB] = torch.cat([sd[EMB], torch.zeros(sd[EMB].shape[0], 2)], 1)
    ft = edited_copy(llama_pair[1], tmp_path / "ft-wide", widen)
    err = assert_refused(capsys, ["compress", llama_pair[0], ft, "-o", tmp_path / "out", *FAST],
                         f"tensor {EMB} has shape [{rows}, 128] in the base but [{rows}, 130] in the fine-tune", tmp_path)
    assert err == (f"adamix: error: tensor {EMB} has shape [{rows}, 128] in the base but [{rows}, 130] in the fine-tune: "
                   "the two models do not match\n")

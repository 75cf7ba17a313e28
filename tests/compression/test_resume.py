"""Work is written block by block; a run killed with SIGKILL and rerun with --resume gives the same
bytes as an uninterrupted run; the output folder appears only complete."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adamix
from adamix import AdamixError
from adamix.io.streaming import save_streaming
from adamix.cli import main
from adamix.compression.partial import partial_dir

SRC = str(Path(adamix.__file__).parents[1])
TESTS = str(Path(__file__).parents[1])


@pytest.fixture(scope="module")
def reference(deep_pair, calib_file, tmp_path_factory):
    """The uninterrupted CLI run, in a child process like the interrupted ones."""
    out = tmp_path_factory.mktemp("ref") / "d"
    subprocess.run(compress_cmd(deep_pair, calib_file, out), check=True, env=child_env())
    return out


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}


def compress_cmd(pair, calib, out, *extra) -> list[str]:
    base, ft = pair
    return [sys.executable, "-m", "adamix.cli", "compress", str(base), str(ft), "-o", str(out), "--calib", str(calib),
            "--samples", "8", "--seqlen", "32", "--ratio", "1/8", "-q", *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A child process that dies by SIGKILL at a chosen point of the run.
KILLER = """
import os, signal, sys
import adamix.compression.partial as partial, adamix.io.artifact as artifact
where, count = sys.argv[1], int(sys.argv[2])
seen = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "after-chunk":
    write = partial.PartialRun.write
    def patched(self, *a, **k):
        write(self, *a, **k)
        seen[0] += 1
        if seen[0] == count:
            die()
    partial.PartialRun.write = patched
elif where == "mid-chunk":  # the chunk's tensors are on disk, its record is not
    atomic = partial._write_atomic
    def patched(path, write):
        if path.suffix == ".json" and path.name != "run.json":
            seen[0] += 1
            if seen[0] == count:
                write(path.with_name(path.name + ".tmp"))
                die()
        atomic(path, write)
    partial._write_atomic = patched
elif where == "final-write":  # the artifact is half written in its temporary folder
    save = artifact.save_streaming
    def patched(path, *a, **k):
        save(path, *a, **k)
        die()
    artifact.save_streaming = patched
from adamix.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, count", [("after-chunk", 1), ("after-chunk", 4), ("mid-chunk", 3), ("final-write", 1)])
def test_sigkill_then_resume_is_byte_identical(deep_pair, calib_file, reference, tmp_path, where, count):
    out = tmp_path / "d"
    cmd = compress_cmd(deep_pair, calib_file, out)
    r = subprocess.run([sys.executable, "-c", KILLER, where, str(count), *cmd[3:]], env=child_env(), capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not out.exists()                                   # nothing half-written at OUT
    assert partial_dir(out).is_dir()
    # without --resume the leftover work is not silently thrown away
    code = main(["compress", *cmd[4:6], "-o", str(out), "--calib", str(calib_file), "--samples", "8", "--seqlen", "32",
                 "--ratio", "1/8", "-q"])
    assert code == 2 and not out.exists()
    subprocess.run(cmd + ["--resume"], check=True, env=child_env())
    assert files(out) == files(reference)
    assert not partial_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]   # no temporary folder left behind


def test_sigkill_at_a_random_time_then_resume(deep_pair, calib_file, reference, tmp_path):
    """The issue's test: SIGKILL at a random moment (seeded) once work has started, then --resume."""
    rng = random.Random(5)
    out = tmp_path / "d"
    cmd = compress_cmd(deep_pair, calib_file, out)
    for attempt in range(5):
        proc = subprocess.Popen(cmd + ["--overwrite"], env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not any(partial_dir(out).glob("block-*.json")):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == -signal.SIGKILL and partial_dir(out).is_dir():
            break
    else:
        pytest.skip("the run finished before every kill; nothing to resume")
    assert not out.exists()
    subprocess.run(cmd + ["--resume"], check=True, env=child_env())
    assert files(out) == files(reference)


def test_resume_refuses_other_inputs(deep_pair, calib_file, tmp_path):
    out = tmp_path / "d"
    cmd = compress_cmd(deep_pair, calib_file, out)
    r = subprocess.run([sys.executable, "-c", KILLER, "after-chunk", "2", *cmd[3:]], env=child_env(), capture_output=True)
    assert r.returncode == -signal.SIGKILL
    base, ft = deep_pair
    with pytest.raises(AdamixError, match=r"made with alpha 0.125 \(now 0.0625\)"):
        adamix.compress(base, ft, out, ratio="1/16", calib=calib_file, samples=8, seqlen=32, resume=True, progress=False)
    with pytest.raises(AdamixError, match=r"made with samples 8 \(now 9\)"):
        adamix.compress(base, ft, out, ratio="1/8", calib=calib_file, samples=9, seqlen=32, resume=True, progress=False)
    assert not out.exists()


def test_resume_with_nothing_to_resume_just_runs(bert_pair, tmp_path):
    base, ft = bert_pair
    m = adamix.compress(base, ft, tmp_path / "d", ratio="1/8", calib=None, resume=True, progress=False)
    assert m["resumed_chunks"] == 0 and (tmp_path / "d" / "manifest.json").is_file()
    assert not partial_dir(tmp_path / "d").exists()


def test_phases_are_reported(bert_pair, calib_file, tmp_path):
    base, ft = bert_pair
    m = adamix.compress(base, ft, tmp_path / "d", ratio="1/8", calib=calib_file, samples=4, seqlen=32, progress=False)
    phases = m["seconds_by_phase"]
    for name in ("calibration", "svd", "error table", "ilp", "gptq", "read", "write"):
        assert phases.get(name, 0) > 0, name
    # phases of one thread add up to at most the wall time; an overlapped ILP runs beside them
    serial = sum(v for k, v in phases.items() if not (k == "ilp" and m["sizes"]["ilp_workers"]))
    assert serial <= m["sizes"]["wall_seconds"] + 0.05
    assert "seconds_by_phase" not in json.loads((tmp_path / "d" / "manifest.json").read_text())


def test_streaming_writer_gives_safetensors_own_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w.codes": torch.randint(0, 255, (7, 3), generator=g, dtype=torch.uint8),
               "a.params": torch.randn(5, generator=g).half(), "b": torch.randn(2, 2, generator=g),
               "c": torch.randn(3, generator=g).bfloat16(), "i": torch.arange(4, dtype=torch.int32),
               "s": torch.tensor(2.5, dtype=torch.float16), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "x"})
    save_file({k: tensors[k] for k in ("a.params", "i")}, str(tmp_path / "part.safetensors"))
    mixed = {k: (tmp_path / "part.safetensors" if k in ("a.params", "i") else v) for k, v in tensors.items()}
    save_streaming(tmp_path / "mine.safetensors", mixed, {"format": "x"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

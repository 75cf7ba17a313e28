"""`--executor ray`: the shards of a run as Ray tasks on a local Ray, byte for byte the single process's
artifact, also when a worker is killed mid-run; and its refusals, one line each, nothing written."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import adamix
from adamix.compression.ray_executor import work_dir

from test_shards import FILES, refused  # noqa: E402 (a sibling test module)

ray = pytest.importorskip("ray")

OPTS = dict(samples=4, seqlen=32, ratio="1/8", progress=False)


@pytest.fixture(scope="module")
def single(deep_pair, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "d"
    adamix.compress(*deep_pair, out, calib=calib_file, threads=1, **OPTS)
    return out


def shard_workers() -> list[int]:
    """PIDs of the Ray worker processes running a shard task."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and b"run_shard" in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def test_ray_run_is_byte_identical(deep_pair, calib_file, single, tmp_path):
    m = adamix.compress(*deep_pair, tmp_path / "r", calib=calib_file, executor="ray", workers=2, threads=1, **OPTS)
    assert m["sizes"]["workers"] == 2 and m["sizes"]["threads"] == 1
    for f in FILES:
        assert (tmp_path / "r" / f).read_bytes() == (single / f).read_bytes(), f
    assert not work_dir(tmp_path / "r").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_a_killed_worker_costs_time_not_correctness(deep_pair, calib_file, single, tmp_path):
    """SIGKILL every shard worker once the first chunk of any shard is on disk: Ray retries the tasks,
    they resume from their chunks, and the artifact is the same bytes."""
    killed = []

    def killer():
        work = work_dir(tmp_path / "r")
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if work.is_dir() and any(work.glob(".shard-*.adamix-partial/block-*.json")):
                for pid in shard_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    m = adamix.compress(*deep_pair, tmp_path / "r", calib=calib_file, executor="ray", workers=2, threads=1, **OPTS)
    t.join()
    assert killed, "no worker was killed: the run ended first"
    assert m["resumed_chunks"] >= 1  # a retried task resumed from what the killed one wrote
    for f in FILES:
        assert (tmp_path / "r" / f).read_bytes() == (single / f).read_bytes(), f


@pytest.mark.parametrize("args, message", [
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: cannot reach a Ray cluster there"),
    (["--workers", "2"], "--workers applies to --executor ray only"),
    (["--ray-address", "x:1"], "--ray-address applies to --executor ray only"),
    (["--executor", "ray", "--shard", "1/2"], "--executor ray makes its own shards: drop --shard"),
    (["--executor", "ray", "--workers", "0"], "--workers must be a positive integer, got 0"),
    (["--executor", "ray", "--workers", "64", "--threads", "1"], "--workers 64 x --threads 1 needs 64 cores"),
])
def test_ray_refusals(llama_pair, tmp_path, capsys, args, message):
    refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", "--calib", "none", "-q", *args], message, tmp_path)


def test_ray_missing_is_one_line(llama_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    refused(capsys, ["compress", *llama_pair, "-o", tmp_path / "out", "--calib", "none", "-q", "--executor", "ray"],
            "--executor ray needs Ray: pip install 'adamix[ray]'", tmp_path)

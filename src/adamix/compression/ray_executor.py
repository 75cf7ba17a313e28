"""`adamix compress ... --executor ray [--ray-address ADDR] --workers N`: the shards of one run as Ray
tasks, assembled into the artifact.

The run is split into N shards (compression.shards: contiguous shares of the blocks and of the data-free
tensors); each is one Ray task, `compress(..., shard=k/N, resume=True)`, that reads BASE and FT and
writes its shard folder into the run's work folder, OUT's hidden sibling `.OUT.adamix-ray/`. So the
paths must be the same on every machine of a cluster (a shared file system). A task asks Ray for the
CPUs it uses (`--threads`, default the cores / N on this machine) and, with `--device cuda`, a share
of a GPU. A task whose worker dies is retried by Ray (`max_retries`) and resumes from the chunks its
shard had written, so a lost worker costs time, not correctness. `--resume` continues a run whose
driver stopped: finished shards are kept, unfinished ones resume. Then `assemble` writes OUT, byte for
byte what a single process writes, and the work folder is removed.
Without `--ray-address`, Ray is started on this machine with its cores; with one, the run joins that
cluster. Ray is an optional dependency (`pip install 'adamix[ray]'`).
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import time
from pathlib import Path

from ..errors import AdamixError
from ..io.artifact import prepare_output
from ..threads import available_cores
from .options import Options
from .shards import SHARD_FILE, assemble

MAX_RETRIES = 3


def work_dir(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.adamix-ray"


def import_ray():
    try:
        import ray
    except ImportError:
        raise AdamixError("--executor ray needs Ray: pip install 'adamix[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line if nothing listens at ADDR (host:port; 'auto' and ray:// forms are left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise AdamixError(f"--ray-address {address}: cannot reach a Ray cluster there ({e})") from None


def plan_workers(opts: Options) -> tuple[int, int]:
    """(workers, threads per worker); refuses more threads than this machine's cores for a local Ray."""
    workers = opts.workers or 1
    threads = opts.threads or max(1, available_cores() // workers)
    if opts.ray_address is None and workers * threads > available_cores():
        raise AdamixError(f"--workers {workers} x --threads {threads} needs {workers * threads} cores; this machine "
                          f"has {available_cores()} (oversubscribed, dense factorisations slow down many times)")
    return workers, threads


def compress_ray(base: str, finetuned: str, out, **options) -> dict:
    """The whole run as Ray tasks (see the module doc); `options` as for adamix.compress. Returns the
    assembled manifest plus the run's facts (not in the file)."""
    t0 = time.time()
    opts = Options.from_kwargs(options)
    opts.settings()  # bad options: one line before anything starts
    ray = import_ray()
    out = prepare_output(out, opts.overwrite)
    workers, threads = plan_workers(opts)
    work = work_dir(out)
    if work.exists() and not opts.resume and not opts.overwrite:
        raise AdamixError(f"an interrupted run left {work}: pass --resume to continue it, or --overwrite to start over")
    if opts.ray_address is not None:
        check_reachable(opts.ray_address)
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if opts.ray_address is None:
                ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=opts.ray_address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ... for a cluster it cannot join
            raise AdamixError(f"cannot start or join Ray ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if work.exists() and not opts.resume:
        shutil.rmtree(work)  # --overwrite: the interrupted run's work is discarded
    work.mkdir(exist_ok=True)
    gpus = 0.0
    if opts.device.startswith("cuda"):
        total = ray.cluster_resources().get("GPU", 0.0)
        gpus = min(1.0, total / workers) if total else 0.0
    task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)(run_shard)
    shard_opts = dataclasses.replace(opts, executor="local", ray_address=None, workers=None, threads=threads,
                                     resume=True, overwrite=False, progress=False)
    folders = [work / f"shard-{k}-of-{workers}" for k in range(1, workers + 1)]
    try:
        pending = [task.remote(str(base), str(finetuned), str(f), shard_opts, k, workers)
                   for k, f in enumerate(folders, 1) if not (f / SHARD_FILE).is_file()]
        results = ray.get(pending)
    except ray.exceptions.RayTaskError as e:  # an AdamixError (bad input) inside a task: its one line
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
        if isinstance(cause, AdamixError):
            if not opts.resume:  # bad input found midway: the work is of no use (kept when resuming, e.g. a mismatch)
                shutil.rmtree(work, ignore_errors=True)
            raise cause from None
        raise
    finally:
        if started_here:
            ray.shutdown()
    manifest = assemble(folders, out, overwrite=opts.overwrite)
    shutil.rmtree(work, ignore_errors=True)
    manifest["sizes"]["wall_seconds"] = round(time.time() - t0, 2)
    manifest["sizes"]["threads"] = threads
    manifest["sizes"]["workers"] = workers
    manifest["sizes"]["peak_rss_mib"] = max((r["sizes"]["peak_rss_mib"] for r in results), default=0.0)
    phases: dict[str, float] = {}
    for r in results:
        for k, v in r["seconds_by_phase"].items():
            phases[k] = round(phases.get(k, 0.0) + v, 3)
    manifest["seconds_by_phase"] = phases  # summed over the workers
    manifest["resumed_chunks"] = sum(r["resumed_chunks"] for r in results)
    return manifest


def run_shard(base: str, finetuned: str, out: str, opts: Options, k: int, n: int) -> dict:
    """One Ray task: shard k of n, resuming the work a killed attempt left (opts.resume is set)."""
    from .pipeline import compress
    return compress(base, finetuned, out, **{**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)},
                                             "shard": f"{k}/{n}"})

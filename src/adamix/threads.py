"""How many CPU threads the linear algebra uses: every core this process may run on by default (or
OMP_NUM_THREADS where set), set for the duration of one compression and restored after, in torch's
pool and in the BLAS pools of the libraries scipy and numpy load (threadpoolctl: scipy's LAPACK
runs the eigensolver's reduction, quant.eigen).

Oversubscription is the trap: torch's thread pool sized to the machine, beside another busy process
on the same cores, makes dense factorisations many times slower. `--threads` gives a run fewer cores;
the run reports the count it used.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # a bare PYTHONPATH=src run (benchmarks/gpu_check.sh) without the declared dependency:
    threadpool_limits = None  # scipy's BLAS keeps its own thread count; torch's is still set


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """OMP_NUM_THREADS where the environment sets it (within the cores available), else every core."""
    cores = available_cores()
    try:
        return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS", cores))))
    except ValueError:
        return cores


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads and the BLAS libraries' threads set to n inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with nullcontext() if threadpool_limits is None else threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)

"""Build and load the package's C kernels (serve/kernels/*.c) with the system C compiler, via ctypes.

The kernels are plain C (no torch headers, no ninja): one `cc -O3 -march=native -shared` call, about a
second, on first use. The shared library is cached under $ADAMIX_CACHE/native/<key>/ (default
~/.cache/adamix), keyed by the source, the flags, the compiler's version and the CPU's feature flags,
and written atomically (several processes may build at once). Where no compiler works, `load` returns
None and says why once (`why_not`); callers fall back to torch. ADAMIX_NATIVE=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ...io.cache import cache_dir

CSRC = Path(__file__).parent
# -fassociative-math (with the flags it needs) lets the compiler vectorise the dot products' sums
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math"]
_why: dict[str, str] = {}

I64, PTR = ctypes.c_int64, ctypes.c_void_p


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def build(name: str) -> Path:
    """Compile <name>.c into a cached shared library (OpenMP if the compiler has it); its path.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    src = (CSRC / f"{name}.c").read_bytes()
    version = _run([cc, "--version"]).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), repr(version).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    out = cache_dir() / "native" / key / f"{name}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = _run([cc, *FLAGS, *extra, str(CSRC / f"{name}.c"), "-o", tmp])
        if r.returncode == 0:
            os.replace(tmp, out)
            return out
        os.unlink(tmp)
        errors.append(r.stderr.strip()[-2000:])
    raise RuntimeError(f"{cc} failed to build {name}.c: {errors[-1]}")


@functools.lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The kernels of <name>.c, built on first use; None (and a warning, once) if they cannot be."""
    if os.environ.get("ADAMIX_NATIVE", "1") == "0":
        _why[name] = "turned off by ADAMIX_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(build(name)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _why[name] = str(e)
        warnings.warn(f"adamix: the {name} kernels are not available ({e}); using torch instead", stacklevel=2)
        return None
    return lib


def why_not(name: str) -> str | None:
    """Why load(name) returned None (None if it did not, or was not called)."""
    return _why.get(name)


class LowbitPair(ctypes.Structure):
    """lowbit.c's lowbit_pair: the two factors of D^ = U^ V^ (V^ (k, n), U^T (k, m))."""
    _fields_ = [("k", I64), ("n", I64), ("m", I64),
                ("gv", I64), ("k8v", I64), ("q8v", PTR), ("q4v", PTR), ("sv", PTR), ("ov", PTR),
                ("gu", I64), ("k8u", I64), ("q8u", PTR), ("q4u", PTR), ("su", PTR), ("ou", PTR)]


class LowbitJob(ctypes.Structure):
    """lowbit.c's lowbit_job: rows row0 .. row0 + rows - 1 multiplied by one pair."""
    _fields_ = [("p", ctypes.POINTER(LowbitPair)), ("row0", I64), ("rows", I64)]


def lowbit() -> ctypes.CDLL | None:
    """lowbit.c with its argument types declared (see that file for the equations and layout)."""
    lib = load("lowbit")
    if lib is not None and not hasattr(lib, "_adamix_typed"):
        lib.lowbit_rowdot.argtypes = [I64, I64, I64, I64, PTR, I64, I64, PTR, PTR, PTR, PTR, PTR, I64]
        lib.lowbit_axpy.argtypes = [I64, I64, I64, I64, PTR, I64, PTR, PTR, PTR, PTR, PTR, I64, I64]
        lib.lowbit_lowrank.argtypes = [I64, PTR, I64, PTR, I64, ctypes.POINTER(LowbitPair), I64]
        lib.lowbit_dequantize.argtypes = [I64, I64, I64, I64, PTR, PTR, PTR, PTR, PTR, I64]
        lib.lowbit_dequantize_cols_t.argtypes = lib.lowbit_dequantize.argtypes
        lib.lowbit_lowrank_many.argtypes = [I64, ctypes.POINTER(LowbitJob), PTR, I64, PTR, I64, I64]
        for f in (lib.lowbit_rowdot, lib.lowbit_axpy, lib.lowbit_lowrank, lib.lowbit_dequantize,
                  lib.lowbit_dequantize_cols_t, lib.lowbit_lowrank_many):
            f.restype = None
        lib._adamix_typed = True
    return lib

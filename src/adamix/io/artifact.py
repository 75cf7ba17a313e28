"""The delta artifact: a folder with manifest.json, delta.safetensors and the fine-tune's config files.

manifest.json: see manifest.py (schema, building, checks).
delta.safetensors: for each entry the tensors "<name>.<suffix>" (e.g. ".codes" uint8, ".params" fp16,
  ".delta" fp16; ".new_rows" for a fine-tune that adds vocabulary rows, see vocab.py).
  finetune/: config.json and tokenizer files of the fine-tune, so that `merge` writes a complete model.
No pickle anywhere: loading never executes code from the file.

Reading (Artifact) refuses, with one AdamixError and nothing else, anything that is not such a
folder: unreadable or invalid JSON, another format or version, a malformed manifest (manifest.py),
an unreadable delta.safetensors, a stored tensor that is missing, extra, of another dtype than its
kind stores or of another byte count than the manifest says, and (when decoded) metadata that does
not match the stored tensors or a delta that decodes to NaN or Inf.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from ..errors import AdamixError, all_finite
from ..methods.kinds import decode, stored_dtypes
from ..version import __version__
from .dtypes import ITEMSIZE
from .manifest import FORMAT, FORMAT_VERSION, Manifest, check_accounting, check_manifest
from .streaming import save_streaming
from .vocab import NEW_ROWS, NEW_ROWS_DTYPES, entry_new_rows

MANIFEST = "manifest.json"
WEIGHTS = "delta.safetensors"
CONFIG_DIR = "finetune"


def prepare_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check that `out` can be written; returns it as a Path. Nothing is created yet."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AdamixError(f"{out} already exists (pass --overwrite to replace it)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise AdamixError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise AdamixError(f"cannot write {out}: folder {parent} is not writable")
    return out


class AtomicFolder:
    """Context manager: a temporary folder renamed onto `out` only if the block succeeds.

    The temporary folder is a hidden sibling of `out`, or lives in `within` (a folder on the same
    file system, e.g. the work folder of a compression, so that a killed run leaves nothing else)."""

    def __init__(self, out: Path, overwrite: bool, within: Path | None = None):
        self.out, self.overwrite, self.within = out, overwrite, within

    def __enter__(self) -> Path:
        where = self.within if self.within is not None else self.out.absolute().parent
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=where))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the artifact is an ordinary folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        os.replace(self.tmp, self.out)


def write_artifact(folder: Path, manifest: Manifest, tensors: Mapping[str, torch.Tensor | Path], config_files: list[Path]) -> None:
    """Write the three parts into `folder` (already created, normally an AtomicFolder).

    tensors: stored name -> tensor, or -> the safetensors file holding it (streamed, see save_streaming).
    The manifest's "sizes" are filled in here from the bytes actually written.
    """
    save_streaming(folder / WEIGHTS, tensors, {"format": FORMAT})
    (folder / CONFIG_DIR).mkdir()
    for f in config_files:
        shutil.copy2(f, folder / CONFIG_DIR / f.name)
    weights_bytes = (folder / WEIGHTS).stat().st_size
    sizes = manifest["sizes"]
    sizes["delta_safetensors_bytes"] = weights_bytes
    # The manifest states its own size: iterate to a fixed point; if the digits keep changing, pad the
    # shorter text with trailing spaces (valid JSON) to the size it states.
    sizes["manifest_bytes"] = 0
    for _ in range(20):
        total = weights_bytes + sizes["manifest_bytes"]
        sizes["total_bytes"] = total
        sizes["alpha_achieved"] = (total - sizes["raw_bytes"]) / sizes["fp16_bytes_method"] if sizes["fp16_bytes_method"] else 0.0
        text = json.dumps(manifest, separators=(",", ":"))
        if len(text.encode()) <= sizes["manifest_bytes"]:
            break
        sizes["manifest_bytes"] = len(text.encode()) + 2  # a little room for digits that change
    text += " " * (sizes["manifest_bytes"] - len(text.encode()))
    (folder / MANIFEST).write_text(text, encoding="utf-8")


class Artifact:
    """A delta artifact opened for reading: manifest checked, tensors verified, decoded on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath, wpath = self.path / MANIFEST, self.path / WEIGHTS
        if not mpath.is_file() or not wpath.is_file():
            raise AdamixError(f"{self.path}: not an adamix delta (needs {MANIFEST} and {WEIGHTS})")
        try:
            self.manifest = json.loads(mpath.read_bytes().decode("utf-8"))
        except OSError as e:
            raise AdamixError(f"{mpath}: cannot read ({e.strerror})") from None
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise AdamixError(f"{mpath}: invalid JSON ({str(e)[:120]})") from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise AdamixError(f"{mpath}: not an adamix manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise AdamixError(f"{mpath}: format version {m.get('format_version')!r} is not supported "
                              f"(this adamix {__version__} reads version {FORMAT_VERSION})")
        check_manifest(m, str(mpath))
        try:
            self._file = safe_open(str(wpath), framework="pt")
            self._stored = set(self._file.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise AdamixError(f"{wpath}: cannot read safetensors ({str(e)[:120]})") from None
        self._verify()
        check_accounting(m, str(mpath))

    def _verify(self) -> None:
        """Every entry's stored tensors exist with the dtypes its kind stores, their byte counts add up
        to the manifest's, and the file holds nothing else."""
        expected = set()
        for name, e in self.entries.items():
            stored = 0
            try:
                dtypes = self._dtypes(e)
            except AdamixError as err:
                raise AdamixError(f"manifest entry {name!r}: {err}") from None
            for suffix, dtype in dtypes.items():
                key = f"{name}.{suffix}"
                if key not in self._stored:
                    raise AdamixError(f"{self.path / WEIGHTS}: tensor {key} is missing")
                sl = self._file.get_slice(key)
                if sl.get_dtype() not in dtype.split("|"):
                    raise AdamixError(f"{self.path / WEIGHTS}: tensor {key} is {sl.get_dtype()}, "
                                      f"a {e['kind']} entry stores {dtype}")
                stored += math.prod(sl.get_shape()) * ITEMSIZE[sl.get_dtype()]
                expected.add(key)
            if stored != e["bytes"]:
                raise AdamixError(f"{name}: stored tensors take {stored} bytes, the manifest says {e['bytes']}")
        extra = self._stored - expected
        if extra:
            raise AdamixError(f"{self.path / WEIGHTS} holds tensors the manifest does not list: {sorted(extra)[:3]}")

    @staticmethod
    def _dtypes(entry: dict) -> dict[str, str]:
        """{suffix: allowed safetensors dtypes, "|"-separated} of the tensors `entry` stores."""
        dtypes = dict(stored_dtypes(entry["kind"]))
        if entry_new_rows(entry):
            dtypes[NEW_ROWS] = "|".join(NEW_ROWS_DTYPES)
        return dtypes

    @property
    def entries(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def new_rows(self, name: str) -> int:
        """Rows that tensor `name` has in the fine-tune beyond the base's (added vocabulary), else 0."""
        return entry_new_rows(self.entries[name])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return {s: self._file.get_tensor(f"{name}.{s}") for s in self._dtypes(self.entries[name])}
        except Exception as e:  # safetensors' own error types: the file changed or is damaged
            raise AdamixError(f"{self.path / WEIGHTS}: cannot read the tensors of {name} ({str(e)[:120]})") from None

    def delta(self, name: str) -> torch.Tensor:
        """D^ for tensor `name` in the model's own shape, float32. For an entry that adds k rows (see
        vocab.py) the last k rows are the fine-tune's rows (the delta against zero rows)."""
        e = self.entries[name]
        shape, meta, tensors = tuple(e["shape"]), e.get("meta", {}), self.tensors(name)
        k = self.new_rows(name)
        try:
            if k:
                rows = tensors.pop(NEW_ROWS)
                if tuple(rows.shape) != (k, shape[1]):
                    raise AdamixError(f"{NEW_ROWS} has shape {list(rows.shape)}, the manifest says [{k}, {shape[1]}]")
                D = torch.cat([decode(e["kind"], (shape[0] - k, shape[1]), meta, tensors), rows.float()])
            elif e.get("transposed"):
                D = decode(e["kind"], shape[::-1], meta, tensors).T.contiguous()
            else:
                D = decode(e["kind"], shape, meta, tensors)
        except AdamixError as err:  # the decoders do not know the tensor's name
            raise AdamixError(f"{name}: {err}") from None
        if not all_finite(D):
            raise AdamixError(f"{name}: the stored delta decodes to NaN or Inf (corrupted artifact?)")
        return D

    def check_base(self, fingerprint: str) -> None:
        want = self.manifest.get("base_fingerprint")
        if fingerprint != want:
            raise AdamixError(f"wrong base model: its fingerprint is {fingerprint[:16]}, "
                              f"the delta was made against {str(want)[:16]}")


def load(path: str | os.PathLike) -> Artifact:
    """Open and verify an artifact (see Artifact)."""
    return Artifact(path)

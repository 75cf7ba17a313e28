"""The work folder of a compression in progress, written chunk by chunk so that memory holds one
transformer block and an interrupted run resumes where it stopped (`adamix compress --resume`).

The folder is OUT's hidden sibling `.<OUT name>.adamix-partial/`:
  run.json              what the result depends on: tool and format version, the method's settings,
                        the base's fingerprint, the fine-tune's tensor table and file sizes, the
                        calibration text's sha256; `--resume` refuses a folder written for other inputs
  <chunk>.safetensors   the stored tensors of the chunk's entries
  <chunk>.json          {"names": every tensor the chunk covered (zero deltas included), "entries":
                        their manifest entries}; renamed into place last, so a chunk whose .json exists
                        is complete (a SIGKILL leaves at most a stray .tmp file, which is ignored)
  pass1/                --budget-scope model only (compression.model_scope): the first pass's chunks
                        (Stash: each matrix's stashed analysis, the layer weights, the allocation)
Chunks are "block-0003" (the linears of a calibrated block) and "rest-<tensor name>" (one data-free
tensor each). The final artifact is assembled from the chunks in a separate temporary folder and renamed
onto OUT (io.artifact.AtomicFolder); only then is the work folder removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AdamixError

RUN_FILE = "run.json"


def partial_dir(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.adamix-partial"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def first_difference(old: dict, new: dict) -> str:
    """'alpha 0.125 (now 0.0625)' for the first key (depth first, sorted) whose value differs."""
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return first_difference(a, b)
        elif a != b:
            short = lambda v: v[:16] if isinstance(v, str) and len(v) == 64 else v  # noqa: E731  (sha256 digests)
            return f"{k} {short(a)} (now {short(b)})"
    return "run"


def tensor_files(folder: Path, chunks: list[str]) -> dict[str, Path]:
    """Stored tensor name -> the file of `chunks` (in that order) in `folder` that holds it."""
    where = {}
    for chunk in chunks:
        path = folder / f"{chunk}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    return where


def block_chunk(i: int) -> str:
    """The chunk of block i's linears."""
    return f"block-{i:04d}"


def rest_chunk(name: str) -> str:
    """The chunk of one data-free tensor."""
    return "rest-" + name.replace(os.sep, "_")


class Stash:
    """Chunks of intermediate results in `folder` (created on the first write): <chunk>.safetensors
    written first, then <chunk>.json (any JSON-able record) renamed into place, which marks it complete."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write(self, chunk: str, record, tensors: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(exist_ok=True)
        _write_atomic(self.folder / f"{chunk}.safetensors",
                      lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
        _write_atomic(self.folder / f"{chunk}.json", lambda p: p.write_text(json.dumps(record, sort_keys=True)))

    def done(self, chunk: str):
        """The chunk's record if it was completed, else None."""
        path = self.folder / f"{chunk}.json"
        if not path.is_file() or not (self.folder / f"{chunk}.safetensors").is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise AdamixError(f"{path} is damaged; rerun without --resume (and --overwrite)") from None

    def read(self, chunk: str, keys: list[str] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
        """The chunk's tensors `keys` (default: all those whose name starts with `prefix`)."""
        with safe_open(str(self.folder / f"{chunk}.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else
                                                  [k for k in f.keys() if k.startswith(prefix)])}


class PartialRun:
    """The chunks written so far for one run, identified by `key` (a JSON-able dict).

    resume False: an existing work folder is an error unless `overwrite` (it holds an interrupted
    run's work); resume True: an existing folder must have been made with the same key.
    """

    def __init__(self, out: Path, key: dict, resume: bool, overwrite: bool):
        self.folder = partial_dir(out)
        self.key = json.loads(json.dumps(key))
        run_file = self.folder / RUN_FILE
        if self.folder.exists() and not resume:
            if not overwrite:
                raise AdamixError(f"an interrupted run left {self.folder}: pass --resume to continue it, "
                                  "or --overwrite to start over")
            shutil.rmtree(self.folder)
        if self.folder.exists():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict):
                raise AdamixError(f"{self.folder} is not a readable adamix work folder; remove it or pass --overwrite")
            if old != self.key:
                raise AdamixError(f"cannot resume from {self.folder}: it was made with {first_difference(old, self.key)}; "
                                  "rerun without --resume, with --overwrite")
        else:
            self.folder.mkdir()
            _write_atomic(run_file, lambda p: p.write_text(json.dumps(self.key, indent=1, sort_keys=True)))
        self.resumed = self.chunks()

    def done(self, chunk: str) -> dict | None:
        """The chunk's record ({"names", "entries"}) if it was completed, else None."""
        return Stash(self.folder).done(chunk)

    def write(self, chunk: str, names: list[str], entries: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
        """Store one chunk: tensors first, then the record that marks it complete."""
        Stash(self.folder).write(chunk, {"names": sorted(names), "entries": entries}, tensors)

    @property
    def pass1(self) -> Stash:
        """The first pass's chunks of a two-pass run (compression.model_scope)."""
        return Stash(self.folder / "pass1")

    def chunks(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json") if p.name != RUN_FILE)

    def entries(self) -> dict[str, dict]:
        """Every completed chunk's manifest entries, by tensor name."""
        out = {}
        for chunk in self.chunks():
            out.update(self.done(chunk)["entries"])
        return out

    def tensor_files(self) -> dict[str, Path]:
        """Stored tensor name -> the chunk file holding it."""
        return tensor_files(self.folder, self.chunks())

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors `keys`, each chunk file opened once."""
        where = self.tensor_files()
        out = {}
        for path in sorted({where[k] for k in keys}):
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if where[k] == path})
        return out

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PartialRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Remove the folder when the run succeeded (the artifact is in place) or stopped on bad input
        (AdamixError: rerunning cannot use the work); keep it after an interruption, a file-system
        error or a crash, for --resume."""
        if exc_type is None or issubclass(exc_type, AdamixError):
            self.remove()

"""Shards: one compression split over several processes or machines, then assembled.

`adamix compress BASE FT -o S2 --shard 2/4` compresses share 2 of 4: a contiguous quarter of the
calibrated blocks (it still forwards the calibration text through the earlier blocks, which is cheap
next to compressing them) and a contiguous quarter of the data-free tensors (name order). Its folder:
  shard.json            {"format": "adamix-shard", "shard": [k, N], "key": the run's key (inputs,
                        settings, versions: compression.partial), "names": every tensor the whole run
                        covers, "covered": this shard's, "chunks": its chunk names, "manifest": what
                        the artifact's manifest is built from (fingerprints, dropped, settings)}
  <chunk>.json / .safetensors   the chunks, as in the work folder (compression.partial)
  finetune/             the fine-tune's config and tokenizer files
written atomically, so a shard folder with shard.json is a finished shard.
`adamix assemble S1 ... SN -o OUT` checks that the shards come from the same key, that shards 1..N
are all there once each and cover every tensor exactly once, and writes the artifact from their
chunks: byte for byte the artifact of a single run with the same inputs and settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import AdamixError
from ..io.artifact import AtomicFolder, prepare_output, write_artifact
from ..io.manifest import build_manifest
from ..methods import Settings
from .partial import PartialRun, first_difference, tensor_files

SHARD_FILE = "shard.json"
SHARD_FORMAT = "adamix-shard"
CONFIG_DIR = "finetune"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4); None -> None; anything else one AdamixError."""
    if text is None:
        return None
    parts = str(text).split("/")
    try:
        k, n = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        k, n = 0, 0
    if not 1 <= k <= n:
        raise AdamixError(f"--shard must be K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return k, n


def share(count: int, shard: tuple[int, int]) -> range:
    """The contiguous share [floor((k-1) count / N), floor(k count / N)) of `count` items for shard k of N."""
    k, n = shard
    return range((k - 1) * count // n, k * count // n)


def write_shard(out: Path, overwrite: bool, work: PartialRun, key: dict, shard: tuple[int, int], names: list[str],
                covered: list[str], manifest_inputs: dict, config_files: list[Path]) -> None:
    """Write the shard folder `out` from the finished chunks of `work` (atomically); key: the run's key
    without the shard (the same for every shard of the run)."""
    chunks = work.chunks()
    record = {"format": SHARD_FORMAT, "shard": list(shard), "key": json.loads(json.dumps(key)), "names": sorted(names),
              "covered": sorted(covered), "chunks": chunks, "manifest": manifest_inputs}
    with AtomicFolder(out, overwrite, within=work.folder) as tmp:
        for chunk in chunks:
            for ext in (".safetensors", ".json"):
                shutil.copyfile(work.folder / f"{chunk}{ext}", tmp / f"{chunk}{ext}")
        (tmp / CONFIG_DIR).mkdir()
        for f in config_files:
            shutil.copy2(f, tmp / CONFIG_DIR / f.name)
        (tmp / SHARD_FILE).write_text(json.dumps(record, indent=1))  # key order kept: the manifest follows it


def read_shard(folder: Path) -> dict:
    """A finished shard's record, checked for form; one AdamixError otherwise."""
    path = folder / SHARD_FILE
    if not folder.is_dir():
        raise AdamixError(f"{folder}: no such shard folder")
    if not path.is_file():
        raise AdamixError(f"{folder}: not a finished adamix shard (no {SHARD_FILE}; an unfinished shard leaves only "
                          "its work folder: rerun it with --resume)")
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdamixError(f"{path}: unreadable ({e})") from None
    ok = (isinstance(rec, dict) and rec.get("format") == SHARD_FORMAT and isinstance(rec.get("key"), dict)
          and isinstance(rec.get("shard"), list) and len(rec["shard"]) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in rec["shard"])
          and 1 <= rec["shard"][0] <= rec["shard"][1]
          and all(isinstance(rec.get(k), list) and all(isinstance(s, str) for s in rec[k]) for k in ("names", "covered", "chunks"))
          and isinstance(rec.get("manifest"), dict))
    if not ok:
        raise AdamixError(f"{path}: not an adamix shard record")
    for chunk in rec["chunks"]:
        if os.sep in chunk or chunk.startswith(".") or not all((folder / f"{chunk}{ext}").is_file() for ext in (".json", ".safetensors")):
            raise AdamixError(f"{folder}: chunk {chunk!r} is missing")
    return rec


def assemble(shards: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Check the shard folders and write the artifact `out` from their chunks; returns its manifest."""
    out = prepare_output(out, overwrite)
    folders = [Path(s) for s in shards]
    if not folders:
        raise AdamixError("assemble needs the shard folders")
    recs = [read_shard(f) for f in folders]
    first = recs[0]
    n = first["shard"][1]
    for f, rec in zip(folders[1:], recs[1:]):
        if rec["key"] != first["key"]:
            raise AdamixError(f"{f} comes from other inputs or settings than {folders[0]}: "
                              f"{first_difference(first['key'], rec['key'])}")
        if rec["shard"][1] != n or rec["names"] != first["names"] or rec["manifest"] != first["manifest"]:
            raise AdamixError(f"{f} is shard {rec['shard'][0]}/{rec['shard'][1]} of a run split in {rec['shard'][1]}, "
                              f"{folders[0]} of one split in {n}")
    seen: dict[int, Path] = {}
    for f, rec in zip(folders, recs):
        k = rec["shard"][0]
        if k in seen:
            raise AdamixError(f"shard {k}/{n} is given twice ({seen[k]} and {f})")
        seen[k] = f
    if missing := [k for k in range(1, n + 1) if k not in seen]:
        raise AdamixError(f"shard {missing[0]}/{n} is missing (given: {', '.join(f'{k}/{n}' for k in sorted(seen))})")
    owner: dict[str, Path] = {}
    for f, rec in zip(folders, recs):
        for name in rec["covered"]:
            if name in owner:
                raise AdamixError(f"tensor {name} is in both {owner[name]} and {f}")
            owner[name] = f
    if uncovered := sorted(set(first["names"]) - set(owner)):
        raise AdamixError(f"no shard covers tensor {uncovered[0]} ({len(uncovered)} in all)")
    where = {chunk: f for f, rec in zip(folders, recs) for chunk in rec["chunks"]}
    entries, sources = {}, {}
    for chunk in sorted(where):  # the single run's order: chunks by name
        entries.update(json.loads((where[chunk] / f"{chunk}.json").read_text())["entries"])
        sources.update(tensor_files(where[chunk], [chunk]))
    mi = first["manifest"]
    manifest = build_manifest(mi["base_fingerprint"], mi["finetune_config_fingerprint"], entries, mi["dropped"],
                              Settings(**{**mi["settings"], "widths": tuple(mi["settings"]["widths"])}), mi["extra"])
    config = sorted((folders[0] / CONFIG_DIR).iterdir()) if (folders[0] / CONFIG_DIR).is_dir() else []
    with AtomicFolder(out, overwrite) as tmp:
        write_artifact(tmp, manifest, sources, config)
    return manifest

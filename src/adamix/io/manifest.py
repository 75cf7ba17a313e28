"""The manifest of a delta artifact (manifest.json): its schema, how it is built from encoded
tensors, and the checks made before anything is read or decoded (used by artifact.Artifact).

Schema (format "adamix-delta", version 1; `Manifest` and `Entry` below):
  format, format_version, tool_version, method, settings (the methods' Settings plus calibration,
  samples, seqlen, device, seed and any whole-model step's record), alpha (asked), base_fingerprint
  (sha256 of the base's tensors), finetune_config_fingerprint, dropped (tensors of the base that the
  fine-tune lacks, e.g. non-float buffers), sizes (`Sizes`), tensors: {name: Entry}.
  Entry: kind (a stored kind, methods.kinds: svd-mixed, rows, raw, bitdelta, lowrank), shape (of the
  weight as stored in the model), dtype (the base tensor's safetensors dtype), transposed (Conv1D
  weights: the method saw W^T), meta (kind-specific; new_rows for added vocabulary, see vocab.py),
  bytes (of its stored tensors), stats (error_predicted, error_measured, energy, rank_kept, ...).

A truncated, corrupted or hand-edited manifest must give one AdamixError, never another exception
and never an absurd allocation. Checked here:
  - top level: method (text), alpha (finite number), base_fingerprint (text), dropped (a list of
    names), sizes (raw_bytes, method_bytes, fp16_bytes_method, total_bytes: integers >= 0;
    alpha_achieved: a finite number), tensors (an object);
  - every entry: kind (text; whether it is known is checked by the reader), shape (a list of at most
    MAX_DIMS integers, each in 1..MAX_DIM, at most MAX_ELEMENTS elements in all), bytes (integer
    >= 0), transposed (bool; true only for 2-D), dtype (text), meta (an object whose group_size /
    widths, where present, are well-formed, see methods.kinds.parse_width_meta, and what a kind
    registers with methods.kinds.register_meta_check holds; new_rows, see
    vocab.py), stats (an object whose error and energy figures are finite numbers);
  - the manifest's own accounting (check_accounting, once the stored byte counts are verified):
    sizes.raw_bytes, method_bytes and fp16_bytes_method are the sums over the entries (bytes of raw
    entries; bytes and 2 x elements of the others), so that an edited shape is caught even for an
    entry that keeps nothing (whose stored bytes cannot contradict it).
The stored tensors (presence, dtype, byte counts) are checked by Artifact._verify, and each decoder
checks the sizes its metadata implies against the stored tensors before it decodes.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from numbers import Real
from typing import Callable, TypedDict

import torch

from ..errors import AdamixError
from ..methods import Encoded, Settings
from ..methods.kinds import MAX_COUNT, META_CHECKS, check_meta, is_int, is_raw, parse_width_meta
from ..version import __version__
from .vocab import NEW_ROWS

FORMAT = "adamix-delta"
FORMAT_VERSION = 1


class _EntryRequired(TypedDict):
    kind: str
    shape: list[int]
    bytes: int


class Entry(_EntryRequired, total=False):
    """One stored tensor (see the module doc). The writer writes every field; the reader requires
    kind, shape and bytes and reads the others with their defaults ("", False, {}, {})."""
    dtype: str
    transposed: bool
    meta: dict
    stats: dict


class Sizes(TypedDict, total=False):
    """Byte accounting: raw_bytes (raw kinds), method_bytes and fp16_bytes_method (the compressed
    tensors' bytes and their fp16 size), delta_safetensors_bytes, manifest_bytes, total_bytes, and
    alpha_achieved = (total - raw) / fp16_bytes_method."""
    raw_bytes: int
    method_bytes: int
    fp16_bytes_method: int
    delta_safetensors_bytes: int
    manifest_bytes: int
    total_bytes: int
    alpha_achieved: float


class _ManifestOptional(TypedDict, total=False):
    dropped: list[str]


class Manifest(_ManifestOptional):
    """The whole manifest (see the module doc); every field but `dropped` (default []) is required."""
    format: str
    format_version: int
    tool_version: str
    method: str
    settings: dict
    alpha: float
    base_fingerprint: str
    finetune_config_fingerprint: str
    sizes: Sizes
    tensors: dict[str, Entry]


def encoded_entries(encoded: dict[str, tuple[Encoded, bool]],
                    dtype_of: Callable[[str], str]) -> tuple[dict[str, Entry], dict[str, torch.Tensor]]:
    """The entries {name: Entry} and stored tensors {"<name>.<suffix>": tensor} of encoded deltas
    {name: (Encoded, transposed)}; dtype_of(name): the base tensor's safetensors dtype."""
    entries, tensors = {}, {}
    for name in sorted(encoded):
        enc, transposed = encoded[name]
        shape = list(enc.shape[::-1] if transposed else enc.shape)
        entries[name] = Entry(kind=enc.kind, shape=shape, dtype=dtype_of(name), transposed=transposed,
                              meta=enc.meta, bytes=enc.nbytes,
                              stats={k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in enc.stats.items()})
        for suffix, t in enc.tensors.items():
            tensors[f"{name}.{suffix}"] = t
    return entries, tensors


def encoded_from_entry(entry: Entry, tensors: dict[str, torch.Tensor]) -> tuple[Encoded, bool]:
    """Inverse of encoded_entries for one entry (in-memory `detail` is not stored)."""
    shape = tuple(entry["shape"])
    transposed = bool(entry.get("transposed"))
    return Encoded(entry["kind"], shape[::-1] if transposed else shape, entry.get("meta", {}), dict(tensors),
                   dict(entry.get("stats", {}))), transposed


def build_manifest(base_fingerprint: str, finetune_config_fingerprint: str, entries: dict[str, Entry],
                   dropped: list[str], settings: Settings, extra: dict) -> Manifest:
    """The manifest of an artifact holding `entries` (the file sizes are filled in by
    artifact.write_artifact). extra: the run's other settings (calibration, samples, ...)."""
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, tool_version=__version__, method=settings.method,
        settings={**asdict(settings), **extra}, alpha=settings.alpha,
        base_fingerprint=base_fingerprint, finetune_config_fingerprint=finetune_config_fingerprint,
        dropped=dropped,
        sizes=size_totals(entries),
        tensors={name: entries[name] for name in sorted(entries)},
    )

MAX_DIMS = 8
MAX_DIM = MAX_COUNT
MAX_ELEMENTS = 2**33  # 32 GiB of float32: more than any one weight of today's open models (4.7e9 at most)
SIZE_KEYS = ("raw_bytes", "method_bytes", "fp16_bytes_method", "total_bytes")
STAT_KEYS = ("error_predicted", "error_measured", "energy")


def is_number(v) -> bool:
    """A finite int or float (not a bool) that fits a float."""
    if not isinstance(v, Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def check_manifest(m: dict, where: str) -> None:
    """Everything but format and version (checked by the caller); raises AdamixError naming `where`."""
    def bad(what: str) -> AdamixError:
        return AdamixError(f"{where}: {what}")

    missing = sorted(Manifest.__required_keys__ - set(m))
    if missing:
        raise bad(f"the manifest has no {missing[0]!r} field")

    if not isinstance(m.get("method"), str):
        raise bad(f"method {m.get('method')!r} is not a name")
    if not is_number(m.get("alpha")):
        raise bad(f"alpha {m.get('alpha')!r} is not a number")
    if not isinstance(m.get("base_fingerprint"), str):
        raise bad("base_fingerprint is missing or not text")
    dropped = m.get("dropped", [])
    if not isinstance(dropped, list) or not all(isinstance(n, str) for n in dropped):
        raise bad("dropped must be a list of tensor names")
    sizes = m.get("sizes")
    if not isinstance(sizes, dict):
        raise bad("manifest has no sizes")
    for key in SIZE_KEYS:
        if not is_int(sizes.get(key)) or sizes[key] < 0:
            raise bad(f"sizes.{key} {sizes.get(key)!r} is not a byte count")
    if not is_number(sizes.get("alpha_achieved")):
        raise bad(f"sizes.alpha_achieved {sizes.get('alpha_achieved')!r} is not a number")
    tensors = m.get("tensors")
    if not isinstance(tensors, dict):
        raise bad("manifest has no tensor table")
    for name, e in tensors.items():
        check_entry(name, e)


def size_totals(entries: dict[str, dict]) -> Sizes:
    """The manifest's accounting: raw_bytes (entries of raw kinds), method_bytes and fp16_bytes_method
    (every other entry: its stored bytes, and 2 bytes per element of its shape)."""
    raw = method = fp16 = 0
    for e in entries.values():
        if is_raw(e["kind"]):
            raw += e["bytes"]
        else:
            method += e["bytes"]
            fp16 += 2 * math.prod(e["shape"])
    return Sizes(fp16_bytes_method=fp16, method_bytes=method, raw_bytes=raw)


def check_accounting(m: dict, where: str) -> None:
    """sizes.raw_bytes, method_bytes and fp16_bytes_method are the sums over the entries (a manifest
    that passed check_manifest). Called after the stored byte counts are verified, before decoding."""
    for key, total in size_totals(m["tensors"]).items():
        if m["sizes"][key] != total:
            raise AdamixError(f"{where}: sizes.{key} is {m['sizes'][key]} but the tensor table adds up to {total} "
                              "(edited shapes or byte counts?)")


def check_entry(name: str, e) -> None:
    """One tensor entry (see module doc)."""
    if not isinstance(e, dict):
        raise AdamixError(f"manifest entry {name!r} is malformed (not an object)")
    missing = sorted(Entry.__required_keys__ - set(e))
    if missing:
        raise AdamixError(f"manifest entry {name!r} has no {missing[0]!r} field")
    if not isinstance(e.get("kind"), str):
        raise AdamixError(f"manifest entry {name!r} is malformed (kind {e.get('kind')!r})")
    shape = e.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(is_int(d) and 1 <= d <= MAX_DIM for d in shape)):
        raise AdamixError(f"manifest entry {name!r}: shape {shape!r} is not a list of dimensions in 1..{MAX_DIM}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise AdamixError(f"manifest entry {name!r}: shape {shape} has {numel} elements, more than "
                          f"{MAX_ELEMENTS} (hand-edited?)")
    if not is_int(e.get("bytes")) or e["bytes"] < 0:
        raise AdamixError(f"manifest entry {name!r}: bytes {e.get('bytes')!r} is not a byte count")
    if not isinstance(e.get("transposed", False), bool) or (e.get("transposed") and len(shape) != 2):
        raise AdamixError(f"manifest entry {name!r}: transposed must be true or false, and true only for a matrix")
    if not isinstance(e.get("dtype", ""), str):
        raise AdamixError(f"manifest entry {name!r}: dtype must be text")
    meta = e.get("meta", {})
    if not isinstance(meta, dict):
        raise AdamixError(f"manifest entry {name!r}: meta must be an object")
    if "widths" in meta or "group_size" in meta or e["kind"] in META_CHECKS:
        try:
            if e["kind"] in META_CHECKS:
                check_meta(e["kind"], tuple(shape), meta)
            else:
                parse_width_meta(meta, e["kind"])
        except AdamixError as err:
            raise AdamixError(f"manifest entry {name!r}: {err}") from None
    if NEW_ROWS in meta:
        k = meta[NEW_ROWS]
        if not is_int(k) or len(shape) != 2 or not 1 <= k < shape[0] or e.get("transposed", False):
            raise AdamixError(f"manifest entry {name!r}: {NEW_ROWS} {k!r} does not fit shape {shape}")
    stats = e.get("stats", {})
    if not isinstance(stats, dict) or not all(is_number(stats[k]) for k in STAT_KEYS if k in stats):
        raise AdamixError(f"manifest entry {name!r}: stats are malformed")

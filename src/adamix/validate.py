"""Checks of a delta artifact's manifest before anything is read or decoded (used by artifact.Artifact).

A truncated, corrupted or hand-edited manifest must give one AdamixError, never another exception
and never an absurd allocation. Checked here:
  - top level: method (text), alpha (finite number), base_fingerprint (text), dropped (a list of
    names), sizes (raw_bytes, method_bytes, fp16_bytes_method, total_bytes: integers >= 0;
    alpha_achieved: a finite number), tensors (an object);
  - every entry: kind (text; whether it is known is checked by the reader), shape (a list of at most
    MAX_DIMS integers, each in 1..MAX_DIM, at most MAX_ELEMENTS elements in all), bytes (integer
    >= 0), transposed (bool; true only for 2-D), dtype (text), meta (an object whose group_size /
    widths, where present, are well-formed, see methods.base.parse_width_meta; new_rows, see
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
from numbers import Integral, Real

from .errors import AdamixError
from .methods.base import MAX_COUNT, parse_width_meta
from .vocab import NEW_ROWS

MAX_DIMS = 8
MAX_DIM = MAX_COUNT
MAX_ELEMENTS = 2**33  # 32 GiB of float32: more than any one weight of today's open models (4.7e9 at most)
SIZE_KEYS = ("raw_bytes", "method_bytes", "fp16_bytes_method", "total_bytes")
STAT_KEYS = ("error_predicted", "error_measured", "energy")


def is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


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


def size_totals(entries: dict[str, dict]) -> dict[str, int]:
    """The manifest's accounting: raw_bytes (raw entries), method_bytes and fp16_bytes_method (every
    other entry: its stored bytes, and 2 bytes per element of its shape)."""
    raw = method = fp16 = 0
    for e in entries.values():
        if e["kind"] == "raw":
            raw += e["bytes"]
        else:
            method += e["bytes"]
            fp16 += 2 * math.prod(e["shape"])
    return {"fp16_bytes_method": fp16, "method_bytes": method, "raw_bytes": raw}


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
    if "widths" in meta or "group_size" in meta:
        try:
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

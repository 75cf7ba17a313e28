"""The stored kinds: what every method produces (an `Encoded` tensor), and how each kind is decoded.

A method sees one delta D (m x n, oriented as y = W x: m outputs, n inputs) and the Gram H of its
inputs (n x n, or None in the data-free mode) and returns an Encoded: a kind, JSON-able metadata, and
the tensors to store (names are suffixes; the artifact prefixes them with the weight's name).
`decode(kind, meta, tensors)` inverts it to D^ (m x n float32); it is the single reconstruction path
used both in memory and after loading from disk, so both are bit-for-bit equal.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import AdamixError


@dataclass
class Encoded:
    kind: str
    shape: tuple[int, int]
    meta: dict
    tensors: dict[str, torch.Tensor]
    stats: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)  # in-memory only (e.g. width per singular index), never stored

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


Decoder = Callable[[tuple[int, ...], dict, dict[str, torch.Tensor]], torch.Tensor]
DECODERS: dict[str, Decoder] = {}
SUFFIXES: dict[str, dict[str, str]] = {}  # kind -> {suffix: safetensors dtype, e.g. "U8"}
RAW_KINDS: set[str] = set()  # kinds that store the delta as it is (reported apart from the compressed ones)


def register_decoder(kind: str, suffixes: dict[str, str], raw: bool = False) -> Callable[[Decoder], Decoder]:
    """Register the decoder of a stored kind, the tensor suffixes every entry of it must have and the
    safetensors dtype of each ({"codes": "U8", "params": "F16"}); the reader refuses any other dtype.
    raw: the kind stores the delta uncompressed (1-D tensors, tiny matrices); its bytes are counted
    apart from the compressed tensors' in the artifact's sizes and achieved ratio."""
    def wrap(fn: Decoder) -> Decoder:
        DECODERS[kind] = fn
        SUFFIXES[kind] = dict(suffixes)
        if raw:
            RAW_KINDS.add(kind)
        return fn
    return wrap


def is_raw(kind: str) -> bool:
    """Whether `kind` stores its delta uncompressed (see register_decoder)."""
    return kind in RAW_KINDS


def stored_suffixes(kind: str) -> tuple[str, ...]:
    """The tensors ("<name>.<suffix>") an entry of `kind` stores."""
    return tuple(stored_dtypes(kind))


def stored_dtypes(kind: str) -> dict[str, str]:
    """{suffix: safetensors dtype} of the tensors an entry of `kind` stores."""
    if not isinstance(kind, str) or kind not in SUFFIXES:
        raise AdamixError(f"unknown tensor kind {kind!r} in artifact")
    return SUFFIXES[kind]


def decode(kind: str, shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """D^ for a stored tensor, float32 of `shape`."""
    if not isinstance(kind, str) or kind not in DECODERS:
        raise AdamixError(f"unknown tensor kind {kind!r} in artifact")
    return DECODERS[kind](tuple(shape), meta, tensors)


Factors = Callable[[tuple[int, ...], dict, dict[str, torch.Tensor]], "tuple[torch.Tensor, torch.Tensor] | None"]
FACTORS: dict[str, Factors] = {}
RANKS: dict[str, Callable[[dict], int]] = {}


def register_factors(kind: str, rank: Callable[[dict], int]) -> Callable[[Factors], Factors]:
    """Declare that `kind` stores a low-rank delta: fn(shape, meta, tensors) -> (U (m, k), V (k, n))
    float32 with D^ = U V (any scale folded into U), or None where that tensor is not low-rank;
    rank(meta) -> k from the (validated) metadata alone, without reading the tensors.
    The runtime applies such deltas as x -> U (V x) and export-peft writes them as LoRA."""
    def wrap(fn: Factors) -> Factors:
        FACTORS[kind] = fn
        RANKS[kind] = rank
        return fn
    return wrap


def factor_rank(kind: str, meta: dict) -> int | None:
    """The rank k of a low-rank entry (register_factors), None for every other kind (or metadata
    that does not say: the stored tensors are checked only when they are read)."""
    fn = RANKS.get(kind)
    try:
        k = None if fn is None else fn(meta)
    except (KeyError, TypeError, ValueError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) and k >= 0 else None


def low_rank_factors(kind: str, shape: tuple[int, ...], meta: dict,
                     tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (m, k), V (k, n)) float32 with U V == decode(kind, ...) for kinds registered with
    register_factors; None for every other kind (raw, rows, ...: use the dense D^)."""
    fn = FACTORS.get(kind)
    if fn is None or len(shape) != 2:
        return None
    return fn(tuple(shape), meta, tensors)


Gains = Callable[[tuple[int, ...], dict, dict[str, torch.Tensor]], "torch.Tensor | None"]
GAINS: dict[str, Gains] = {}


def register_gains(kind: str) -> Callable[[Gains], Gains]:
    """Declare how a low-rank kind ranks its factor pairs for a later rank cap: fn(shape, meta,
    tensors) -> (k,) float32, pair i's share of the delta's squared error that keeping it removes
    (the order of register_factors' pairs), or None where the entry does not record it."""
    def wrap(fn: Gains) -> Gains:
        GAINS[kind] = fn
        return fn
    return wrap


def pair_gains(kind: str, shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """register_gains' answer for `kind`, None for kinds that do not declare one."""
    fn = GAINS.get(kind)
    return None if fn is None or len(shape) != 2 else fn(tuple(shape), meta, tensors)


@dataclass(frozen=True)
class QuantizedFactors:
    """Low-bit factors of D^ = U^ V^ as stored, unpacked: V (k, n) and U^T (k, m) as dicts of codes
    (k, L) uint8, scale and offset (k, ceil(L / g)) float32 with entry = offset + scale * code (groups of
    gv entries along V's rows, gu along U^T's); bits (k,) the width of each triplet, non-increasing."""
    bits: list[int]
    gv: int
    gu: int
    V: dict[str, torch.Tensor]
    U: dict[str, torch.Tensor]


QUANTIZED: dict[str, Callable[[tuple[int, ...], dict, dict[str, torch.Tensor]], QuantizedFactors]] = {}


def register_quantized_factors(kind: str):
    """Declare that `kind` stores its factors as codes on per-group grids: fn(shape, meta, tensors) ->
    QuantizedFactors. The runtime multiplies by such factors without expanding them (serve.kernels.lowbit)."""
    def wrap(fn):
        QUANTIZED[kind] = fn
        return fn
    return wrap


def quantized_factors(kind: str, shape: tuple[int, ...], meta: dict,
                      tensors: dict[str, torch.Tensor]) -> QuantizedFactors | None:
    """QuantizedFactors for kinds registered with register_quantized_factors; None for other kinds."""
    fn = QUANTIZED.get(kind)
    if fn is None or len(shape) != 2:
        return None
    return fn(tuple(shape), meta, tensors)


Parts = Callable[[tuple[int, ...], dict, dict[str, torch.Tensor]], "list[tuple[str, dict, dict[str, torch.Tensor]]]"]
PARTS: dict[str, Parts] = {}


PART_METAS: dict[str, Callable[[dict], "list[tuple[str, dict]]"]] = {}


def register_parts(kind: str, metas: Callable[[dict], "list[tuple[str, dict]]"]) -> Callable[[Parts], Parts]:
    """Declare that `kind` stores a sum of entries of other kinds: fn(shape, meta, tensors) -> [(kind,
    meta, tensors), ...] whose decodes add up to decode(kind, ...), and metas(meta) -> [(kind, meta),
    ...] the same parts from the (checked) metadata alone. The runtime holds each part in its own best
    form (a low-rank part as factors, a row part as rows) instead of one dense matrix."""
    def wrap(fn: Parts) -> Parts:
        PARTS[kind] = fn
        PART_METAS[kind] = metas
        return fn
    return wrap


def part_metas(kind: str, meta: dict) -> list[tuple[str, dict]] | None:
    """[(kind, meta), ...] of the parts of a kind stored as parts (register_parts), None for other kinds
    or metadata that does not say."""
    fn = PART_METAS.get(kind)
    try:
        return None if fn is None else fn(meta)
    except (KeyError, TypeError):
        return None


def parts(kind: str, shape: tuple[int, ...], meta: dict,
          tensors: dict[str, torch.Tensor]) -> list[tuple[str, dict, dict[str, torch.Tensor]]] | None:
    """register_parts' answer for `kind`, None for kinds stored whole."""
    fn = PARTS.get(kind)
    return None if fn is None else fn(tuple(shape), meta, tensors)


MetaCheck = Callable[[tuple[int, ...], dict], None]
META_CHECKS: dict[str, MetaCheck] = {}


def register_meta_check(kind: str) -> Callable[[MetaCheck], MetaCheck]:
    """Declare how the manifest checks an entry's metadata before anything is read:
    fn(shape, meta) raises one AdamixError for metadata that is malformed."""
    def wrap(fn: MetaCheck) -> MetaCheck:
        META_CHECKS[kind] = fn
        return fn
    return wrap


def check_meta(kind: str, shape: tuple[int, ...], meta: dict) -> None:
    """The registered metadata check of `kind` (nothing for kinds without one)."""
    fn = META_CHECKS.get(kind)
    if fn is not None:
        fn(tuple(shape), meta)


def is_int(v) -> bool:
    """An integer read from JSON metadata (not a float, string or bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


MAX_COUNT = 2**31 - 1  # bound on group sizes and counts read from a manifest (no dimension is larger)


def _integer(v) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):  # no floats, strings or bools
        raise TypeError(f"{v!r} is not an integer")
    return int(v)


def parse_width_meta(meta: dict, kind: str, group_size: bool = True) -> tuple[int, list[tuple[int, int]]]:
    """(group size, [(bits, count), ...]) from a kind's metadata, validated: group_size an integer in
    1..MAX_COUNT, widths a list of [bits, count] integer pairs with 1 <= bits <= 8, 0 <= count <= MAX_COUNT,
    gains (where present) a bool. group_size False: a kind without groups (the size returned is 0)."""
    try:
        g = _integer(meta["group_size"]) if group_size else 1
        widths = meta["widths"]
        if not isinstance(widths, list) or any(not isinstance(p, list) or len(p) != 2 for p in widths):
            raise TypeError("widths must be a list of [bits, count] pairs")
        groups = [(_integer(b), _integer(c)) for b, c in widths]
    except (KeyError, TypeError, ValueError) as e:
        raise AdamixError(f"malformed {kind} metadata: {e}") from None
    if not 1 <= g <= MAX_COUNT or any(not 1 <= b <= 8 or not 0 <= c <= MAX_COUNT for b, c in groups):
        raise AdamixError(f"malformed {kind} metadata: group size {g}, widths {groups}")
    g = g if group_size else 0
    if not isinstance(meta.get("gains", False), bool):
        raise AdamixError(f"malformed {kind} metadata: gains must be true or false, not {meta['gains']!r}")
    return g, groups

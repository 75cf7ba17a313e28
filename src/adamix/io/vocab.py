"""Fine-tunes that add vocabulary: an embedding or LM head with more rows than the base's.

For a 2-D tensor whose fine-tune shape differs from the base's only in having k more rows (dim 0),
the method compresses the delta on the rows the two share, and the k rows the base lacks are stored
whole in the fine-tune's dtype (float16, bfloat16 or float32; float64 is stored as float32): the
entry's shape is the fine-tune's, its meta gets "new_rows": k, and delta.safetensors holds
"<name>.new_rows" (k x n) beside the kind's own tensors. Decoding gives the delta against the base
padded with k zero rows, so that merge, pad(W_base) + D^, ends in the fine-tune's rows themselves.
The runtime and export-peft serve deltas of the base's own shapes only and refuse such an artifact.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..methods.kinds import Encoded
from ..methods.rows import encode_rows
from .dtypes import TORCH

NEW_ROWS = "new_rows"
NEW_ROWS_DTYPES = {name: TORCH[name] for name in ("F16", "BF16", "F32")}  # the dtypes new rows are stored in


def added_rows(base_shape: tuple[int, ...], ft_shape: tuple[int, ...]) -> int:
    """k > 0 when ft_shape is the 2-D base_shape with k more rows; 0 otherwise."""
    if len(base_shape) == len(ft_shape) == 2 and ft_shape[1] == base_shape[1] and ft_shape[0] > base_shape[0]:
        return ft_shape[0] - base_shape[0]
    return 0


def with_new_rows(enc: Encoded | None, shared: tuple[int, int], rows: torch.Tensor, group_size: int) -> Encoded:
    """`enc` (the method's encoding of the shared rows' delta, None if that delta is zero) with the
    fine-tune's extra `rows` (k x n) stored whole."""
    if enc is None:  # the shared rows did not change: an empty row-sparse encoding (D^ = 0 there)
        enc = encode_rows(shared, group_size, [])
        enc.stats = {"rows_kept": 0, "error_predicted": 0.0, "error_measured": 0.0, "energy": 0.0}
    if rows.dtype not in NEW_ROWS_DTYPES.values():
        rows = rows.float()
    m, n = enc.shape
    k = rows.shape[0]
    return Encoded(enc.kind, (m + k, n), {**enc.meta, NEW_ROWS: k}, {**enc.tensors, NEW_ROWS: rows.contiguous()},
                   {**enc.stats, NEW_ROWS: k}, enc.detail)


def add_new_rows(encoded: dict[str, tuple[Encoded, bool]], base, ft, names: list[str], group_size: int) -> None:
    """Give every tensor of `names` that gained rows in the fine-tune (Checkpoints base, ft) its new
    rows, in place in `encoded` {name: (Encoded of the shared rows, transposed)}."""
    for name in names:
        (sb, _), (sf, _) = base.slice_info(name), ft.slice_info(name)
        k = added_rows(sb, sf)
        if not k:
            continue
        enc, transposed = encoded.get(name, (None, False))
        if transposed:
            raise AdamixError(f"tensor {name} gains rows in the fine-tune but is stored transposed (Conv1D): "
                              "added rows are supported for embeddings and linear heads only")
        encoded[name] = (with_new_rows(enc, (sb[0], sb[1]), ft.get(name)[sb[0]:], group_size), False)


def entry_new_rows(entry: dict) -> int:
    """k of an entry that adds k rows, else 0 (entry assumed validated, see manifest.py)."""
    meta = entry.get("meta")
    return int(meta.get(NEW_ROWS, 0)) if isinstance(meta, dict) else 0


def refuse_new_rows(entries: dict[str, dict], what: str) -> None:
    """One line for consumers (runtime, export-peft) that need the base's own shapes."""
    grown = {n: entry_new_rows(e) for n, e in entries.items() if entry_new_rows(e)}
    if grown:
        name = sorted(grown)[0]
        raise AdamixError(f"{what} cannot use a delta that adds vocabulary rows ({name} gains {grown[name]} rows); "
                          "restore the fine-tune with `adamix merge` instead")

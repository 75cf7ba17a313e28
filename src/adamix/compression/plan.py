"""Planning a compression from the two checkpoints alone: which tensors pair up, which go through the
method (matrices) and which are stored raw, what each element must carry of the header and manifest,
and the delta of one tensor."""

from __future__ import annotations

import torch

from ..errors import AdamixError, all_finite
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT
from ..io.vocab import added_rows

MIN_SVD_DIM = 32  # matrices with a side shorter than this are stored raw (fp16)


def pair_tensors(base: Checkpoint, ft: Checkpoint) -> tuple[list[str], list[str]]:
    """Names of the float tensors to compare, and the base's non-float extras the fine-tune lacks.

    Refuses pairs whose tensors differ in names or shapes, with one line naming the first difference;
    the one difference accepted is added vocabulary: a 2-D float tensor with more rows (dim 0) in the
    fine-tune (see vocab.py).
    """
    bk, fk = set(base.keys()), set(ft.keys())
    dropped = []
    for name in sorted(bk - fk):
        shape, dtype = base.slice_info(name)
        if dtype in FLOAT:
            raise AdamixError(f"tensor {name} {list(shape)} is in the base but not in the fine-tune: "
                              "not a fine-tune of this base?")
        dropped.append(name)
    for name in sorted(fk - bk):
        raise AdamixError(f"tensor {name} is in the fine-tune but not in the base: not a fine-tune of this base?")
    names = []
    for name in sorted(bk & fk):
        (sb, db), (sf, df) = base.slice_info(name), ft.slice_info(name)
        if sb != sf and not (added_rows(sb, sf) and db in FLOAT and df in FLOAT):
            raise AdamixError(f"tensor {name} has shape {list(sb)} in the base but {list(sf)} in the fine-tune: "
                              "the two models do not match")
        if db in FLOAT and df in FLOAT:
            names.append(name)
    return names, dropped


def is_svd_shape(shape: tuple[int, ...]) -> bool:
    """Matrices go through the method; vectors and very thin matrices are stored raw."""
    return len(shape) == 2 and min(shape) >= MIN_SVD_DIM


def overhead_per_element(base: Checkpoint, names: list[str], suffixes: int = 2) -> float:
    """Bits of file header and manifest that each element of the method's tensors must carry.

    Estimated from the names: per method tensor `suffixes` header entries (the stored tensors of the
    method's kind, methods.kinds.stored_suffixes; about len(name) + 80 bytes each) and a manifest
    entry, per raw tensor one of each, plus the manifest's fixed fields; spread over the method's
    tensors in proportion to their size, so that the whole artifact, not only its codes, meets alpha.
    """
    total_bytes, elements = 2048.0, 0
    for name in names:
        shape, _ = base.slice_info(name)
        if is_svd_shape(shape):
            total_bytes += (suffixes + 1) * len(name) + 440 + 80 * max(0, suffixes - 2)
            elements += shape[0] * shape[1]
        else:
            total_bytes += 2 * len(name) + 200
    return 8 * total_bytes / elements if elements else 0.0


def extra_entry_bits(name: str, suffixes: int, meta_bytes: int = 0) -> float:
    """Bits of header and manifest that `suffixes` more stored tensors of entry `name` and `meta_bytes`
    more of its manifest entry take, estimated as overhead_per_element does (len(name) + 80 bytes
    per header entry)."""
    return 8.0 * (suffixes * (len(name) + 80) + meta_bytes)


def delta_of(base: Checkpoint, ft: Checkpoint, name: str) -> torch.Tensor:
    """W_ft - W_base in float32; refuses non-finite weights. Where the fine-tune adds rows (vocab.py),
    the delta of the rows the two share."""
    wb, wf = base.get(name), ft.get(name)
    for which, w in (("base", wb), ("fine-tune", wf)):
        if not all_finite(w):
            raise AdamixError(f"tensor {name} of the {which} contains NaN or Inf")
    return wf[:wb.shape[0]].float() - wb.float() if wf.shape != wb.shape else wf.float() - wb.float()

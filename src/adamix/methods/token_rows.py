"""Token rows beside a low-rank embedding delta: kinds "svd-mixed+rows" and "svd-rotated+rows".

An input embedding E (V x n) is read one row per token. Its delta D is data-free in the pipeline
(no Gram), so the low-rank form weighs every row alike, while the rows of the tokens the model
actually reads carry what the fine-tune changed for its task. A change d of row r moves the
embedding's output at each of the count_r positions that hold token r, so to second order the
model's divergence per token grows by

    w_r |d|^2,    w_r = c + c_in count_r / T,

with c the matrix's uniform slope (compression.sensitivity, per unit of ||dW||_F^2), c_in the
input slope (the divergence per token per unit of squared change of one position's embedding
output, per entry: compression.sensitivity.input_slope) and T the tokens counted. Each row seen in
calibration (count_r > 0) is an item of the model-wide knapsack beside the low-rank part's
triplets, at the widths of the allocation:

    e_r(0) = w_r |x_r|^2,   e_r(b) = w_r |rtn_b(x_r) - x_r|^2,   cost_b = rows.row_cost(n, b, g)

(row_table), x_r the row's residual after the rank-k truncation of D, x = D - D V_k V_k^T
(residual_rows), k the rank the low-rank part keeps in the allocation without rows (the stored
residual is known only once the low-rank part is chosen). The kept rows store the residual
R = D - D^_lowrank (with_rows), on per-group uniform grids at their widths:

    D^ = D^_lowrank + sum_{r kept} e_r rtn_{b_r}(R_r)^T.

Stored: the low-rank kind's own tensors ("codes", "params") and the row-sparse form's as "row_idx"
(int32), "row_codes" (uint8), "row_params" (fp16); meta = {"lowrank": inner kind, "lowrank_meta":
its meta, "rows": {"widths": [[b, count], ...], "group_size": g}}.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import AdamixError
from ..quant.grid import rtn
from ..quant.linalg import relative_errors
from .allocate import shrink_to_fit
from .kinds import (SUFFIXES, Encoded, check_meta, decode, parse_width_meta, register_decoder, register_meta_check,
                    register_parts)
from .rows import decode_rows, encode_rows, row_cost, stored_bits
from .svd_mixed import KIND as MIXED
from .svd_rotated import KIND as ROTATED

INNER = (MIXED, ROTATED)  # their decoders are registered by these imports
SUFFIX = "+rows"
ROW_TENSORS = {"row_idx": "idx", "row_codes": "codes", "row_params": "params"}  # stored suffix -> rows kind's
META_BYTES = 160  # about what the rows add to the entry's manifest record (kind, rows meta, rows_kept)


def kind_of(inner: str) -> str:
    """The composite kind of a low-rank kind with token rows ("svd-mixed" -> "svd-mixed+rows")."""
    if inner not in INNER:
        raise ValueError(f"token rows go beside {', '.join(INNER)}, not {inner!r}")
    return inner + SUFFIX


def row_weights(uniform: float, input_slope: float, counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """w_r = c + c_in count_r / T (module doc), float64 (r,) for the counts (r,) of the rows."""
    return uniform + input_slope * counts.double() / max(int(tokens), 1)


def residual_rows(D: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """x = D_rows - D_rows V_k V_k^T (r, n) float32: the rows `rows` (r,) of D (m, n) less their part
    in the span of D's k leading right singular vectors V_k (n, k) (eigenvectors of D^T D, float64),
    i.e. what the rank-k truncation of D leaves of them. k = 0: the rows themselves."""
    x = D[rows].double()
    if k > 0:
        _, vecs = torch.linalg.eigh(D.double().T @ D.double())  # ascending eigenvalues
        V = vecs[:, -k:]
        x = x - (x @ V) @ V.T
    return x.float()


def row_table(rows: torch.Tensor, weights: torch.Tensor, widths: tuple[int, ...],
              group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(table (r, B) float64: e_r(b) = w_r |rtn_b(x_r) - x_r|^2 and e_r(0) = w_r |x_r|^2 of rows x
    (r, n); costs (B,): the stored bits of one row at each width, its index included)."""
    r, n = rows.shape
    g = min(group_size, n)
    x = rows.float()
    cols = []
    for b in widths:
        if b == 0:
            cols.append((x.double() ** 2).sum(1))
        else:
            deq = rtn(x, torch.full((r,), b), g)["deq"]
            cols.append(((deq.double() - x.double()) ** 2).sum(1))
    table = (torch.stack(cols, 1) * weights.double().reshape(-1, 1)).numpy()
    return table, np.array([row_cost(n, b, g) for b in widths], dtype=np.float64)


def with_rows(enc: Encoded, D: torch.Tensor, candidates: torch.Tensor, choice: np.ndarray, table: np.ndarray,
              widths: tuple[int, ...], group_size: int, budget: float) -> Encoded:
    """`enc` (a low-rank encoding of D (m, n), untransposed) with the residual rows of `candidates`
    (r,) int64 at widths[choice] (choice (r,) from the allocation over row_table's `table`), kept
    within `budget` bits for the rows (the least valuable rows dropped where byte padding needs it).
    Without any kept row `enc` itself is returned."""
    m, n = D.shape
    g = min(group_size, n)
    zero = widths.index(0)

    def kept_groups(c: np.ndarray) -> list[list[int]]:
        counts = np.bincount(c, minlength=len(widths))
        return [[b, int(k)] for b, k in zip(widths, counts) if b > 0 and k > 0][::-1]  # widest first

    choice = shrink_to_fit(np.asarray(choice), table, zero, lambda c: stored_bits(n, kept_groups(c), g) <= max(budget, 0))
    if not (choice != zero).any():
        return enc
    low = decode(enc.kind, enc.shape, enc.meta, enc.tensors)
    residual = D.float().cpu() - low
    chosen = np.array(widths)[choice]
    parts = []
    for b, _ in kept_groups(choice):
        rows = candidates[torch.from_numpy(np.flatnonzero(chosen == b))]
        q = rtn(residual[rows], torch.full((rows.numel(),), b), g)
        parts.append((b, rows.tolist(), q))
    part = encode_rows((m, n), g, parts)
    tensors = dict(enc.tensors)
    tensors.update({stored: part.tensors[own] for stored, own in ROW_TENSORS.items()})
    meta = {"lowrank": enc.kind, "lowrank_meta": enc.meta, "rows": part.meta}
    out = Encoded(kind_of(enc.kind), (m, n), meta, tensors, detail=dict(enc.detail))
    Dd = D.double().cpu()
    energy = float((Dd ** 2).sum())
    measured = float(((decode(out.kind, out.shape, meta, tensors).double() - Dd) ** 2).sum())
    out.stats = {**enc.stats, "rows_kept": int(part.tensors["idx"].numel()), **relative_errors(measured, energy)}
    out.stats.pop("error_predicted", None)  # the low-rank part's model does not cover the rows
    return out


def split(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[str, dict, dict, dict, dict]:
    """(inner kind, its meta, its tensors, rows meta, rows tensors named as the rows kind names them)
    of a composite entry (meta assumed checked, check_token_rows)."""
    inner = meta["lowrank"]
    own = {k: tensors[k] for k in SUFFIXES[inner]}
    rows = {own_name: tensors[stored] for stored, own_name in ROW_TENSORS.items()}
    return inner, meta["lowrank_meta"], own, meta["rows"], rows


def check_token_rows(shape: tuple[int, ...], meta: dict, kind: str) -> None:
    """One AdamixError for malformed composite metadata (the inner kind must match `kind`)."""
    if not isinstance(meta, dict) or meta.get("lowrank") not in INNER or kind_of(meta["lowrank"]) != kind \
            or not isinstance(meta.get("lowrank_meta"), dict) or not isinstance(meta.get("rows"), dict):
        raise AdamixError(f"malformed {kind} metadata: expected lowrank {kind[:-len(SUFFIX)]!r}, lowrank_meta "
                          "and rows objects")
    check_meta(meta["lowrank"], shape, meta["lowrank_meta"])
    parse_width_meta(meta["rows"], kind)


def decode_token_rows(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    (inner, inner_meta, own), (_, rows_meta, rows) = token_row_parts(shape, meta, tensors, kind)
    return decode(inner, shape, inner_meta, own) + decode_rows(shape, rows_meta, rows)


def token_row_parts(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor],
                    kind: str) -> list[tuple[str, dict, dict[str, torch.Tensor]]]:
    """The two entries whose decodes add up to a composite's: the low-rank one and the rows."""
    check_token_rows(shape, meta, kind)
    inner, inner_meta, own, rows_meta, rows = split(meta, tensors)
    return [(inner, inner_meta, own), ("rows", rows_meta, rows)]


def _register(inner: str) -> None:
    kind = kind_of(inner)
    register_meta_check(kind)(lambda shape, meta: check_token_rows(shape, meta, kind))
    register_parts(kind, lambda meta: [(meta["lowrank"], meta["lowrank_meta"]), ("rows", meta["rows"])])(
        lambda shape, meta, tensors: token_row_parts(shape, meta, tensors, kind))
    register_decoder(kind, {**SUFFIXES[inner], "row_idx": "I32", "row_codes": "U8", "row_params": "F16"})(
        lambda shape, meta, tensors: decode_token_rows(shape, meta, tensors, kind))


for _inner in INNER:
    _register(_inner)

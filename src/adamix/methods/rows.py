"""Row-sparse storage, kind "rows": the rows of D that carry its energy, each at its own width.

Fine-tuning moves the embedding rows of the tokens it saw and barely touches the rest (most of the
delta's energy sits in a few rows), a structure that a low-rank factorisation cannot use. Each row r is an item of the same multiple-choice knapsack as the singular
triplets: e_r(0) = |d_r|^2, e_r(b) = |rtn_b(d_r) - d_r|^2, cost_b = b n + 32 ceil(n/g) + 32 (the
row index), solved under the tensor's budget by the LP greedy (allocate.greedy_allocation).
Stored: `idx` (int32, kept rows, widest first), `codes` (uint8, one packed stream per width),
`params` (fp16 scale and offset per group of each kept row); meta["widths"] = [[b, count], ...].
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import AdamixError
from ..quant.grid import PARAM_BITS, dequantize, expand_groups, n_groups, rtn
from ..quant.pack import pack, packed_nbytes, unpack
from .allocate import choose_widths, greedy_allocation, shrink_to_fit
from .kinds import Encoded, parse_width_meta, register_decoder

INDEX_BITS = 32
SPARSE_MAX_FRACTION = 0.5  # a dense delta with at most this fraction of non-zero rows is held as its rows


def nonzero_rows(D: torch.Tensor, max_fraction: float = SPARSE_MAX_FRACTION) -> torch.Tensor | None:
    """The indices (r,) int64 of D's (m, n) non-zero rows when r <= max_fraction * m, else None: the
    test by which the runtime holds a delta as its rows and export-peft keeps embedding rows as tokens."""
    rows = torch.nonzero(D.ne(0).any(dim=1)).flatten()
    return rows if rows.numel() <= max_fraction * D.shape[0] else None


def row_cost(n: int, width: int, group_size: int) -> int:
    return 0 if width == 0 else width * n + PARAM_BITS * n_groups(n, min(group_size, n)) + INDEX_BITS


def stored_bits(n: int, groups: list[list[int]], group_size: int) -> int:
    """Exact bits of idx + packed codes + params for kept rows [[width, count], ...]."""
    g = min(group_size, n)
    return sum(INDEX_BITS * c + 8 * packed_nbytes(c * n, b) + PARAM_BITS * c * n_groups(n, g) for b, c in groups)


def compress_rows(D: torch.Tensor, widths: tuple[int, ...], group_size: int, budget: float) -> Encoded:
    """Encode D (m x n) as its most valuable rows within `budget` bits."""
    m, n = D.shape
    g = min(group_size, n)
    D = D.float()
    energy = (D.double() ** 2).sum(1)
    table, deq = [], {}
    for b in widths:
        if b == 0:
            table.append(energy)
            continue
        deq[b] = rtn(D, torch.full((m,), b), g)
        table.append(((deq[b]["deq"].double() - D.double()) ** 2).sum(1))
    table = torch.stack(table, 1).numpy()
    costs = np.array([row_cost(n, b, g) for b in widths], dtype=np.float64)
    # tens of thousands of rows: the exact MILP takes minutes, the LP greedy seconds (and is
    # within one row of the LP optimum)
    choice = choose_widths(table, costs, budget, solver=greedy_allocation)

    def kept_groups(c: np.ndarray) -> list[list[int]]:
        counts = np.bincount(c, minlength=len(widths))
        return [[b, int(k)] for b, k in zip(widths, counts) if b > 0 and k > 0][::-1]  # widest first

    # byte padding of the packed streams: drop the least valuable row until it fits
    choice = shrink_to_fit(choice, table, widths.index(0), lambda c: stored_bits(n, kept_groups(c), g) <= max(budget, 0))
    groups = kept_groups(choice)
    chosen = np.array(widths)[choice]
    parts = []
    for b, _ in groups:
        rows = np.flatnonzero(chosen == b).tolist()
        parts.append((b, rows, {k: v[rows] for k, v in deq[b].items()}))
    enc = encode_rows((m, n), g, parts)
    total = float(energy.sum())
    err = float(table[np.arange(m), choice].sum())
    rel = (err / total) ** 0.5 if total > 0 else 0.0
    enc.stats = {"rows_kept": int(enc.tensors["idx"].numel()), "error_predicted": rel, "error_measured": rel, "energy": total}
    return enc


def encode_rows(shape: tuple[int, int], group_size: int,
                parts: list[tuple[int, list[int], dict[str, torch.Tensor]]]) -> Encoded:
    """Pack quantized rows. parts: [(width b, row indices, q)], widest first, where q holds codes
    (c, n) and scale/offset (c, G) of those rows in that order (as quant.grid.rtn / gptq_rows return)."""
    m, n = shape
    idx, codes, params, groups = [], [], [], []
    for b, rows, q in parts:
        if not rows:
            continue
        groups.append([b, len(rows)])
        idx += list(rows)
        codes.append(pack(q["codes"], b))
        params += [q["scale"].reshape(-1), q["offset"].reshape(-1)]
    return Encoded("rows", (m, n), {"widths": groups, "group_size": min(group_size, n)}, {
        "idx": torch.tensor(idx, dtype=torch.int32),
        "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
        "params": torch.cat(params).to(torch.float16) if params else torch.zeros(0, dtype=torch.float16),
    })


@register_decoder("rows", {"idx": "I32", "codes": "U8", "params": "F16"})
def decode_rows(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if len(shape) != 2:
        raise AdamixError(f"rows tensor must be 2-D, manifest says shape {list(shape)}")
    m, n = shape
    g, groups = parse_width_meta(meta, "rows")
    idx, codes, params = tensors["idx"], tensors["codes"], tensors["params"]
    if idx.dtype != torch.int32 or codes.dtype != torch.uint8 or params.dtype != torch.float16:
        raise AdamixError(f"stored rows have dtypes {idx.dtype}, {codes.dtype}, {params.dtype}; "
                          "expected int32, uint8, float16")
    k = sum(c for _, c in groups)
    G = n_groups(n, min(g, n))
    if idx.numel() != k or codes.numel() != sum(packed_nbytes(c * n, b) for b, c in groups) or params.numel() != 2 * k * G:
        raise AdamixError(f"stored rows do not match the manifest (widths {groups}, {idx.numel()} indices)")
    if k and (int(idx.min()) < 0 or int(idx.max()) >= m):
        raise AdamixError(f"row index out of range for a tensor of {m} rows")
    out = torch.zeros(m, n)
    cpos = ppos = start = 0
    for b, c in groups:
        size = packed_nbytes(c * n, b)
        q = unpack(codes[cpos:cpos + size], b, c * n).reshape(c, n)
        s = expand_groups(params[ppos:ppos + c * G].float().reshape(c, G), n, g)
        o = expand_groups(params[ppos + c * G:ppos + 2 * c * G].float().reshape(c, G), n, g)
        out[idx[start:start + c].long()] = dequantize(q, s, o)
        cpos, ppos, start = cpos + size, ppos + 2 * c * G, start + c
    return out

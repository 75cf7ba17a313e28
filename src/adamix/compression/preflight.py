"""Checks made after the two models are opened and paired, before any calibration.

1. The ratio must store something. A ratio is refused when, at that ratio, no matrix of the model
   can keep even the cheapest item of the method (its size model, Method.item_bits: e.g. one
   singular triplet at the narrowest width, one fp16 rank-1 pair, one 1-bit row), or one row at the
   narrowest width of the row-sparse form that every method may use for matrices without calibration data (all of them with --calib none; otherwise those outside
   the linears of the transformer blocks, found on the model's skeleton without reading weights).
   The estimate uses the shapes only: an m x n matrix may spend alpha * 16 m n bits less its share
   of the header and manifest (`overhead` bits per element, plan.overhead_per_element); with
   --budget-scope block (a method that joins shared allocations) the budgets of the calibrated
   matrices of each block are pooled, less what each sets aside (Method.joint_reserve_bits); with
   --budget-scope model those of every matrix.
   So a refused ratio certainly stores nothing, and the smallest ratio named in the message (rounded
   up to 3 digits) lets at least one matrix keep one item. When even ratio 1 stores nothing
   (matrices too small for their share of the header) nothing is refused.
   A method of fixed size (item_bits None) is not checked here; its own Method.check holds the ratio.
2. --distill-steps runs the base model on the fine-tune's tokens: refused when the fine-tune adds
   vocabulary rows (vocab.py), whose token ids the base has no embedding for.
"""

from __future__ import annotations

import math

from ..errors import AdamixError
from ..io.hf import find_blocks, linears, model_skeleton
from ..io.vocab import added_rows
from ..methods import Settings, get
from ..methods.rows import stored_bits
from .plan import is_svd_shape


def row_bits(m: int, n: int, settings: Settings) -> float:
    """Stored bits of one row of an m x n delta in the row-sparse form, at the narrowest width."""
    b = min(w for w in settings.widths if w > 0)
    return stored_bits(n, [[b, 1]], min(settings.group_size, n))


def smallest_ratio(matrices: list[tuple[int, int, int | None]], settings: Settings, overhead: float) -> float:
    """The smallest alpha at which at least one of `matrices` [(m, n, block index or None if
    data-free)] keeps one item (see module doc)."""
    method = get(settings.method)
    best = math.inf
    blocks: dict[int, list[tuple[int, int]]] = {}
    for m, n, block in matrices:
        item = method.item_bits(m, n, settings)
        if item is None:  # a fixed size: nothing to refuse here
            return 0.0
        bits = item if block is not None else min(item, row_bits(m, n, settings))
        best = min(best, (bits + overhead * m * n) / (16 * m * n))
        if block is not None:
            blocks.setdefault(block, []).append((m, n))
    if settings.budget_scope != "tensor" and method.joint:
        reserve = method.joint_reserve_bits(settings)
        pools = blocks.values() if settings.budget_scope == "block" else [[(m, n) for m, n, _ in matrices]]
        for pooled in pools:
            elements = sum(m * n for m, n in pooled)
            cheapest = min(method.item_bits(m, n, settings) for m, n in pooled)
            best = min(best, (cheapest + overhead * elements + reserve * len(pooled)) / (16 * elements))
    return best


def calibrated_names(ft, names: list[str]) -> dict[str, int]:
    """{name: block index} for the names among `names` that calibrate.BlockRunner gives an input Gram
    (the linears of the transformer blocks), from the fine-tune's skeleton on the meta device."""
    blocks_name, blocks = find_blocks(model_skeleton(ft.folder))
    found = {i.name: k for k, b in enumerate(blocks) for i in linears(b, f"{blocks_name}.{k}.")}
    return {n: k for n, k in found.items() if n in set(names)}


def round_up(x: float, digits: int = 3) -> str:
    """x rounded up to `digits` significant digits, as text that --ratio accepts."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    k = math.ceil(x / step)
    while float(f"{k * step:.{digits}g}") < x:
        k += 1
    return f"{k * step:.{digits}g}"


def check_before_calibration(base, ft, names: list[str], settings: Settings, overhead: float,
                             ratio: str | float, distill_steps: int, calibrated: bool) -> None:
    """Checks 1 and 2 of the module doc for the paired tensors `names` of Checkpoints base and ft;
    calibrated: whether calibration text is used (False: --calib none, every matrix is data-free)."""
    if distill_steps:
        grown = [n for n in names if added_rows(base.slice_info(n)[0], ft.slice_info(n)[0])]
        if grown:
            raise AdamixError(f"--distill-steps runs the base on the fine-tune's tokens, but the fine-tune adds "
                              f"vocabulary rows to {grown[0]}; compress without --distill-steps")
    matrices = {n: base.slice_info(n)[0] for n in names}
    matrices = {n: s for n, s in matrices.items() if is_svd_shape(s)}
    if not matrices:
        return
    block = calibrated_names(ft, list(matrices)) if calibrated else {}
    smallest = smallest_ratio([(m, k, block.get(n)) for n, (m, k) in matrices.items()], settings, overhead)
    if settings.alpha < smallest <= 1:
        text = round_up(smallest)
        raise AdamixError(f"--ratio {ratio} is too small to store anything: no matrix can keep even one "
                          f"{get(settings.method).unit}; the smallest ratio that stores something is {text} "
                          f"(about 1/{1 / float(text):.0f})")

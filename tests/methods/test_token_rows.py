"""Token rows beside a low-rank embedding delta (kinds "<low-rank kind>+rows"): the rows' table
against float64, the composite's decode and bits, its metadata refusals, and the runtime's form."""

import numpy as np
import pytest
import torch

from adamix import AdamixError
from adamix.methods import decode
from adamix.methods.adamix import Settings, compress_matrix
from adamix.methods.allocate import solve_allocation
from adamix.methods.rows import decode_rows, row_cost, stored_bits
from adamix.methods.token_rows import ROW_TENSORS, residual_rows, row_table, row_weights, with_rows
from adamix.quant.grid import rtn
from adamix.serve.deltas import SumDelta, kind_delta

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTHS = (0, 2, 3, 4, 8)


def embedding_delta(m=300, n=48, seen=20, seed=0):
    """A low-rank delta over all rows plus a full-rank change of a few rows (the tokens of a task)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) * 0.1
    rows = torch.randperm(m, generator=g)[:seen].sort().values
    D[rows] += 0.05 * torch.randn(seen, n, generator=g)
    return D, rows


def test_row_table_is_the_weighted_rtn_error_of_each_row():
    D, rows = embedding_delta()
    counts = torch.arange(1, len(rows) + 1)
    w = row_weights(0.5, 3.0, counts, 100)
    assert torch.allclose(w, 0.5 + 3.0 * counts.double() / 100, rtol=1e-15)
    table, costs = row_table(D[rows], w, WIDTHS, 16)
    x = D[rows].double()
    assert table[:, 0] == pytest.approx((w * (x ** 2).sum(1)).numpy(), rel=1e-12)
    for j, b in enumerate(WIDTHS[1:], 1):
        deq = rtn(D[rows], torch.full((len(rows),), b), 16)["deq"].double()
        assert table[:, j] == pytest.approx((w * ((deq - x) ** 2).sum(1)).numpy(), rel=1e-12)
    assert costs.tolist() == [row_cost(48, b, 16) for b in WIDTHS]
    assert (np.diff(table, axis=1) <= 0).all()  # wider, never worse, on these rows


def test_with_rows_adds_the_quantized_residual_of_the_chosen_rows_within_their_bits():
    D, rows = embedding_delta()
    m, n = D.shape
    low = compress_matrix(D, None, Settings(alpha=1 / 16, group_size=16))
    table, costs = row_table(D[rows], row_weights(1.0, 50.0, torch.full((len(rows),), 5), 100), WIDTHS, 16)
    budget = 0.5 * len(rows) * costs[3]
    choice = solve_allocation(table, costs, budget)
    assert (choice > 0).sum() > 3
    enc = with_rows(low, D, rows, choice, table, WIDTHS, 16, budget + 14 * 4)
    assert enc.kind == "svd-mixed+rows" and enc.meta["lowrank"] == "svd-mixed"
    inner = {k: enc.tensors[k] for k in ("codes", "params")}
    assert all(torch.equal(inner[k], low.tensors[k]) for k in inner)  # the low-rank part as it was
    rows_meta = enc.meta["rows"]
    assert 8 * sum(enc.tensors[k].numel() * enc.tensors[k].element_size() for k in ROW_TENSORS) \
        == stored_bits(n, rows_meta["widths"], 16) <= budget + 56
    # decode = low-rank part + rtn of the residual at each kept row's width (float64 check of the rows)
    Dhat = decode(enc.kind, (m, n), enc.meta, enc.tensors)
    L = decode(low.kind, (m, n), low.meta, low.tensors)
    kept = enc.tensors["row_idx"].long()
    widths = np.array(WIDTHS)[choice]
    assert sorted(kept.tolist()) == sorted(rows[torch.from_numpy(np.flatnonzero(widths > 0))].tolist())
    others = torch.ones(m, dtype=torch.bool)
    others[kept] = False
    assert torch.equal(Dhat[others], L[others])
    for r in kept.tolist():
        b = int(widths[(rows == r).nonzero().item()])
        q = rtn((D - L)[r:r + 1], torch.tensor([b]), 16)["deq"]
        assert torch.allclose(Dhat[r].double(), (L[r] + q[0]).double(), atol=1e-6)
    err = lambda X: float(((X.double() - D.double()) ** 2)[kept].sum())  # noqa: E731
    assert err(Dhat) < 0.1 * err(L)
    rel = float((Dhat.double() - D.double()).norm() / D.double().norm())
    assert enc.stats["error_measured"] == pytest.approx(rel, rel=1e-6) and enc.stats["rows_kept"] == len(kept)


def test_with_rows_keeps_the_low_rank_entry_when_no_row_fits():
    D, rows = embedding_delta()
    low = compress_matrix(D, None, Settings(alpha=1 / 16, group_size=16))
    table, costs = row_table(D[rows], torch.ones(len(rows), dtype=torch.float64), WIDTHS, 16)
    picked = np.full(len(rows), 3)
    assert with_rows(low, D, rows, picked, table, WIDTHS, 16, 0.0) is low  # the padding check drops them all
    assert with_rows(low, D, rows, np.zeros(len(rows), dtype=np.int64), table, WIDTHS, 16, 1e9) is low


def composite(seed=0):
    D, rows = embedding_delta(seed=seed)
    low = compress_matrix(D, None, Settings(alpha=1 / 16, group_size=16))
    table, costs = row_table(D[rows], torch.ones(len(rows), dtype=torch.float64), WIDTHS, 16)
    return D, with_rows(low, D, rows, np.full(len(rows), 3), table, WIDTHS, 16, 1e9)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("rows"), "malformed svd-mixed\\+rows metadata"),
    (lambda m: m.update(lowrank="svd-rotated"), "malformed svd-mixed\\+rows metadata"),
    (lambda m: m.update(lowrank="rows"), "malformed svd-mixed\\+rows metadata"),
    (lambda m: m["rows"].update(widths=[[9, 1]]), "malformed svd-mixed\\+rows metadata"),
    (lambda m: m["lowrank_meta"].update(group_size="x"), "malformed svd-mixed metadata"),
])
def test_malformed_composite_metadata_is_refused_in_one_line(change, message):
    D, enc = composite()
    import copy
    meta = copy.deepcopy(enc.meta)
    change(meta)
    with pytest.raises(AdamixError, match=message):
        decode(enc.kind, tuple(D.shape), meta, enc.tensors)


def test_composite_rows_are_checked_like_the_rows_kind():
    D, enc = composite()
    bad = dict(enc.tensors, row_idx=enc.tensors["row_idx"].clone())
    bad["row_idx"][0] = D.shape[0]
    with pytest.raises(AdamixError, match="out of range"):
        decode(enc.kind, tuple(D.shape), enc.meta, bad)


@pytest.mark.parametrize("factors", ["float", "packed", "codes"])
def test_runtime_holds_the_parts_and_applies_their_sum(factors):
    from adamix.serve.deltas import resolve_factors
    if factors == "codes" and resolve_factors("auto", torch.float32, torch.device("cpu")) != "codes":
        pytest.skip("the low-bit kernels are not built here")
    D, enc = composite()
    m, n = D.shape
    dense = decode(enc.kind, (m, n), enc.meta, enc.tensors)
    held = kind_delta(enc.kind, (m, n), enc.meta, enc.tensors, False, torch.float32, "cpu", factors)
    assert isinstance(held, SumDelta) and len(held.parts) == 2
    assert not any(t.shape == (m, n) for t in held.tensors())  # no dense copy of the whole matrix
    ids = torch.tensor([[0, 5, int(enc.tensors["row_idx"][0])], [int(enc.tensors["row_idx"][-1]), 7, 0]])
    assert torch.allclose(held.rows(ids), dense[ids], atol=1e-6)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(4, m)
    held.add_linear(y, x)
    assert torch.allclose(y, x @ dense.T, atol=1e-5)
    h = torch.randn(3, m, generator=torch.Generator().manual_seed(2))
    z = torch.zeros(3, n)
    held.t().add_linear(z, h)  # a tied head: the transposed delta
    assert torch.allclose(z, h @ dense, atol=1e-5)
    assert torch.allclose(held.dense(), dense, atol=1e-6)
    rows_only = decode_rows((m, n), enc.meta["rows"], {own: enc.tensors[k] for k, own in ROW_TENSORS.items()})
    assert int(rows_only.ne(0).any(1).sum()) == enc.stats["rows_kept"]


def test_inspect_shows_the_low_rank_part_and_the_rows():
    from adamix.eval.report import widths_text
    _, enc = composite()
    low = " ".join(f"{b}b×{c}" for b, c in enc.meta["lowrank_meta"]["widths"])
    rows = " ".join(f"{b}b×{c}" for b, c in enc.meta["rows"]["widths"])
    assert widths_text(enc.meta, enc.kind) == f"{low} + rows {rows}" and rows == f"4b×{enc.stats['rows_kept']}"


def test_residual_rows_are_what_the_rank_k_truncation_leaves():
    D, rows = embedding_delta()
    U, s, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    for k in (0, 2, 5):
        Dk = (U[:, :k] * s[:k]) @ Vh[:k]
        assert torch.allclose(residual_rows(D, rows, k).double(), (D.double() - Dk)[rows], atol=1e-5)
    assert float(residual_rows(D, rows, 3).norm()) < 0.6 * float(D[rows].norm())  # the rank-3 part is gone

"""The runtime's matrix deltas against a float64 dense reference: a row-sparse delta and its
transpose (a Conv1D weight's rows kind) stay sparse, and a sum of parts transposes part by part."""

from __future__ import annotations

import torch

from adamix.serve.deltas import ColumnDelta, LowRankDelta, MatrixDelta, RowDelta, SumDelta


def check(delta: MatrixDelta, D: torch.Tensor) -> None:
    """add_linear, rows and dense of `delta` against the dense D (m, n), float64."""
    g = torch.Generator().manual_seed(1)
    m, n = D.shape
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    y = torch.randn(5, m, generator=g, dtype=torch.float64)
    expected = y + x @ D.T
    delta.add_linear(y, x)
    assert torch.allclose(y, expected, atol=1e-12)
    ids = torch.tensor([[0, m - 1, 2], [2, 1, 0]])
    assert torch.allclose(delta.rows(ids), D[ids], atol=1e-12)
    assert torch.allclose(delta.dense(), D, atol=1e-12)
    assert delta.shape == tuple(D.shape)


def row_sparse(m: int = 12, n: int = 8) -> tuple[RowDelta, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([7, 2, 10, 0])  # unsorted on purpose
    R = torch.randn(len(idx), n, generator=g, dtype=torch.float64)
    D = torch.zeros(m, n, dtype=torch.float64)
    D[idx] = R
    return RowDelta((m, n), idx, R), D


def test_row_delta_and_its_transpose_match_the_dense_delta():
    delta, D = row_sparse()
    check(delta, D)
    t = delta.t()
    assert isinstance(t, ColumnDelta)  # the transpose holds the same numbers, not a dense matrix
    assert sum(x.numel() for x in t.tensors()) == sum(x.numel() for x in delta.tensors())
    check(t, D.T.contiguous())
    back = t.t()
    assert isinstance(back, RowDelta)
    check(back, D)


def test_empty_row_delta_transposes_to_zero():
    delta = RowDelta((6, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.float64))
    check(delta.t(), torch.zeros(4, 6, dtype=torch.float64))


def test_sum_of_low_rank_and_rows_transposes_part_by_part():
    rows, D_rows = row_sparse()
    g = torch.Generator().manual_seed(2)
    U = torch.randn(12, 3, generator=g, dtype=torch.float64)
    V = torch.randn(3, 8, generator=g, dtype=torch.float64)
    total = SumDelta([LowRankDelta(U, V), rows])
    check(total, U @ V + D_rows)
    t = total.t()
    assert [type(p).__name__ for p in t.parts] == ["LowRankDelta", "ColumnDelta"]
    check(t, (U @ V + D_rows).T.contiguous())


def test_a_row_sparse_conv1d_delta_is_served_as_columns_and_equals_the_merged_model(tmp_path):
    """GPT-2's Conv1D holds W^T: its rows-kind delta is applied transposed, as a ColumnDelta."""
    from safetensors.torch import load_file, save_file
    from synthetic import make_pair
    import adamix
    from adamix.io.artifact import Artifact
    from adamix.io.checkpoint import Checkpoint
    from adamix.io.hf import build_model
    from adamix.serve import MultiTenantModel
    base, ft = make_pair(tmp_path / "pair", "gpt2")
    name, module = "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc"
    weights = load_file(str(ft / "model.safetensors"))
    W = load_file(str(base / "model.safetensors"))[name].clone()
    W[[1, 5, 9]] += torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0)) * 0.5
    weights[name] = W  # a change of three input rows only
    save_file(weights, str(ft / "model.safetensors"), metadata={"format": "pt"})
    adamix.compress(base, ft, tmp_path / "d", ratio="1/8", calib=None, progress=False)
    assert Artifact(tmp_path / "d").entries[name]["kind"] == "rows"
    adamix.merge(base, tmp_path / "d", tmp_path / "merged", progress=False)
    ref = build_model(Checkpoint(tmp_path / "merged")).eval()
    mt = MultiTenantModel(base)
    mt.attach("t", tmp_path / "d")
    held = [d for d in dict(mt.model.named_modules())[module].deltas["t"] if isinstance(d, MatrixDelta)]
    assert [type(d).__name__ for d in held] == ["ColumnDelta"]
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(input_ids=ids).logits, mt(input_ids=ids, tenants="t").logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6

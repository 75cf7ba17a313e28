"""adamix.serve.kernels.lowbit and its C kernels (lowbit.c): layout, products against float64, fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from adamix.serve.kernels import lowbit, native
from adamix.errors import AdamixError
from adamix.serve.deltas import resolve_factors

needs_kernels = pytest.mark.skipif(not lowbit.available(), reason=f"no C kernels: {native.why_not('lowbit')}")


def random_rows(k: int, L: int, g: int, k8: int, seed: int = 0, cols: bool = False):
    """LowBitRows (LowBitCols if cols) with k8 8-bit rows then 2..4-bit rows, random grids; and its codes (k, L)."""
    gen = torch.Generator().manual_seed(seed)
    bits = [8] * k8 + sorted(torch.randint(2, 5, (k - k8,), generator=gen).tolist(), reverse=True)
    codes = torch.stack([torch.randint(0, 2 ** b, (L,), generator=gen) for b in bits]).to(torch.uint8) \
        if k else torch.zeros(0, L, dtype=torch.uint8)
    G = -(-L // g)
    scale = torch.rand(k, G, generator=gen) + 0.1
    offset = torch.randn(k, G, generator=gen)
    make = lowbit.cols_from_codes if cols else lowbit.from_codes
    return make(codes, bits, scale, offset, g), codes


def dense64(F: lowbit.LowBitRows, codes: torch.Tensor) -> torch.Tensor:
    """Equation (1) in float64 from the codes and grids, entry by entry."""
    j = torch.arange(F.L)
    return F.offset.double().T[:, j // F.g] + F.scale.double().T[:, j // F.g] * codes.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# (k, L, g, k8): the AVX2 paths (g = 128, L a multiple of 32 / of 16 only), odd g, a short last group,
# all rows 8-bit, no 8-bit row, a single group
SHAPES = [(37, 576, 128, 3), (20, 1536, 128, 0), (9, 37, 8, 9), (6, 33, 7, 2), (5, 100, 32, 1), (4, 48, 64, 0),
          (3, 160, 32, 3), (7, 200, 64, 2), (5, 96, 96, 5), (70, 256, 128, 3)]


def test_block_layout_by_hand():
    """32-bit word w of a block, shifted right by 4 u (8 u for 8-bit codes) and masked, is entry 8 u + w."""
    import numpy as np
    codes = torch.arange(64, dtype=torch.uint8).view(1, 64)
    words8 = np.frombuffer(lowbit.pack8(codes).numpy().tobytes(), dtype="<u4")  # two blocks of 32 entries
    assert [[(int(words8[8 * b + w]) >> 8 * u) & 255 for w in range(8)] for b in range(2) for u in range(4)] \
        == [list(range(8 * r, 8 * r + 8)) for r in range(8)]
    words4 = np.frombuffer(lowbit.pack4(codes % 16).numpy().tobytes(), dtype="<u4")  # one block of 64
    assert [[(int(words4[w]) >> 4 * u) & 15 for w in range(8)] for u in range(8)] \
        == [[(8 * u + w) % 16 for w in range(8)] for u in range(8)]
    assert lowbit.pack4(torch.ones(2, 65, dtype=torch.uint8)).shape == (2, 64)  # padded to whole blocks
    assert lowbit.pack8(torch.ones(2, 33, dtype=torch.uint8)).shape == (2, 64)


@pytest.mark.parametrize("k,L,g,k8", SHAPES)
def test_codes_round_trip_and_reference(k, L, g, k8):
    F, codes = random_rows(k, L, g, k8)
    C, _ = random_rows(k, L, g, k8, cols=True)
    assert torch.equal(lowbit.codes_of(F), codes) and torch.equal(lowbit.codes_of(C), codes)
    assert F.q8.shape == (k8, 32 * -(-L // 32)) and F.q4.shape == (k - k8, 32 * -(-L // 64))
    assert C.q8.shape == (k8, 32 * -(-L // 32)) and C.q4.shape == (L, 32 * -(-(k - k8) // 64))
    ref = dense64(F, codes)
    for layout in (F, C):
        assert rel(lowbit.reference(layout), ref) < 1e-6
        assert rel(lowbit.dequantize(layout), ref) < 1e-6
    flipped = lowbit.flipped(F)
    assert isinstance(flipped, lowbit.LowBitCols) and all(torch.equal(a, b) for a, b in zip(flipped.tensors(), C.tensors()))
    assert all(torch.equal(a, b) for a, b in zip(lowbit.flipped(C).tensors(), F.tensors()))
    ids = torch.tensor([0, L - 1, L // 2, min(g, L - 1)])
    assert rel(lowbit.columns(F, ids), ref[:, ids]) < 1e-6


def test_from_codes_refuses_bad_input():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="wider than 4 bits must come first"):
        lowbit.from_codes(codes, [3, 8], torch.ones(2, 1), torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="grids of shape"):
        lowbit.from_codes(codes, [8, 3], torch.ones(2, 2), torch.zeros(2, 2), 8)


@needs_kernels
@pytest.mark.parametrize("k,L,g,k8", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
def test_products_match_float64(k, L, g, k8, M):
    F, codes = random_rows(k, L, g, k8, seed=M)
    C, _ = random_rows(k, L, g, k8, seed=M, cols=True)
    D = dense64(F, codes)
    gen = torch.Generator().manual_seed(100 + M)
    # x with a row stride larger than L (a view of a wider matrix): the kernels take any row stride
    x = torch.randn(M, L + 5, generator=gen)[:, :L]
    assert rel(lowbit.rowdot(C, x), x.double() @ D.T) < 1e-5
    t = torch.randn(M, k, generator=gen)
    y = torch.randn(M, L, generator=gen)
    want = y.double() + t.double() @ D
    lowbit.axpy(F, t, y)
    assert rel(y, want) < 1e-5


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, lowbit.DEQUANT_ROWS - 1, lowbit.DEQUANT_ROWS, 40])
def test_lowrank_both_paths_match_float64(M):
    """y += (x V^T) U, below DEQUANT_ROWS through the fused kernel, from there on de-quantized + sgemm."""
    V, vc = random_rows(24, 576, 128, 2, seed=1, cols=True)
    U, uc = random_rows(24, 160, 32, 2, seed=2)
    x = torch.randn(M, 576, generator=torch.Generator().manual_seed(3))
    y = torch.randn(M, 160, generator=torch.Generator().manual_seed(4))
    want = y.double() + (x.double() @ dense64(V, vc).T) @ dense64(U, uc)
    lowbit.lowrank(V, U, x, y)
    assert rel(y, want) < 1e-5


@needs_kernels
def test_addmm_rows_applies_each_job_to_its_rows_only():
    pairs = [lowbit.LowRankPair(random_rows(10, 64, 32, 1, seed=s, cols=True)[0], random_rows(10, 96, 32, 0, seed=s + 9)[0])
             for s in range(2)]
    x = torch.randn(7, 64)
    y = torch.randn(7, 96)
    want = y.clone()
    for p, r0, r in ((pairs[0], 0, 2), (pairs[1], 4, 3)):
        p.addmm(x[r0:r0 + r], want[r0:r0 + r])
    got = y.clone()
    lowbit.addmm_rows([(pairs[0], 0, 2), (pairs[1], 4, 3)], x, got)
    with pytest.raises(ValueError, match="RowJobs.run takes"):  # fewer rows than the jobs reach
        lowbit.addmm_rows([(pairs[1], 4, 3)], x[:6], got[:6])
    assert torch.equal(got[2:4], y[2:4])  # rows of no job: untouched
    assert rel(got, want) < 1e-6


@needs_kernels
def test_threads_give_the_same_products(monkeypatch):
    monkeypatch.setattr(lowbit, "PARALLEL_WORK", 0)  # small as it is, run it on two threads
    F, _ = random_rows(130, 576, 128, 3, cols=True)  # two 64-column blocks of q4t: one per thread
    U, _ = random_rows(130, 576, 128, 3)
    x = torch.randn(4, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lowbit.rowdot(F, x)
        y1 = torch.zeros(4, 576)
        lowbit.axpy(U, one, y1)
        torch.set_num_threads(2)
        two = lowbit.rowdot(F, x)
        y2 = torch.zeros(4, 576)
        lowbit.axpy(U, one, y2)
    finally:
        torch.set_num_threads(before)
    assert rel(two, one) < 1e-6 and rel(y2, y1) < 1e-6


@needs_kernels
def test_products_refuse_wrong_tensors():
    F, _ = random_rows(4, 64, 32, 0)
    C, _ = random_rows(4, 64, 32, 0, cols=True)
    with pytest.raises(ValueError, match="float32 CPU"):
        lowbit.rowdot(C, torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 CPU"):
        lowbit.rowdot(C, torch.randn(64, 2).T)  # columns not contiguous
    with pytest.raises(ValueError, match="t of shape"):
        lowbit.axpy(F, torch.randn(2, 5), torch.zeros(2, 64))
    with pytest.raises(TypeError, match="by columns"):
        lowbit.rowdot(F, torch.randn(2, 64))
    with pytest.raises(TypeError, match="by rows"):
        lowbit.axpy(C, torch.randn(2, 4), torch.zeros(2, 64))


def test_no_compiler_falls_back_to_float(monkeypatch, tmp_path):
    """Without a working C compiler: one warning, why_not says why, auto -> float, codes refused."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ADAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.lowbit() is None
        assert any("not available" in str(w.message) for w in caught)
        assert "no C compiler" in native.why_not("lowbit")
        assert not lowbit.available()
        assert resolve_factors("auto", torch.float32, torch.device("cpu")) == "float"
        with pytest.raises(AdamixError, match="could not be built"):
            resolve_factors("codes", torch.float32, torch.device("cpu"))
    finally:
        native.load.cache_clear()


def test_a_failing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compiler", lambda: "false")  # exits 1, prints nothing
    with pytest.raises(RuntimeError, match="failed to build"):
        native.build("lowbit")
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left behind


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("ADAMIX_NATIVE", "0")
    native.load.cache_clear()
    try:
        assert native.lowbit() is None and "ADAMIX_NATIVE=0" in native.why_not("lowbit")
    finally:
        monkeypatch.delenv("ADAMIX_NATIVE")
        native.load.cache_clear()


def test_factor_modes():
    cpu = torch.device("cpu")
    assert resolve_factors("float", torch.float32, cpu) == "float"
    assert resolve_factors("packed", torch.float32, cpu) == "packed"
    assert resolve_factors("auto", torch.float64, cpu) == "float"
    with pytest.raises(AdamixError, match="float32 CPU models only"):
        resolve_factors("codes", torch.bfloat16, cpu)
    with pytest.raises(AdamixError, match="expected one of"):
        resolve_factors("fast", torch.float32, cpu)
    if lowbit.available():
        assert resolve_factors("auto", torch.float32, cpu) == "codes"


@needs_kernels
def test_plain_c_loops_without_avx2(monkeypatch, tmp_path):
    """The kernels built for a baseline x86-64 (no AVX2 / FMA: the plain C loops) give the same products."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the baseline build flag is x86-64's")
    monkeypatch.setenv("ADAMIX_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", [f if f != "-march=native" else "-march=x86-64" for f in native.FLAGS])
    native.load.cache_clear()
    try:
        assert native.lowbit() is not None and list(tmp_path.rglob("lowbit.so"))
        for k, L, g, k8 in [(70, 256, 128, 3), (6, 33, 7, 2)]:
            F, codes = random_rows(k, L, g, k8)
            C, _ = random_rows(k, L, g, k8, cols=True)
            D = dense64(F, codes)
            x, t = torch.randn(3, L), torch.randn(3, k)
            y = torch.zeros(3, L)
            lowbit.axpy(F, t, y)
            assert rel(lowbit.rowdot(C, x), x.double() @ D.T) < 1e-5 and rel(y, t.double() @ D) < 1e-5
            assert rel(lowbit.dequantize(F), D) < 1e-6 and rel(lowbit.dequantize(C), D) < 1e-6
    finally:
        native.load.cache_clear()

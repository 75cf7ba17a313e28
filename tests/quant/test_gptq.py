"""Mixed-precision GPTQ (quant.gptq) and the ADAMIX per-matrix pipeline (methods.adamix)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adamix.methods.adamix as adamix_method
from adamix.methods.svd_mixed import triplet_bits as triplet_cost
from adamix.methods.adamix import Settings, budget_bits, compress_matrix, target_correction
from adamix.methods.svd_mixed import decode_factors, expected_sizes, factors
from adamix.quant import grid
from adamix.quant.gptq import gptq_columns, gptq_rows, rtn_columns

WIDTHS = torch.tensor([2, 3, 4, 8])


pytestmark = pytest.mark.usefixtures("single_thread")


def correlated_inputs(n: int, T: int, gen: torch.Generator, outliers: int = 3) -> torch.Tensor:
    """X = A Z (n x T): neighbouring inputs strongly correlated (AR(0.9) mixing times a random
    perturbation), so H = X X^T is far from diagonal, plus a few large outlier input dimensions."""
    idx = torch.arange(n, dtype=torch.float64)
    L = torch.linalg.cholesky(0.9 ** (idx[:, None] - idx[None, :]).abs())
    A = L @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5)
    X = A @ torch.randn(n, T, generator=gen, dtype=torch.float64)
    X[torch.randperm(n, generator=gen)[:outliers]] *= 8.0
    return X


def h_error(Q: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """||(Q - W) X||_F^2 in float64, from the explicit inputs (= tr((Q - W) H (Q - W)^T))."""
    return float((((Q.double() - W.double()) @ X) ** 2).sum())


def random_widths(count: int, gen: torch.Generator) -> torch.Tensor:
    return WIDTHS[torch.randint(0, len(WIDTHS), (count,), generator=gen)]


def reference_gptq(W: torch.Tensor, H: torch.Tensor, quantize_column, damp: float = 0.01) -> torch.Tensor:
    """Textbook OBS/GPTQ in float64 (numpy), one column at a time, no lazy blocks: after quantizing
    column j, W[:, j+1:] -= (w_j - q_j) / Hinv_jj * Hinv_j,j+1: and Hinv loses row/column j (Schur
    downdate). quantize_column(j, W) gets the current W (torch, float64) and returns column j quantized."""
    W = W.double().numpy().copy()
    n = W.shape[1]
    H = H.double().numpy().copy()
    dead = np.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.diagonal(H).mean() * np.eye(n)
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    for j in range(n):
        Q[:, j] = quantize_column(j, torch.from_numpy(W)).double().numpy()
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= np.outer(err, Hinv[j, j + 1:])
        Hinv -= np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return torch.from_numpy(Q)


# ------------------------------------------------------------------------------- GPTQ vs RTN


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_rows_beats_rtn(group_size):
    ratios = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        k, n = 12, 96
        X = correlated_inputs(n, 300, gen)
        W = torch.randn(k, n, generator=gen)
        bits = random_widths(k, gen)
        q = gptq_rows(W, X @ X.T, bits, group_size)
        r = grid.rtn(W, bits, min(group_size, n))
        e_gptq, e_rtn = h_error(q["deq"], W, X), h_error(r["deq"], W, X)
        assert e_gptq <= e_rtn, f"seed {seed}: GPTQ {e_gptq:.4g} > RTN {e_rtn:.4g}"
        ratios.append(e_gptq / e_rtn)
    assert np.mean(ratios) < 0.7


def test_gptq_columns_beats_rtn_columns():
    ratios = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(100 + seed)
        m, k = 96, 24
        X = correlated_inputs(k, 300, gen)
        W = torch.randn(m, k, generator=gen)
        bits = random_widths(k, gen)
        q = gptq_columns(W, X @ X.T, bits, 32)
        r = rtn_columns(W, bits, 32)
        e_gptq, e_rtn = h_error(q["deq"], W, X), h_error(r["deq"], W, X)
        assert e_gptq <= e_rtn, f"seed {seed}: GPTQ {e_gptq:.4g} > RTN {e_rtn:.4g}"
        ratios.append(e_gptq / e_rtn)
    assert np.mean(ratios) < 0.8


def test_gptq_with_identity_gram_is_rtn():
    # H = I: no error is pushed onto other columns, so GPTQ reduces to RTN exactly.
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(6, 50, generator=gen)
    bits = random_widths(6, gen)
    q = gptq_rows(W, torch.eye(50), bits, 16)
    r = grid.rtn(W, bits, 16)
    for key in ("codes", "scale", "offset", "deq"):
        assert torch.equal(q[key], r[key]), key
    Wc = torch.randn(40, 5, generator=gen)
    bc = random_widths(5, gen)
    qc, rc = gptq_columns(Wc, torch.eye(5), bc, 16), rtn_columns(Wc, bc, 16)
    for key in ("codes", "scale", "offset", "deq"):
        assert torch.equal(qc[key], rc[key]), key


# ------------------------------------------------------------------ GPTQ vs a textbook reference


def test_gptq_rows_matches_textbook_obs():
    # n = 300, g = 32: several lazy-update blocks of 128 columns and a short last group (12 columns),
    # plus one input that never fires (H_jj = 0).
    gen = torch.Generator().manual_seed(3)
    k, n, g = 7, 300, 32
    X = correlated_inputs(n, 500, gen)
    X[17] = 0.0
    H = X @ X.T
    W = torch.randn(k, n, generator=gen)
    bits = random_widths(k, gen)
    grids = {}

    def quantize_column(j, Wcur):
        grp = j // g
        if grp not in grids:
            grids[grp] = grid.fit_grid(Wcur[:, grp * g:(grp + 1) * g], bits, g)
        s, o = grids[grp]
        return grid.dequantize(grid.quantize(Wcur[:, j:j + 1], s, o, bits), s, o)[:, 0]

    ref = reference_gptq(W, H, quantize_column)
    q = gptq_rows(W, H, bits, g)
    # float32 vs float64 arithmetic may flip an occasional rounding decision; nothing more
    assert (q["deq"].double() == ref).float().mean() > 0.97
    assert h_error(q["deq"], W, X) == pytest.approx(h_error(ref, W, X), rel=1e-3)
    assert bool((q["deq"][:, 17] == ref[:, 17]).all())


def test_gptq_columns_matches_textbook_obs():
    gen = torch.Generator().manual_seed(4)
    m, k, g = 70, 20, 32
    X = correlated_inputs(k, 200, gen)
    H = X @ X.T
    W = torch.randn(m, k, generator=gen)
    bits = random_widths(k, gen)

    def quantize_column(j, Wcur):
        return grid.rtn(Wcur[:, j][None].float(), bits[j:j + 1], g)["deq"][0]

    ref = reference_gptq(W, H, quantize_column)
    q = gptq_columns(W, H, bits, g)
    assert (q["deq"].double() == ref).float().mean() > 0.97
    assert h_error(q["deq"], W, X) == pytest.approx(h_error(ref, W, X), rel=1e-3)


# ------------------------------------------------------------------- codes reproduce deq exactly


@pytest.mark.parametrize("n, group_size", [(96, 32), (100, 32), (50, 128)])
def test_gptq_rows_codes_reproduce_deq(n, group_size):
    gen = torch.Generator().manual_seed(n)
    k = 9
    X = correlated_inputs(n, 200, gen)
    W = torch.randn(k, n, generator=gen)
    bits = random_widths(k, gen)
    q = gptq_rows(W, X @ X.T, bits, group_size)
    g = min(group_size, n)
    G = math.ceil(n / g)
    assert q["codes"].shape == (k, n) and q["codes"].dtype == torch.uint8
    assert q["scale"].shape == q["offset"].shape == (k, G)
    assert bool((q["codes"].long() <= (2 ** bits[:, None] - 1)).all())
    for t in (q["scale"], q["offset"]):  # what is stored is fp16: nothing is lost by storing it
        assert torch.equal(t.half().float(), t)
    s = grid.expand_groups(q["scale"].half().float(), n, g)
    o = grid.expand_groups(q["offset"].half().float(), n, g)
    assert torch.equal(grid.dequantize(q["codes"], s, o), q["deq"])


@pytest.mark.parametrize("m, group_size", [(96, 32), (70, 32), (40, 128)])
def test_gptq_columns_codes_reproduce_deq(m, group_size):
    gen = torch.Generator().manual_seed(m)
    k = 10
    X = correlated_inputs(k, 100, gen)
    W = torch.randn(m, k, generator=gen)
    bits = random_widths(k, gen)
    q = gptq_columns(W, X @ X.T, bits, group_size)
    g = min(group_size, m)
    assert q["codes"].shape == (k, m) and q["deq"].shape == (m, k)
    assert q["scale"].shape == (k, math.ceil(m / g))
    for t in (q["scale"], q["offset"]):
        assert torch.equal(t.half().float(), t)
    s = grid.expand_groups(q["scale"].half().float(), m, g)
    o = grid.expand_groups(q["offset"].half().float(), m, g)
    assert torch.equal(grid.dequantize(q["codes"], s, o).T, q["deq"])


# -------------------------------------------------------------------------- compress_matrix


def low_rank_delta(m: int, n: int, rank: int, gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    D = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
    return (D + noise * torch.randn(m, n, generator=gen, dtype=torch.float64)).float()


def relative_error(Dhat: torch.Tensor, D: torch.Tensor, X: torch.Tensor | None) -> float:
    """||(D^ - D) X|| / ||D X|| in float64 from explicit inputs (X None: Frobenius)."""
    E, D = Dhat.double() - D.double(), D.double()
    if X is not None:
        E, D = E @ X, D @ X
    return math.sqrt(float((E ** 2).sum()) / float((D ** 2).sum()))


def h_trace(E: torch.Tensor, H: torch.Tensor | None) -> float:
    """tr(E H E^T) in float64 with plain torch ops (H None: ||E||_F^2), independent of quant.linalg."""
    E = E.double()
    return float((E * E).sum() if H is None else torch.trace(E @ H.double() @ E.T))


@pytest.fixture
def captured(monkeypatch):
    """Record the in-memory quantized factors that compress_matrix hands to the encoder."""
    calls = []
    real = adamix_method.svd_mixed.encode_factors

    def spy(shape, widths, group_size, V, U, stats=None):
        calls.append({"widths": list(widths), "V": V, "U": U})
        return real(shape, widths, group_size, V, U, stats)

    monkeypatch.setattr(adamix_method.svd_mixed, "encode_factors", spy)
    return calls


@pytest.mark.parametrize("m, n, alpha, overhead, data", [
    (64, 96, 1 / 16, 0.0, False),
    (64, 96, 1 / 4, 4096.0, True),
    (128, 192, 1 / 32, 0.0, True),
    (72, 40, 1 / 2, 1000.0, True),
    (48, 200, 1 / 8, 0.0, False),
])
def test_compress_matrix_within_budget_and_decodes_to_memory(m, n, alpha, overhead, data, captured):
    gen = torch.Generator().manual_seed(m * n)
    D = low_rank_delta(m, n, 8, gen, noise=0.05)
    X = correlated_inputs(n, 2 * n, gen) if data else None
    H = None if X is None else X @ X.T
    settings = Settings(alpha=alpha, group_size=32)
    enc = compress_matrix(D, H, settings, overhead)
    assert enc.kind == "svd-mixed" and tuple(enc.shape) == (m, n)

    budget = budget_bits(m, n, alpha, overhead)
    assert budget == alpha * 16 * m * n - overhead
    assert enc.nbytes * 8 <= budget
    kept = [b for b, c in enc.meta["widths"] for _ in range(c)]
    assert len(kept) == enc.stats["rank_kept"] > 0
    assert kept == sorted(kept, reverse=True) and all(b in settings.widths for b in kept)
    assert sum(triplet_cost(m, n, b, 32) for b in kept) <= budget
    nbytes, nparams = expected_sizes((m, n), enc.meta)
    assert enc.tensors["codes"].numel() == nbytes and enc.tensors["params"].numel() == nparams

    # the stored form decodes bit for bit to the factors optimised in memory
    (call,) = captured
    assert call["widths"] == kept
    U, V = factors((m, n), enc.meta, enc.tensors)
    assert torch.equal(V, call["V"]["deq"].float())
    assert torch.equal(U, call["U"]["deq"].float())
    Dhat = decode_factors((m, n), enc.meta, enc.tensors)
    assert torch.equal(Dhat, U @ V)

    # step 5 as documented: U* refitted to the quantized V^, then quantized with GPTQ on
    # H_z = V^ H V^^T (RTN without data) at the same widths
    Vhat = call["V"]["deq"].double()
    Ustar = target_correction(D, H, Vhat, settings.fit_damp).float()
    bits = torch.tensor(kept)
    if H is None:
        expect = rtn_columns(Ustar, bits, 32)
    else:
        expect = gptq_columns(Ustar, (Vhat @ H.double() @ Vhat.T).float(), bits, 32, damp=settings.damp)
    assert torch.equal(U, expect["deq"])

    # stats: measured error of the decoded factors' exact product U^ V^ (not its float32 rounding
    # Dhat) from an independent float64 computation; the method gets it from its factors
    # (linalg.factored_error: E(0) - 2 tr(U^T D H V^T) + tr(U^T U V H V^T)) or, near cancellation,
    # directly
    exact = U.double() @ V.double()
    assert enc.stats["error_measured"] == pytest.approx(relative_error(exact, D, X), rel=1e-9)
    # and from the Gram itself, tr((D^ - D) H (D^ - D)^T) / tr(D H D^T), with plain float64 torch ops
    # (not quant.linalg): both sides are float64 sums of the same n-term products, so they agree to
    # ~n * 2^-53 ~ 1e-14 relative; 1e-12 leaves a wide margin for summation order
    assert enc.stats["energy"] == pytest.approx(h_trace(D, H), rel=1e-12)
    # float64 rounding only, amplified by E(0) / E(D^) < 1e4 where the identity is used
    assert enc.stats["error_measured"] == pytest.approx(math.sqrt(h_trace(exact - D.double(), H) / h_trace(D, H)), rel=1e-10)
    # a real compression: far better than dropping D, the noise floor aside
    assert enc.stats["error_measured"] < 0.5


@pytest.mark.parametrize("data", [False, True])
def test_compress_matrix_exact_low_rank_at_8_bits(data):
    gen = torch.Generator().manual_seed(11 + data)
    m, n = 48, 80
    D = low_rank_delta(m, n, 3, gen)
    X = correlated_inputs(n, 160, gen) if data else None
    H = None if X is None else X @ X.T
    enc = compress_matrix(D, H, Settings(alpha=1.0, widths=(0, 8), group_size=32))
    assert enc.nbytes * 8 <= budget_bits(m, n, 1.0)
    assert enc.stats["rank_kept"] >= 3
    U, V = factors((m, n), enc.meta, enc.tensors)
    assert relative_error(decode_factors((m, n), enc.meta, enc.tensors), D, X) < 1e-2
    err = relative_error(U.double() @ V.double(), D, X)  # the stats measure the exact product of the factors
    assert enc.stats["error_measured"] == pytest.approx(err, rel=1e-9)
    # the allocation's prediction is of the same order as what was measured
    assert enc.stats["error_predicted"] < 1e-2


def test_compress_matrix_more_budget_less_error():
    gen = torch.Generator().manual_seed(5)
    m, n = 64, 96
    D = low_rank_delta(m, n, 12, gen, noise=0.02)
    X = correlated_inputs(n, 200, gen)
    H = X @ X.T
    errs = [compress_matrix(D, H, Settings(alpha=a, group_size=32)).stats["error_measured"] for a in (1 / 8, 1 / 4, 1 / 2)]
    assert errs[0] > errs[1] > errs[2]


def test_compress_matrix_budget_counts_packing_padding():
    m, n = 33, 35  # odd sizes: 3-bit streams do not end on byte boundaries
    c3 = triplet_cost(m, n, 3, 128)
    alpha = 3 * c3 / (16 * m * n)  # room for exactly 3 triplets
    D = low_rank_delta(m, n, 6, torch.Generator().manual_seed(0))
    enc = compress_matrix(D, None, Settings(alpha=alpha, widths=(0, 3)))
    # three triplets fit the linear count but not once each stream is padded to whole bytes
    assert enc.meta["widths"] == [[3, 2]]
    assert enc.nbytes * 8 <= budget_bits(m, n, alpha)


@pytest.mark.parametrize("data", [False, True])
def test_compress_matrix_nothing_fits(data):
    m = n = 64
    D = low_rank_delta(m, n, 4, torch.Generator().manual_seed(1))
    X = correlated_inputs(n, 128, torch.Generator().manual_seed(2)) if data else None
    H = None if X is None else X @ X.T
    settings = Settings(alpha=1 / 16, widths=(0, 2, 8), group_size=32)
    smallest = triplet_cost(m, n, 2, 32)
    total = 1 / 16 * 16 * m * n  # 4096 bits before the overhead
    for overhead in (total - smallest + 1, total, total + 5000.0):
        enc = compress_matrix(D, H, settings, overhead)
        assert enc.stats["rank_kept"] == 0 and enc.meta["widths"] == []
        assert enc.nbytes == 0
        assert torch.equal(decode_factors((m, n), enc.meta, enc.tensors), torch.zeros(m, n))
        assert enc.stats["error_measured"] == pytest.approx(1.0, rel=1e-12)
        assert enc.stats["error_predicted"] == pytest.approx(1.0, rel=1e-9)
    # one bit more and the cheapest triplet fits
    enc = compress_matrix(D, H, settings, total - smallest)
    assert enc.meta["widths"] == [[2, 1]]
    assert enc.nbytes * 8 <= smallest


# ------------------------------------------------------------------------- target_correction


@pytest.mark.parametrize("data", [False, True])
def test_target_correction_is_least_squares(data):
    gen = torch.Generator().manual_seed(21 + data)
    m, n, k, T = 30, 40, 6, 120
    D = torch.randn(m, n, generator=gen, dtype=torch.float64)
    Vhat = torch.randn(k, n, generator=gen, dtype=torch.float64)
    X = correlated_inputs(n, T, gen) if data else torch.eye(n, dtype=torch.float64)
    H = (X @ X.T) if data else None
    U = target_correction(D, H, Vhat, damp=0.0)
    assert U.dtype == torch.float64 and U.shape == (m, k)
    # min_U ||U (V^ X) - D X||_F  <=>  (V^ X)^T U^T ~ (D X)^T
    ref = torch.linalg.lstsq((Vhat @ X).T, (D @ X).T).solution.T
    torch.testing.assert_close(U, ref, rtol=1e-7, atol=1e-9)
    # a tiny damping barely moves it; a large one shrinks it
    U_small = target_correction(D, H, Vhat, damp=1e-10)
    torch.testing.assert_close(U_small, ref, rtol=1e-6, atol=1e-8)
    U_big = target_correction(D, H, Vhat, damp=10.0)
    assert float(U_big.norm()) < float(ref.norm())


def test_target_correction_beats_plain_svd_factor():
    # With quantized V^, refitting U lowers the output error compared to keeping U S.
    gen = torch.Generator().manual_seed(8)
    m, n, k = 40, 64, 5
    D = low_rank_delta(m, n, k, gen).double()
    X = correlated_inputs(n, 200, gen)
    H = X @ X.T
    Uf, s, Vh = torch.linalg.svd(D, full_matrices=False)
    Vhat = grid.rtn(Vh[:k].float(), torch.full((k,), 2), 16)["deq"].double()
    Ustar = target_correction(D, H, Vhat, damp=1e-8)
    e_star = h_error(Ustar @ Vhat, D, X)
    e_svd = h_error((Uf[:, :k] * s[:k]) @ Vhat, D, X)
    assert e_star < 0.9 * e_svd


def test_cholesky_of_a_gram_that_is_not_positive_definite_is_refused():
    from adamix.quant.gptq import cholesky_inverse_upper
    with pytest.raises(RuntimeError, match="GPTQ: the Gram is not positive definite even with a damping of 1.0 x"):
        cholesky_inverse_upper(-torch.eye(8), damp=0.01)
    C, dead, damp = cholesky_inverse_upper(torch.diag(torch.tensor([4.0, 0.0, 1.0])), damp=0.0)
    assert damp == 0.0
    assert dead.tolist() == [False, True, False]
    torch.testing.assert_close(C.T @ C, torch.diag(torch.tensor([0.25, 1.0, 1.0])))  # C^T C = (H, dead -> 1)^-1


@pytest.mark.parametrize("seed", range(3))
def test_grid_fit_at_once_is_the_loop_bit_for_bit(seed):
    # fit_grid tries every shrink at once (GPU, small inputs) or one after the other: the same grids
    g = torch.Generator().manual_seed(seed)
    for trial in range(40):
        k, L = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 500, (1,), generator=g))
        x = torch.randn(k, L, generator=g) * 10 ** float(torch.randint(-4, 2, (1,), generator=g))
        if trial % 5 == 0:
            x = torch.round(x * 4) / 4  # equal errors between shrinks: the first one must win in both
        bits = torch.randint(1, 9, (k,), generator=g)
        xg, maxq = grid._grouped(x, 16), (2.0 ** bits.float() - 1).view(-1, 1, 1)
        a, b = grid._fit_loop(xg, maxq), grid._fit_at_once(xg, maxq)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_factor_of_the_inverse_is_the_reference_gptq_one():
    # C upper with C^T C = (H + damp mean(diag H) I)^-1 (dead inputs given H_jj = 1): against the
    # float64 reference (factor, inverse, factor of the inverse)
    from adamix.quant.gptq import cholesky_inverse_upper
    g = torch.Generator().manual_seed(11)
    for n in (5, 257, 600, 1100):  # 1100: three levels of halves above the solve's blocks
        X = torch.randn(n + 50, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
        H = X.T @ X
        H[3], H[:, 3] = 0.0, 0.0  # an input that never fires
        Hf = H.float()
        before = Hf.clone()
        C, dead, damp = cholesky_inverse_upper(Hf, damp=0.01)
        assert damp == 0.01  # positive definite: the asked damping
        assert torch.equal(Hf, before)  # the caller's Gram is never written
        A = H.clone()
        A.diagonal()[3] = 1.0
        A.diagonal().add_(0.01 * A.diagonal().mean())
        ref = torch.linalg.cholesky(torch.linalg.inv(A), upper=True)
        assert torch.equal(C, C.triu()) and dead.tolist() == [j == 3 for j in range(n)]
        assert float((C.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def _gram_with_a_rounding_dip(n: int = 60, dip: float = 3.0) -> torch.Tensor:
    # H = X^T X with one direction holding most of its trace, minus dip x mean(diag) along another: what
    # float32 rounding does to such a Gram, made exact (eigenvalue -dip mean(diag) + tiny)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n // 2, n, generator=g, dtype=torch.float64)  # rank n/2: eigenvalues 0 below
    u = torch.randn(n, generator=g, dtype=torch.float64)
    H = X.T @ X + 1e3 * torch.outer(u, u)
    _, Q = torch.linalg.eigh(H)
    w = Q[:, 0]  # a null direction of H
    return H - dip * float(H.diagonal().mean()) * torch.outer(w, w)


def test_a_gram_below_the_damping_raises_the_damping_by_steps():
    # the asked damping (0.01) cannot make it positive definite, 10x does: that factor, and its damping
    from adamix.quant.gptq import cholesky_inverse_upper
    H = _gram_with_a_rounding_dip(dip=0.05)
    C, dead, damp = cholesky_inverse_upper(H.float(), damp=0.01)
    assert damp == pytest.approx(0.1) and not dead.any()
    A = H.clone()
    A.diagonal().add_(0.1 * A.diagonal().mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(A), upper=True)
    assert float((C.double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_gptq_rows_error_uses_the_damping_it_factored_with():
    # with the raised damping, gptq_rows' error (from GPTQ's own column errors) is still
    # (w - q)^T H (w - q) per row, against the float64 product
    from adamix.quant.gptq import gptq_rows
    H = _gram_with_a_rounding_dip(dip=0.05)
    g = torch.Generator().manual_seed(6)
    W = torch.randn(7, H.shape[0], generator=g)
    for grid_name in ("uniform", "normal"):
        out = gptq_rows(W, H.float(), torch.tensor([2, 3, 4, 8, 2, 3, 4]), 16, damp=0.01, with_error=True,
                        grid=grid_name)
        d = (W.double() - out["deq"].double())
        direct = ((d @ H) * d).sum(1)
        torch.testing.assert_close(out["error"], direct, rtol=1e-3, atol=1e-3 * float(direct.abs().max()))


def test_the_shared_factor_is_computed_once_per_gram_and_freed_with_it():
    # consecutive calls on one Gram (a block's q, k, v) get the very factor cholesky_inverse_upper
    # computes; a Gram written in place, another damping or another Gram compute afresh; the memo's
    # entry goes when its Gram is freed
    import gc
    import weakref
    from adamix.quant import gptq
    g = torch.Generator().manual_seed(2)
    X = torch.randn(80, 30, generator=g)
    H = X.T @ X
    first = gptq.shared_factor(H, 0.01)
    assert gptq.shared_factor(H, 0.01) is first
    assert torch.equal(first.C, gptq.cholesky_inverse_upper(H, 0.01).C)
    other = gptq.shared_factor(H, 0.1)
    assert other is not first and other.damp == 0.1
    H.mul_(2.0)  # written in place: its version changes
    doubled = gptq.shared_factor(H, 0.1)
    assert doubled is not other and torch.allclose(doubled.C, other.C / 2 ** 0.5, rtol=1e-5, atol=1e-6)
    kept = weakref.ref(doubled.C)
    del doubled, other, first, H
    gc.collect()
    assert kept() is None  # nothing holds the factor once its Gram is gone

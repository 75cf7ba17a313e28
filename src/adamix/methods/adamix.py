"""ADAMIX (arXiv 2506.11087): mixed-precision singular vectors chosen by an exact ILP.

For one delta D (m x n) with input Gram H (n x n; None = data-free, H = I):
1. SVD  D = U S V^T.
2. Error table e_i(b) for every triplet i and width b (allocate.error_table).
3. Widths b_i from the 0/1 ILP under budget = alpha * 16 * m * n bits minus this tensor's share of
   the file header and manifest (`overhead_bits`, set by the pipeline) (allocate.solve_allocation).
4. V step: the kept rows of V^T (k x n) quantized at their widths with GPTQ on H (RTN if data-free);
   the error table made these very rows when it measured them (GPTQ's rows are independent, up to
   the rounding of its BLAS updates), so they are taken from it.
5. U step, reconstruction target correction: U* = D H V^^T (V^ H V^^T + lambda I)^-1 (m x k), the
   least-squares fit of the original outputs D X from the quantized z = V^ x; then U* quantized
   column by column at the same widths with GPTQ on H_z = V^ H V^^T (RTN if data-free).
   With Settings.correct_target False (the Delta-CoMe peer) U S itself is quantized that way.
With Settings.grid "normal" every step runs on the rotated delta D' = R_m D R_n^T and Gram
H' = R_n H R_n^T (quant.hadamard, seeded by Settings.seed), whose output error equals D's, and the
vectors take quant.normal's Gaussian grid (one scale each) instead of per-group uniform grids; the
stored kind is then "svd-rotated" (methods.svd_rotated), which undoes the rotation when decoding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from . import svd_mixed, svd_rotated
from .allocate import choose_widths, error_table, max_kept, served_count, shrink_to_fit, stored_rows
from ..quant import hadamard, normal
from ..quant.gptq import gptq_columns, gptq_rows, rtn_columns
from ..quant.linalg import (factored_error, matmul64, output_error, product64, relative_errors, svd, whitened_spectrum,
                            whitened_svd, working_dtype)
from ..timing import phase
from .kinds import Encoded
from .registry import Method, Settings, budget_bits, register
from .svd_mixed import PACK_PAD_BITS


@dataclass
class Analysis:
    """Everything the allocation needs about one delta: its factors, error table, costs and budget."""
    D: torch.Tensor
    H: torch.Tensor | None
    U: torch.Tensor     # (m, k), s (k,), V (n, k): the leading k triplets, all r = min(m, n) unless the
    s: torch.Tensor     # table was pruned on a whitened Gram SVD (only the vectors of the triplets it
    V: torch.Tensor     # measured were computed, linalg.Spectrum)
    table: np.ndarray   # (r, len(widths)) e_i(b)
    costs: np.ndarray   # (len(widths),) bits of one triplet at each width
    budget: float       # bits this tensor may take
    pruned_for: float | None = None  # a pruned table (error_table's max_kept) serves this budget (no cap or
    pruned_cap: int | None = None    # this cap), and any budget and cap under which at most
    pruned_count: int | None = None  # pruned_count triplets fit (allocate.served_count)
    codes: dict | None = None        # V's GPTQ codes and grids of the measured rows (allocate.error_table)
    seed: int | None = None          # grid "normal": D, H, U, V are rotated with this seed (quant.hadamard)
    energy: float | None = None      # E(0) = tr(D H D^T) = sum_i e_i(0), where the whitened SVD gave e_i(0)


def analyse(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
            factors: tuple[torch.Tensor, ...] | None = None, prune: bool = False) -> Analysis:
    """Steps 1-2 (SVD, error table) and the tensor's budget. factors: svd(D, H, settings.whiten) if
    already computed (the benchmark shares it across methods and ratios). prune: measure only the
    triplets that an optimal choice within this budget may keep (allocate.error_table's max_kept);
    the table then serves the ILP of this budget or a smaller one, not a fixed schedule."""
    m, n = D.shape
    g = settings.group_size
    seed = None
    if settings.grid == "normal":  # the whole method on R_m D R_n^T and R_n H R_n^T
        seed = settings.seed
        D = hadamard.rotate_matrix(D, seed)
        H = None if H is None else hadamard.rotate_gram(H, seed)
        if factors is not None:
            U, s, V = factors
            factors = (hadamard.rotate(U.T, seed).T, s, hadamard.rotate(V.T, seed).T)
    costs = np.array([triplet_bits(m, n, b, settings) for b in settings.widths], dtype=np.float64)
    budget = budget_bits(m, n, settings.alpha, overhead_bits)
    kept = max_kept(costs, budget) if prune and (costs > 0).any() else None
    if kept is not None and settings.max_rank is not None:
        kept = min(kept, settings.max_rank)  # a cap keeps fewer: the pruning argument holds for the smaller count
    e0 = energy = spectrum = None
    if factors is not None:
        U, s, V = factors
    elif settings.whiten and H is not None and settings.svd == "gram" \
            and (spectrum := whitened_spectrum(D, H)) is not None:
        # pruned: the vectors of the triplets the table measures only (a truncated SVD, grown on demand)
        U, s, V, _ = spectrum.vectors(0 if kept is not None else len(spectrum))
        e0, energy = spectrum.bound, spectrum.energy
    elif settings.whiten and H is not None:
        U, s, V, e0 = whitened_svd(D, H, settings.svd)
        energy = float(e0.sum())
    else:
        U, s, V = svd(D, H, settings.whiten, settings.svd)
    codes: dict = {}
    priced = kept is not None and settings.max_rank is None  # allocate.priced_out: this budget, no cap
    table = error_table(s, U, V, H, list(settings.widths), g, max_kept=kept, damp=settings.damp, codes=codes,
                        grid=settings.grid, costs=costs if priced else None,
                        budget=budget if priced else None, e0=e0,
                        grow=None if spectrum is None else spectrum.vectors).cpu().numpy()
    if spectrum is not None:
        U, s, V, _ = spectrum.vectors(spectrum.count)
        del spectrum  # the eigenvectors and the whitened delta it held
    pruned = (budget, settings.max_rank, served_count(table, list(settings.widths).index(0))) if kept is not None \
        else (None, None, None)
    return Analysis(D, H, U, s, V, table, costs, budget, *pruned, codes or None, seed, energy)


def triplet_bits(m: int, n: int, width: int, settings: Settings) -> int:
    """What the ILP counts for one triplet of an m x n delta at `width`, on settings' grid."""
    if settings.grid == "normal":
        return svd_rotated.triplet_bits(m, n, width)
    return svd_mixed.triplet_bits(m, n, width, settings.group_size)


def stored_size(shape: tuple[int, int], groups: list[list[int]], settings: Settings) -> int:
    """Exact stored bits of an entry keeping `groups` ([[b, count], ...], widest first) on settings' grid."""
    if settings.grid == "normal":
        return svd_rotated.stored_bits(shape, svd_rotated.width_meta(settings.seed, groups))
    return svd_mixed.stored_bits(shape, svd_mixed.width_meta(settings.group_size, groups))


def compress_matrix(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, overhead_bits: float = 0.0,
                    analysis: Analysis | None = None) -> Encoded:
    """ADAMIX on one delta D (m x n) with input Gram H (n x n) or None. Returns an Encoded "svd-mixed".

    The stored codes and grids take at most budget_bits(m, n, settings.alpha, overhead_bits) bits.
    analysis: analyse(D, H, settings) if already computed (its budget is replaced by this one, which a
    pruned table must serve: check_served).
    """
    m, n = D.shape
    if analysis is None:
        a = analyse(D, H, settings, overhead_bits, prune=True)
    else:
        a = dataclasses.replace(analysis, budget=budget_bits(m, n, settings.alpha, overhead_bits))
        check_served(a, settings.max_rank)
    return finish(a, decide(a, settings), a.budget, settings)


def check_served(a: Analysis, cap: int | None) -> None:
    """ValueError unless a's (pruned) table has the full table's optimum at a.budget under rank cap `cap`."""
    if a.pruned_for is None or (a.budget == a.pruned_for and cap == a.pruned_cap):
        return
    count = max_kept(a.costs, a.budget) if cap is None else min(max_kept(a.costs, a.budget), cap)
    if count > a.pruned_count:
        made = f"{a.pruned_for:.0f} bits" + ("" if a.pruned_cap is None else f" and rank {a.pruned_cap}")
        asked = f"{a.budget:.0f} bits" + ("" if cap is None else f" and rank {cap}")
        raise ValueError(f"the error table was pruned for {made}; it cannot serve {asked}")


def decide(a: Analysis, settings: Settings) -> np.ndarray:
    """Step 3, the CPU-only one: the ILP's width index per triplet (r,)."""
    return choose_widths(a.table, a.costs, a.budget, cap=settings.max_rank)


def joint_reserve_bits(settings: Settings) -> int:
    """Bits each tensor of a shared allocation sets aside: the byte padding of its two packed code
    streams per width (svd_mixed.PACK_PAD_BITS each)."""
    return PACK_PAD_BITS * sum(1 for b in settings.widths if b > 0)


def compress_jointly(analyses: list[Analysis], settings: Settings) -> list[Encoded]:
    """One ILP over the triplets of several deltas (e.g. the linears of a block) under the sum of their
    budgets: bits go where they remove the most output error, sum_l ||(D^_l - D_l) X_l||^2.

    Each tensor reserves joint_reserve_bits for the byte padding of its packed streams.
    """
    choices = allocate_jointly([(a.table, a.costs, a.budget) for a in analyses], settings)
    return [complete_joint(a, c, settings) for a, c in zip(analyses, choices)]


def allocate_jointly(parts: list[tuple[np.ndarray, np.ndarray, float]], settings: Settings,
                     weights: list[float] | None = None) -> list[np.ndarray]:
    """Step 3 for several deltas at once: [(table (r_l, B), costs (B,), budget_l)] -> the width index
    per triplet of each, from one ILP

        min sum_l w_l sum_i e_li(b_li)   s.t.   sum_li cost(b_li) <= sum_l (budget_l - reserve)

    (w_l = 1 without `weights`; a rank cap holds per delta). Each delta reserves joint_reserve_bits."""
    if not parts:
        return []
    reserve = joint_reserve_bits(settings)
    w = [1.0] * len(parts) if weights is None else [float(x) for x in weights]
    table = np.concatenate([t * wl for (t, _, _), wl in zip(parts, w)])
    costs = np.concatenate([np.broadcast_to(c, t.shape) for t, c, _ in parts])
    budget = sum(b - reserve for _, _, b in parts)
    matrix = np.concatenate([np.full(len(t), i) for i, (t, _, _) in enumerate(parts)])  # the cap is per matrix
    choice = choose_widths(table, costs, budget, cap=settings.max_rank, groups=matrix)
    return list(np.split(choice, np.cumsum([len(t) for t, _, _ in parts])[:-1]))


def complete_joint(a: Analysis, choice: np.ndarray, settings: Settings) -> Encoded:
    """Steps 4-5 of one delta of a shared allocation: its budget is what its choice costs plus its reserve."""
    return finish(a, choice, float(a.costs[choice].sum()) + joint_reserve_bits(settings), settings)


STASHED = ("U", "s", "V", "table", "costs")


def stash(a: Analysis) -> dict[str, torch.Tensor]:
    """What a two-pass allocation keeps of an analysis on disk (the factors, the error table, the
    costs and the budget, and the rotation's seed where there is one), as CPU tensors; D and H are
    read again for the second pass (unstash)."""
    out = {k: torch.as_tensor(getattr(a, k)).cpu().contiguous() for k in STASHED}
    out["budget"] = torch.tensor([a.budget], dtype=torch.float64)
    if a.seed is not None:
        out["seed"] = torch.tensor([a.seed], dtype=torch.int64)
    return out


def unstash(tensors: dict[str, torch.Tensor], D: torch.Tensor, H: torch.Tensor | None) -> Analysis:
    """The Analysis that `stash` kept, with D and H given again (factors on D's device; D and H rotated
    again where the stash has a seed); the V step then quantizes the kept rows afresh (the table's
    codes, up to the rounding of GPTQ's BLAS updates in another batch of rows)."""
    U, s, V = (tensors[k].to(D.device) for k in ("U", "s", "V"))
    seed = int(tensors["seed"][0]) if "seed" in tensors else None
    if seed is not None:
        D, H = hadamard.rotate_matrix(D, seed), None if H is None else hadamard.rotate_gram(H, seed)
    return Analysis(D, H, U, s, V, tensors["table"].numpy(), tensors["costs"].numpy(), float(tensors["budget"][0]),
                    seed=seed)


def finish(a: Analysis, choice: np.ndarray, budget: float, settings: Settings) -> Encoded:
    """Steps 4-5 for the widths `choice` (index into settings.widths per triplet)."""
    widths = list(settings.widths)
    choice = fit_packed_size(choice, a.table, widths, tuple(a.D.shape), settings, budget)
    chosen = np.array(widths)[choice]
    rows = np.arange(len(a.table))
    predicted = float(a.table[rows, choice].sum())
    gain = a.table[rows, widths.index(0)] - a.table[rows, choice]  # e_i(0) - e_i(b_i)
    keep = sorted(np.flatnonzero(chosen > 0).tolist(), key=lambda i: (-chosen[i], i))
    kept_widths = [int(chosen[i]) for i in keep]
    stored = stored_rows(a.codes, keep, kept_widths, settings.group_size) if a.H is not None else None
    enc = quantize_factors(a.D, a.H, a.U[:, keep], a.s[keep], a.V[:, keep], kept_widths, settings, predicted,
                           torch.from_numpy(gain[keep]), stored, a.energy)
    enc.detail["widths_by_index"] = chosen
    return enc


def fit_packed_size(choice: np.ndarray, table: np.ndarray, widths: list[int], shape: tuple[int, int],
                    settings: Settings, budget: float) -> np.ndarray:
    """The ILP counts b (m + n) bits per triplet; packing pads each width's two code streams to whole
    bytes. Drop the kept triplet that costs least error until the exact stored size fits the budget."""
    def fits(c: np.ndarray) -> bool:
        counts = np.bincount(c, minlength=len(widths))
        groups = [[b, int(k)] for b, k in sorted(zip(widths, counts), reverse=True) if b > 0 and k > 0]
        return stored_size(shape, groups, settings) <= max(budget, 0.0)

    return shrink_to_fit(choice, table, widths.index(0), fits)


def quantize_factors(D: torch.Tensor, H: torch.Tensor | None, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
                     widths: list[int], settings: Settings, predicted: float, gains: torch.Tensor,
                     stored: dict[str, torch.Tensor] | None = None, energy: float | None = None) -> Encoded:
    """Steps 4-5 for the kept triplets (U (m, k), s (k,), V (n, k), widths (k,) non-increasing);
    gains (k,): e_i(0) - e_i(b_i) in the error table's units, stored relative to E(0) = ||D X||^2.
    stored: V^T's GPTQ at these widths if the error table already made it (allocate.stored_rows).
    energy: E(0) if known (Analysis.energy), else a pass over D H D^T."""
    m, n = D.shape
    g = settings.group_size
    bits = torch.tensor(widths, dtype=torch.int64, device=D.device)
    energy = output_error(None, D, H) if energy is None else energy
    relative = (gains.double() / energy).clamp(0.0, 1.0) if energy > 0 else torch.zeros(len(widths), dtype=torch.float64)
    rotated = settings.grid == "normal"  # D, H (and U, V) are the rotated ones (analyse)

    def encode(V_: dict, U_: dict):
        if rotated:
            return svd_rotated.encode_factors((m, n), widths, settings.seed, V_, U_, relative)
        return svd_mixed.encode_factors((m, n), widths, g, V_, U_, relative)

    if not widths:  # nothing fits the budget: D^ = 0
        enc = encode({}, {})
        enc.stats = {"rank_kept": 0, **relative_errors(energy, energy, predicted)}
    else:
        Vt = V.T.float().contiguous()
        if stored is not None:
            vq = stored
        elif H is None:
            vq = normal.rtn_on(settings.grid, Vt, bits, g)
        else:
            vq = gptq_rows(Vt, H, bits, g, damp=settings.damp, grid=settings.grid)
        with phase("target correction"):
            Vhat, dtype = vq["deq"].double(), working_dtype(D)  # products with H and D in D's working dtype
            HV = Vhat.T if H is None else product64(H, Vhat.T, dtype)  # (n, k): H V^^T
            Gz, rhs = Vhat @ HV, product64(D, HV, dtype)  # V^ H V^^T (k, k), the Gram of z = V^ x; D H V^^T (m, k)
            if settings.correct_target:
                Ustar = target_correction(D, H, Vhat, settings.fit_damp, HV, Gz, rhs).float()
            else:  # Delta-CoMe: quantize U S itself, GPTQ on the quantized V's outputs compensating
                Ustar = (U * s).float()
        uq = rtn_columns(Ustar, bits, g, settings.grid) if H is None else \
            gptq_columns(Ustar, Gz.float(), bits, g, damp=settings.damp, grid=settings.grid)
        enc = encode(on_cpu(vq), on_cpu(uq))
        decode = svd_rotated.rotated_factors if rotated else svd_mixed.factors  # in D's coordinates
        Ud, Vd = (t.to(D.device) for t in decode((m, n), enc.meta, enc.tensors))  # what was stored: D^ = U^ V^
        with phase("target correction"):  # the measured error, from the correction's products
            measured = factored_error(Ud, rhs, Gz, energy) if torch.equal(Vd, vq["deq"]) else 0.0
            if measured < 1e-4 * energy:  # V^ not the one of rhs and Gz, or near cancellation: a pass over D H D^T
                measured = output_error(Ud.double() @ Vd.double(), D, H)
        enc.stats = {"rank_kept": len(widths), **relative_errors(measured, energy, predicted)}
    return enc


def on_cpu(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPTQ result (codes, grids, deq) on the CPU, for packing."""
    return {k: v.cpu() for k, v in q.items()}


def target_correction(D: torch.Tensor, H: torch.Tensor | None, Vhat: torch.Tensor, damp: float,
                      HV: torch.Tensor | None = None, G: torch.Tensor | None = None,
                      rhs: torch.Tensor | None = None) -> torch.Tensor:
    """U* = argmin_U ||U V^ X - D X||_F = D H V^^T (V^ H V^^T + damp * mean diag I)^-1, float64 (m, k).

    HV: H V^^T (n, k), G: V^ H V^^T (k, k) and rhs: D H V^^T (m, k), float64, if the caller has them."""
    if HV is None:
        HV = Vhat.T.double() if H is None else matmul64(H, Vhat.T)  # (n, k)
    G = Vhat.double() @ HV if G is None else G  # (k, k)
    G = G + damp * torch.diagonal(G).mean().clamp_min(1e-30) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    rhs = matmul64(D, HV) if rhs is None else rhs  # (m, k)
    return torch.linalg.solve(G, rhs.T).T  # G symmetric: U* G = rhs


class Adamix(Method):
    """ADAMIX: widths per singular triplet from the exact ILP, GPTQ, reconstruction target correction."""
    name = "adamix"
    help = "adamix (default): ADAMIX, per-triplet widths from an exact ILP on the measured error, GPTQ, target correction"
    unit = "singular triplet or row"
    options = frozenset({"whiten", "budget_scope", "max_rank", "svd", "grid"})
    kinds = ("svd-mixed", "svd-rotated")
    device_resident = True
    joint = True

    def item_bits(self, m, n, settings):
        b = min(w for w in settings.widths if w > 0)
        return stored_size((m, n), [[b, 1]], settings)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_matrix(D, H, settings, overhead_bits, analysis)

    def analyse(self, D, H, settings, overhead_bits=0.0):
        return analyse(D, H, settings, overhead_bits)

    def compress_joint(self, analyses, settings):
        return compress_jointly(analyses, settings)

    def allocate_joint(self, parts, settings, weights=None):
        return allocate_jointly(parts, settings, weights)

    def complete_joint(self, analysis, choice, settings):
        return complete_joint(analysis, choice, settings)

    def stash(self, analysis):
        return stash(analysis)

    def unstash(self, tensors, D, H):
        return unstash(tensors, D, H)

    def joint_reserve_bits(self, settings):
        return joint_reserve_bits(settings)

    staged = True

    def prepare(self, D, H, settings, overhead_bits=0.0):
        return analyse(D, H, settings, overhead_bits, prune=True)

    def decide(self, prepared, settings):
        return decide(prepared, settings)

    def complete(self, prepared, decision, settings):
        return finish(prepared, decision, prepared.budget, settings)


register(Adamix())

"""Would two-dimensional Gaussian grids (HIGGS) pay on top of `--grid normal`? An experiment, not an option.

    python benchmarks/vector_grids.py [--pair minilm|smollm] [--ratios 1/16,1/32,1/64] [--blocks N]

After the random Hadamard rotation (quant.hadamard) a vector's entries are close to N(0, sigma^2).
`--grid normal` rounds each entry to the b-bit Lloyd-Max grid of N(0, 1) (quant.normal). A
two-dimensional grid rounds each PAIR of consecutive entries to the nearest of 2^(2b) points, the
optimum for a pair of independent N(0, 1) values: Lloyd's algorithm (k-means) on 200000 seeded
Gaussian pairs, started from the product of the scalar grid with itself, 100 iterations (at 8 bits,
65536 points, the scalar grid is kept). Both store b bits per entry and one fp16 scale per vector.

For every calibrated linear, the error table e_i(b) of both grids with adamix's model (the rotated
whitened SVD; v by GPTQ on the rotated Gram, the pair's two columns chosen together when GPTQ
reaches the first, the error of both pushed on as usual; u by round-to-nearest; allocate.error_table's
formula), then one ILP per tensor and ratio. Reported: the predicted output error of the 2-D grid as
a ratio to the scalar one, and both as ratios to the default uniform grid (its own table); and the
mean squared error of each grid on N(0, 1) samples.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from calibrated import calibrated_deltas, pair_arguments, pair_paths  # noqa: E402
from pages import ratio_name  # noqa: E402
from adamix.methods import Settings  # noqa: E402
from adamix.methods.adamix import analyse, triplet_bits  # noqa: E402
from adamix.methods.allocate import choose_widths  # noqa: E402
from adamix.methods.registry import budget_bits  # noqa: E402
from adamix.quant import hadamard, normal  # noqa: E402
from adamix.quant.gptq import gptq, gptq_rows  # noqa: E402
from adamix.quant.linalg import output_error, svd  # noqa: E402

SCALE_FACTORS = normal.SCALE_FACTORS
SEED = 0


def pair_grid(bits: int) -> torch.Tensor:
    """The 2^(2 bits) points (K, 2) of the 2-D grid for N(0, 1) pairs (see the module doc)."""
    lv = normal.levels(bits).double()
    points = torch.cartesian_prod(lv, lv)
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(100):
        nearest = torch.cdist(x, points).argmin(1)
        sums = torch.zeros_like(points).index_add_(0, nearest, x)
        counts = torch.bincount(nearest, minlength=len(points)).double()[:, None]
        points = torch.where(counts > 0, sums / counts.clamp_min(1), points)
    return points.float()


GRIDS: dict[int, torch.Tensor] = {}


def round_pairs(p: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """p (k, 2) pairs, one scale each (k,), on the 2-D grid at `bits` (the scalar grid at 8) -> (k, 2)."""
    if bits >= 8:
        lv = normal.levels(bits)
        return lv[((p / scale[:, None])[..., None] - lv).abs().argmin(-1)] * scale[:, None]
    if bits not in GRIDS:
        GRIDS[bits] = pair_grid(bits)
    points = GRIDS[bits]
    return points[torch.cdist(p / scale[:, None], points).argmin(1)] * scale[:, None]


def pair_rtn(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (k, L), L even, on the 2-D grid: (scale (k,), x^ (k, L)); the scale is rms times the
    factor of SCALE_FACTORS of least error, as quant.normal.fit_scale."""
    rms = x.pow(2).mean(1).sqrt().clamp_min(1e-30)
    best_err, best_scale, best = None, None, None
    for f in SCALE_FACTORS:
        s = (rms * f).half().float()
        out = round_pairs(x.reshape(-1, 2), s.repeat_interleave(x.shape[1] // 2), bits).reshape(x.shape)
        err = ((out - x) ** 2).sum(1)
        if best_err is None:
            best_err, best_scale, best = err, s, out
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best = torch.where(better[:, None], out, best)
    return best_scale, best


def pair_gptq(W: torch.Tensor, H: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ of the rows of W (k, n) on the 2-D grid: columns 2j and 2j+1 chosen together when GPTQ
    reaches column 2j (from their values then), each column's error pushed on as usual."""
    scale, _ = pair_rtn(W.float(), bits)
    pending: dict[int, torch.Tensor] = {}

    def quantize_column(j: int, rest: torch.Tensor) -> torch.Tensor:
        if j in pending:
            return pending.pop(j)
        q = round_pairs(rest[:, :2], scale, bits)
        pending[j + 1] = q[:, 1]
        return q[:, 0]

    return gptq(W, H, quantize_column, block=128)


def table(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, H: torch.Tensor, widths: list[int], two_d: bool) -> np.ndarray:
    """e_i(b) (r, len(widths)) in allocate.error_table's form, with u^ by RTN and v^ by GPTQ on H."""
    u, v = U.T.double(), V.T.double()
    vH = v @ H
    vHv, uu, s2 = (vH * v).sum(1), (u * u).sum(1), s.double() ** 2
    out = np.zeros((len(s), len(widths)))
    for j, b in enumerate(widths):
        if b == 0:
            out[:, j] = (s2 * vHv).numpy()
            continue
        full = torch.full((len(s),), b)
        if two_d:
            vq, uq = pair_gptq(v.float(), H.float(), b).double(), pair_rtn(u.float(), b)[1].double()
        else:
            vq = gptq_rows(v.float(), H.float(), full, 128, grid="normal")["deq"].double()
            uq = normal.rtn(u.float(), full)["deq"].double()
        du, dv = uq - u, vq - v
        dHd, dHv = ((dv @ H) * dv).sum(1), (vH * dv).sum(1)
        e = uu * dHd + 2 * (u * du).sum(1) * (dHv + dHd) + (du * du).sum(1) * (vHv + 2 * dHv + dHd)
        out[:, j] = (s2 * e.clamp_min(0)).numpy()
    return out


def gaussian_mse() -> dict[int, tuple[float, float]]:
    """{bits: (scalar grid, 2-D grid)} mean squared error per entry on seeded N(0, 1) pairs."""
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    for b in (2, 3, 4):
        lv = normal.levels(b)
        scalar = float(((lv[(x[..., None] - lv).abs().argmin(-1)] - x) ** 2).mean())
        pairs = float(((round_pairs(x, torch.ones(len(x)), b) - x) ** 2).mean())
        out[b] = (scalar, pairs)
    return out


def main() -> None:
    args, ratios, commit = pair_arguments(__doc__.split("\n\n")[0], "1/16,1/32,1/64")
    base, ft = pair_paths(args.pair)
    t0 = time.time()
    widths = list(Settings().widths)
    sums = {(g, a): 0.0 for g in ("uniform", "normal", "pairs") for a in ratios}
    energy = 0.0
    for i, name, D, H in calibrated_deltas(base, ft, args.samples, args.blocks):
        H = H.double()
        m, n = D.shape
        energy += output_error(None, D, H)
        default = analyse(D, H, Settings())
        Dr, Hr = hadamard.rotate_matrix(D, SEED), hadamard.rotate_gram(H, SEED)
        U, s, V = svd(Dr, Hr, True)
        costs = np.array([triplet_bits(m, n, b, Settings(grid="normal")) for b in widths], dtype=np.float64)
        tables = {"uniform": (default.table, default.costs), "normal": (table(U, s, V, Hr, widths, False), costs),
                  "pairs": (table(U, s, V, Hr, widths, True), costs)}
        for a in ratios:
            for g, (t, c) in tables.items():
                choice = choose_widths(t, c, budget_bits(m, n, a))
                sums[g, a] += float(t[np.arange(len(choice)), choice].sum())
        print(f"block {i} {name} done, {time.time() - t0:.0f} s", flush=True)
    rows = [{"alpha": a, "predicted_uniform": (sums["uniform", a] / energy) ** 0.5,
             "normal_x_uniform": (sums["normal", a] / sums["uniform", a]) ** 0.5,
             "pairs_x_uniform": (sums["pairs", a] / sums["uniform", a]) ** 0.5,
             "pairs_x_normal": (sums["pairs", a] / sums["normal", a]) ** 0.5} for a in ratios]
    mse = gaussian_mse()
    command = f"python benchmarks/vector_grids.py --pair {args.pair} --ratios {args.ratios}" + \
        (f" --blocks {args.blocks}" if args.blocks else "")
    result = {"commit": commit, "command": command, "rows": rows, "gaussian_mse": mse, "wall_s": time.time() - t0}
    out = Path(args.out)
    (out / f"vector_grids_{args.pair}.json").write_text(json.dumps(result, indent=1))
    page = "\n".join([
        f"# Two-dimensional Gaussian grids on the {args.pair} pair (an experiment)", "",
        f"Produced by `{command}` at commit `{commit}`, CPU, {result['wall_s']:.0f} s. The error the ILP "
        "predicts (per tensor, calibration Grams) with each grid's error table; see the script's docstring.", "",
        "| ratio | uniform/128 (default), predicted error | `--grid normal` x uniform | 2-D x uniform | **2-D x `--grid normal`** |",
        "|---|---|---|---|---|",
        *[f"| {ratio_name(r['alpha'])} | {r['predicted_uniform']:.4f} | {r['normal_x_uniform']:.3f} | "
          f"{r['pairs_x_uniform']:.3f} | **{r['pairs_x_normal']:.3f}** |" for r in rows], "",
        "Mean squared error per entry on N(0, 1) samples, scalar Lloyd-Max grid / 2-D grid:", "",
        "| bits per entry | scalar | 2-D | 2-D / scalar |", "|---|---|---|---|",
        *[f"| {b} | {sc:.5f} | {pa:.5f} | {pa / sc:.3f} |" for b, (sc, pa) in mse.items()], ""])
    (out / f"vector_grids_{args.pair}.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()

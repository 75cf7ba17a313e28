"""ImPart peer (Yang et al., 2025, arXiv 2504.13237; code X1AOX1A/ImPart, sparsify/sparsify.py),
kind "impart": importance-aware sparsification of the delta's singular vectors.

For one delta D (m x n), D = U S V^T (r = min(m, n) triplets, s_1 >= s_2 >= ...):
1. Pre-prune: only the first k = floor(r (1 - beta)) triplets may be kept.
2. Per kept triplet a sparsity from its singular value, gamma = (a - beta) / (1 - beta):
       p_i = gamma (1 - s_i^C / s_1^C)         (p_1 = 0: the first triplet stays dense)
3. Boundary shift: from the k-th triplet down, p_i = 1 (dropped) until mean(p_1..p_k) >= gamma,
   so that the overall sparsity over the r (m + n) factor entries is the target a.
4. Column i of U and of V keeps a random rows - floor(rows p_i) of its entries (the others zeroed)
   and is rescaled by 1 / (1 - p_i):  D^ = sum_i s_i (M_u,i u_i)(M_v,i v_i)^T / (1 - p_i)^2.
The masks are independent of the values: drawn from a stored seed (seeded.column_subsets), their
positions cost no bits. Defaults from the paper's config (sparsify/config_example.yaml): beta 0.8,
C 0.5. The paper sets the target a from the ratio with constants fitted to LLaMA-2-13B's shapes and
counts only the kept fp16 values; here a is found by bisection so that everything stored fits the
budget alpha * 16 m n: the kept values, and one fp16 p_i per kept triplet (the reader derives the
counts from it). Where the budget allows a sparsity below beta, beta is lowered to it (gamma = 0:
the plain truncation, the paper's "only_lowrank" mode). s_i is folded into U's values (the paper
keeps S apart in fp16, uncounted).

`impart` stores the kept values in fp16. `--quantize` (ImPart-Qt) quantizes them with the
mixed-precision GPTQ of Delta-CoMe's schedule (deltacome.SCHEDULE: the first 2 triplets at 8 bits,
the next 32 at 3, the rest at 2), the mask respected as in the authors' code (whose cost formula counts the 3-bit band at 4 bits; the
3 bits of its quantization config are used here): V^T (sparsified and
rescaled) by GPTQ on H, then U S by GPTQ on the Gram of V^ x, each re-masked after (RTN without
calibration); grids per group of g entries of each column (fp16 scale and offset, counted); a is then
bisected on this cost.
Stored: `params` (fp16): p_1..p_K, then the kept values column by column (u_1, v_1, u_2, ...) in
fp16, or the grids (per triplet: V's then U's); `codes` (uint8): empty in fp16, else per width (widest
first) the packed codes of that width's triplets, each triplet's kept V entries then its kept U
entries. meta {"seed", "rank": K, "quantized", "group_size", "widths": [[b, count], ...] (quantized)}.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import AdamixError
from ..quant.gptq import gptq_columns, gptq_rows, rtn_columns
from ..quant.grid import PARAM_BITS, dequantize, expand_groups, n_groups, rtn
from ..quant.linalg import error_stats, matmul64, svd
from ..quant.pack import pack, packed_nbytes, unpack
from .deltacome import SCHEDULE
from .kinds import MAX_COUNT, Encoded, is_int, register_decoder, register_factors, register_meta_check
from .registry import Method, Settings, budget_bits, register
from .seeded import column_subsets, seed_for
from .svd_mixed import width_groups

BETA, C_EXP = 0.8, 0.5
V_SALT = 0x5DEECE66D  # the V masks' seed is the U masks' xor this


def sparsities(s: np.ndarray, target: float, beta: float = BETA, c: float = C_EXP) -> np.ndarray:
    """p (r,) for singular values s (r,) at overall target sparsity `target` (steps 1-3), rounded to
    fp16 as stored; p_i = 1 for the triplets dropped."""
    r = len(s)
    beta = min(beta, target)
    k = max(1, math.floor(r * (1 - beta)))
    gamma = (target - beta) / (1 - beta) if beta < 1 else 1.0
    p = np.ones(r)
    sc = np.power(np.maximum(s[:k], 0.0), c)
    p[:k] = gamma * (1 - sc / sc[0]) if sc[0] > 0 else 1.0
    p[0] = min(p[0], 1.0)
    j = k - 1
    while j > 0 and p[:k].mean() < gamma - 1e-12:
        p[j] = 1.0
        j -= 1
    return np.clip(p, 0.0, 1.0).astype(np.float16).astype(np.float64)


def kept_counts(p: np.ndarray, rows: int) -> np.ndarray:
    """Entries kept of a column of `rows` at sparsity p: rows - floor(rows p)."""
    return (rows - np.floor(rows * p + 1e-9)).astype(np.int64)


def schedule_widths(K: int) -> list[int]:
    """Delta-CoMe's widths for the first K triplets."""
    out: list[int] = []
    for bits, count in SCHEDULE:
        out += [bits] * (K - len(out) if count is None else min(count, K - len(out)))
    return out[:K]


def stored_bits(m: int, n: int, p: np.ndarray, quantized: bool, g: int) -> int:
    """Exact bits stored for sparsities p (the prefix with p < 1 is kept)."""
    K = int((p < 1).sum())
    cu, cv = kept_counts(p[:K], m), kept_counts(p[:K], n)
    if not quantized:
        return 16 * (K + int(cu.sum() + cv.sum()))
    bits = 16 * K + PARAM_BITS * K * (n_groups(m, min(g, m)) + n_groups(n, min(g, n)))
    start = 0
    for b, count in width_groups(schedule_widths(K)):
        bits += 8 * packed_nbytes(int(cu[start:start + count].sum() + cv[start:start + count].sum()), b)
        start += count
    return bits


def choose_target(s: np.ndarray, m: int, n: int, budget: float, quantized: bool, g: int) -> np.ndarray:
    """The sparsities of the smallest target a (bisection) whose stored bits fit `budget`."""
    def fits(a: float) -> bool:
        return stored_bits(m, n, sparsities(s, a), quantized, g) <= budget
    if fits(0.0):
        return sparsities(s, 0.0)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    p = sparsities(s, hi)
    if stored_bits(m, n, p, quantized, g) > budget:  # even the first triplet alone does not fit
        return np.ones(len(s))
    return p


def masks(seed: int, m: int, n: int, p: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept row indices (ascending) of each kept column of U (m) and of V (n)."""
    return (column_subsets(seed, m, kept_counts(p, m).tolist()),
            column_subsets(seed ^ V_SALT, n, kept_counts(p, n).tolist()))


def masked(cols: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor:
    """cols (rows, K) with the entries outside each column's kept rows set to 0."""
    out = torch.zeros_like(cols)
    for i, idx in enumerate(keep):
        out[idx, i] = cols[idx, i]
    return out


def compress_impart(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float,
                    factors: tuple[torch.Tensor, ...] | None = None) -> Encoded:
    """ImPart (or ImPart-Qt with settings.quantize) on D (m x n) within `budget` bits."""
    m, n = D.shape
    g, quantized = settings.group_size, settings.quantize
    U, s, V = factors if factors is not None else svd(D, algorithm=settings.svd)
    p_all = choose_target(s.double().numpy(), m, n, budget, quantized, g)
    K = int((p_all < 1).sum())
    p = p_all[:K]
    seed = seed_for(D, settings.seed)
    ku, kv = masks(seed, m, n, p)
    scale = torch.from_numpy(1 / (1 - np.minimum(p, 1 - 1e-12)))
    Us = masked(U[:, :K].double() * s[:K].double() * scale, ku)  # (m, K), s folded in
    Vs = masked(V[:, :K].double() * scale, kv)                   # (n, K)
    meta = {"seed": seed, "rank": K, "quantized": quantized, "group_size": g}
    if not quantized:
        values = [torch.cat([Us[ku[i], i], Vs[kv[i], i]]) for i in range(K)]
        params = torch.cat([torch.from_numpy(p)] + values) if K else torch.zeros(0)
        tensors = {"codes": torch.zeros(0, dtype=torch.uint8), "params": params.to(torch.float16)}
    else:
        widths = schedule_widths(K)
        meta["widths"] = width_groups(widths)
        tensors = quantize_masked(Us, Vs, ku, kv, torch.tensor(widths, dtype=torch.int64), H, g, settings.damp, p)
    enc = Encoded("impart", (m, n), meta, tensors)
    enc.stats = {"rank_kept": K, "sparsity": 1 - float(sum(len(i) for i in ku + kv)) / max(1, K * (m + n)),
                 **error_stats(decode_impart((m, n), meta, tensors), D, H)}
    return enc


def quantize_masked(Us: torch.Tensor, Vs: torch.Tensor, ku: list[torch.Tensor], kv: list[torch.Tensor],
                    bits: torch.Tensor, H: torch.Tensor | None, g: int, damp: float, p: np.ndarray) -> dict:
    """ImPart-Qt: V^T by GPTQ on H, re-masked; U S by GPTQ on the Gram of V^ x, re-masked."""
    m, K = Us.shape
    n = Vs.shape[0]
    if K == 0:
        return {"codes": torch.zeros(0, dtype=torch.uint8), "params": torch.zeros(0, dtype=torch.float16)}
    Vt = Vs.T.float().contiguous()
    vq = rtn(Vt, bits, min(g, n)) if H is None else gptq_rows(Vt, H, bits, g, damp=damp)
    Vhat = masked(vq["deq"].double().T, kv).T  # (K, n)
    if H is None:
        uq = rtn_columns(Us.float(), bits, g)
    else:
        uq = gptq_columns(Us.float(), (Vhat @ matmul64(H, Vhat.T)).float(), bits, g, damp=damp)
    codes, start = [], 0
    for b, count in width_groups(bits.tolist()):
        parts = []
        for i in range(start, start + count):
            parts += [vq["codes"][i, kv[i]], uq["codes"][i, ku[i]]]
        codes.append(pack(torch.cat(parts), b))
        start += count
    params = [torch.from_numpy(p).float()]
    for i in range(K):
        params += [vq["scale"][i], vq["offset"][i], uq["scale"][i], uq["offset"][i]]
    return {"codes": torch.cat(codes), "params": torch.cat([x.reshape(-1).float() for x in params]).to(torch.float16)}


def parse_meta(shape: tuple[int, ...], meta: dict) -> tuple[int, int, bool, int, list[tuple[int, int]]]:
    """(seed, rank, quantized, group size, width groups), validated."""
    try:
        seed, K, quantized, g = meta["seed"], meta["rank"], meta["quantized"], meta["group_size"]
        widths = meta.get("widths", []) if quantized else []
        ok = all(map(is_int, (seed, K, g))) and isinstance(quantized, bool) and isinstance(widths, list) and \
            all(isinstance(w, list) and len(w) == 2 and all(map(is_int, w)) for w in widths)
        groups = [(b, c) for b, c in widths] if ok else []
    except (KeyError, TypeError, ValueError):
        ok, groups = False, []
    if not ok or len(shape) != 2 or not (0 <= seed < 2**63 and 0 <= K <= min(shape) and 1 <= g <= MAX_COUNT) or \
            (quantized and (sum(c for _, c in groups) != K or any(not 1 <= b <= 8 or c < 1 for b, c in groups))):
        raise AdamixError(f"malformed impart metadata for shape {list(shape)}: {meta!r}")
    return seed, K, quantized, g, groups


@register_meta_check("impart")
def check_impart_meta(shape: tuple[int, ...], meta: dict) -> None:
    parse_meta(shape, meta)


@register_factors("impart", rank=lambda meta: meta["rank"])
def impart_factors(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(U^ (m, K), V^ (K, n)) float32: the sparse factors as stored, D^ = U^ V^."""
    seed, K, quantized, g, groups = parse_meta(shape, meta)
    m, n = shape
    codes, params = tensors["codes"], tensors["params"]
    if codes.dtype != torch.uint8 or params.dtype != torch.float16 or params.numel() < K:
        raise AdamixError(f"impart entry for shape {list(shape)}: malformed tensors")
    p = params[:K].double().numpy()
    if K and not (np.all(p >= 0) and np.all(p < 1)):
        raise AdamixError(f"impart entry for shape {list(shape)}: sparsities outside [0, 1)")
    ku, kv = masks(seed, m, n, p)
    cu, cv = kept_counts(p, m), kept_counts(p, n)
    Uh, Vh = torch.zeros(m, K), torch.zeros(n, K)
    if not quantized:
        if codes.numel() != 0 or params.numel() != K + int(cu.sum() + cv.sum()):
            raise AdamixError(f"impart entry for shape {list(shape)}: {params.numel()} params, its metadata implies "
                              f"{K + int(cu.sum() + cv.sum())}")
        pos = K
        for i in range(K):
            Uh[ku[i], i] = params[pos:pos + cu[i]].float()
            Vh[kv[i], i] = params[pos + cu[i]:pos + cu[i] + cv[i]].float()
            pos += cu[i] + cv[i]
        return Uh, Vh.T.contiguous()
    gu, gv = min(g, m), min(g, n)
    Gu, Gv = n_groups(m, gu), n_groups(n, gv)
    want_codes = sum(packed_nbytes(int(cu[a:a + c].sum() + cv[a:a + c].sum()), b)
                     for (b, c), a in zip(groups, np.cumsum([0] + [c for _, c in groups])))
    if codes.numel() != want_codes or params.numel() != K + 2 * K * (Gu + Gv):
        raise AdamixError(f"impart entry for shape {list(shape)}: {codes.numel()} code bytes and {params.numel()} "
                          f"params, its metadata implies {want_codes} and {K + 2 * K * (Gu + Gv)}")
    grids = params[K:].float().reshape(K, 2 * (Gu + Gv))
    cpos, start = 0, 0
    for b, count in groups:
        total = int(cu[start:start + count].sum() + cv[start:start + count].sum())
        size = packed_nbytes(total, b)
        q = unpack(codes[cpos:cpos + size], b, total)
        cpos += size
        qpos = 0
        for i in range(start, start + count):
            vs, vo, us, uo = torch.split(grids[i], [Gv, Gv, Gu, Gu])
            vvals = q[qpos:qpos + cv[i]]
            qpos += cv[i]
            uvals = q[qpos:qpos + cu[i]]
            qpos += cu[i]
            Vh[kv[i], i] = dequantize(vvals, expand_groups(vs[None], n, gv)[0, kv[i]], expand_groups(vo[None], n, gv)[0, kv[i]])
            Uh[ku[i], i] = dequantize(uvals, expand_groups(us[None], m, gu)[0, ku[i]], expand_groups(uo[None], m, gu)[0, ku[i]])
        start += count
    return Uh, Vh.T.contiguous()


@register_decoder("impart", {"codes": "U8", "params": "F16"})
def decode_impart(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    U, V = impart_factors(shape, meta, tensors)
    return U @ V


class ImPart(Method):
    name = "impart"
    help = ("impart: ImPart, the SVD's singular vectors sparsified by importance (seeded masks, rescaled), fp16 "
            "values; --quantize: ImPart-Qt, mixed-precision GPTQ of the kept values")
    unit = "singular triplet"
    options = frozenset({"quantize", "svd"})
    kinds = ("impart",)

    def item_bits(self, m, n, settings):
        return stored_bits(m, n, np.array([0.0]), settings.quantize, settings.group_size)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_impart(D, H, settings, budget_bits(*D.shape, settings.alpha, overhead_bits), factors)


register(ImPart())

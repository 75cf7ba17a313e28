"""Low-rank peer, kind "lowrank": the truncated SVD of D with fp16 factors.

D ~ U_k S_k V_k^T with the largest rank k such that the factors fit the budget:
16 k (m + n) <= budget. Stored: `U` = U_k S_k (m, k) fp16 and `V` = V_k^T (k, n) fp16; D^ = U V.
The calibration Gram H is not used to choose anything (it only measures the error).
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant.linalg import error_stats, svd
from .kinds import Encoded, register_decoder, register_factors, register_gains
from .registry import Method, Settings, budget_bits, register


def lowrank_rank(m: int, n: int, budget: float) -> int:
    """The largest k with 16 k (m + n) <= budget (fp16 factors), at most min(m, n)."""
    return max(0, min(min(m, n), int(budget // (16 * (m + n)))))


def compress_lowrank(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float,
                     factors: tuple[torch.Tensor, ...] | None = None) -> Encoded:
    """Truncated SVD of D (m x n) within `budget` bits, at most settings.max_rank. factors: a
    precomputed svd(D) (U, s, V)."""
    m, n = D.shape
    U, s, V = factors if factors is not None else svd(D, algorithm=settings.svd)
    k = lowrank_rank(m, n, budget) if settings.max_rank is None else min(lowrank_rank(m, n, budget), settings.max_rank)
    enc = Encoded("lowrank", (m, n), {"rank": k}, {
        "U": (U[:, :k] * s[:k]).to(torch.float16).contiguous(),
        "V": V[:, :k].T.to(torch.float16).contiguous(),
    })
    enc.stats = {"rank_kept": k, **error_stats(decode_lowrank((m, n), enc.meta, enc.tensors), D, H)}
    return enc


@register_decoder("lowrank", {"U": "F16", "V": "F16"})
def decode_lowrank(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    U, V = tensors["U"], tensors["V"]
    if len(shape) != 2 or U.dtype != torch.float16 or V.dtype != torch.float16 or U.dim() != 2 or V.dim() != 2 \
            or U.shape[0] != shape[0] or V.shape[1] != shape[1] or U.shape[1] != V.shape[0]:
        raise AdamixError(f"lowrank factors {tuple(U.shape)} x {tuple(V.shape)} do not make shape {list(shape)}")
    return U.float() @ V.float()


@register_factors("lowrank", rank=lambda meta: meta["rank"])
def lowrank_factors(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (m, k), V (k, n)) float32, validated like the decoder."""
    decode_lowrank(shape, meta, tensors)
    return tensors["U"].float(), tensors["V"].float()


@register_gains("lowrank")
def lowrank_gains(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pair i's share |U_i|^2 |V_i|^2 / ||U V||_F^2 of the stored delta's energy (data-free: U's
    columns are orthogonal and V's rows orthonormal up to fp16 rounding, so the shares add). They
    rank the pairs for a rank cap; not being shares of the calibrated E(0), they predict no error."""
    U, V = lowrank_factors(shape, meta, tensors)
    g = U.double().pow(2).sum(0) * V.double().pow(2).sum(1)
    total = float(g.sum())
    return (g / total if total > 0 else g).float()


class LowRank(Method):
    name = "lowrank"
    help = "lowrank: the truncated SVD with fp16 factors at the largest rank that fits"
    unit = "rank-1 factor pair or row"
    options = frozenset({"max_rank", "svd"})
    kinds = ("lowrank",)

    def item_bits(self, m, n, settings):
        return 16 * (m + n)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_lowrank(D, H, settings, budget_bits(*D.shape, settings.alpha, overhead_bits), factors)


register(LowRank())

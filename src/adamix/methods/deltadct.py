"""Delta-DCT peer (Huang et al., 2025, "Seeing Delta Parameters as JPEG Images", arXiv 2503.06676),
kind "deltadct": data-free, the delta compressed like a JPEG image.

1. Cut D (m x n, zero-padded to multiples of p) into p x p patches.
2. Rank the patches by their L2 norm; higher-ranked patches get more bits.
3. 2-D DCT of each patch (orthonormal DCT-II: X = C P C^T, C_kj = a_k cos(pi (2j + 1) k / 2p)).
4. Quantize each patch's p^2 coefficients at its width on one asymmetric grid (fp16 scale and
   offset, quant.grid: min-max, clipped where that lowers the error).
5. Reconstruct by the inverse DCT (P = C^T X C) and crop the padding.
No official code exists; the paper's text leaves these defaults open, chosen here:
  - p = 16 (PATCH): a grid's 32 bits cost 1/8 bit per entry; at p = 8 they would take half of a
    1-bit budget;
  - the classes 4, 2 and 0 bits (CLASSES): the top c patches by norm at 4 bits, the next c at 2,
    the rest dropped, c the largest that fits the budget; the bits left over then raise the next
    patches from 0 to 2 bits while they fit, so the budget is met up to less than one patch (up to
    3 bits per entry, alpha 3/16: a larger budget is not filled);
  - every patch's class is stored (2 bits per patch, counted): the ranking depends on the values;
    a budget below that stores nothing (empty tensors, D^ = 0).
Stored: `classes` (uint8, the 2-bit class index of every patch, row-major patch order, packed);
`codes` (uint8): per class (widest first) the packed codes of its patches in patch order;
`params` (fp16): scale and offset of every kept patch in patch order. meta {"patch": p,
"classes": [4, 2, 0]}.
"""

from __future__ import annotations

import math

import torch

from ..errors import AdamixError
from ..quant.grid import PARAM_BITS, dequantize, fit_grid, quantize
from ..quant.linalg import error_stats
from ..quant.pack import pack, packed_nbytes, unpack
from .kinds import Encoded, is_int, register_decoder, register_meta_check
from .registry import Method, Settings, budget_bits, register

PATCH = 16
CLASSES = (4, 2, 0)
CLASS_BITS = 2


def dct_matrix(p: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (p x p), float64: C C^T = I."""
    k = torch.arange(p, dtype=torch.float64)[:, None]
    j = torch.arange(p, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (2 * j + 1) * k / (2 * p)) * math.sqrt(2 / p)
    C[0] /= math.sqrt(2)
    return C


def patches(D: torch.Tensor, p: int) -> torch.Tensor:
    """D (m, n) zero-padded and cut into (P, p, p) patches, row-major patch order."""
    m, n = D.shape
    M, N = -(-m // p) * p, -(-n // p) * p
    X = torch.zeros(M, N, dtype=D.dtype)
    X[:m, :n] = D
    return X.reshape(M // p, p, N // p, p).permute(0, 2, 1, 3).reshape(-1, p, p)


def unpatch(P: torch.Tensor, m: int, n: int, p: int) -> torch.Tensor:
    M, N = -(-m // p) * p, -(-n // p) * p
    return P.reshape(M // p, N // p, p, p).permute(0, 2, 1, 3).reshape(M, N)[:m, :n]


def total_bits(n_patches: int, counts: dict[int, int], p: int) -> int:
    """Stored bits with counts[b] patches at width b."""
    bits = 8 * packed_nbytes(n_patches, CLASS_BITS)
    for b, c in counts.items():
        if b and c:
            bits += 8 * packed_nbytes(c * p * p, b) + PARAM_BITS * c
    return bits


def allocate(n_patches: int, p: int, budget: float) -> list[int]:
    """Width per rank position (best first): c at 4 bits, c at 2, then more at 2 while they fit."""
    hi, lo = CLASSES[0], CLASSES[1]
    c = 0
    while 2 * (c + 1) <= n_patches and total_bits(n_patches, {hi: c + 1, lo: c + 1}, p) <= budget:
        c += 1
    extra = 0
    while 2 * c + extra < n_patches and total_bits(n_patches, {hi: c, lo: c + extra + 1}, p) <= budget:
        extra += 1
    return [hi] * c + [lo] * (c + extra) + [0] * (n_patches - 2 * c - extra)


def compress_deltadct(D: torch.Tensor, H: torch.Tensor | None, settings: Settings, budget: float) -> Encoded:
    """Delta-DCT on D (m x n) within `budget` bits (H only measures the error)."""
    m, n = D.shape
    p = PATCH
    P = patches(D.double(), p)
    order = torch.argsort(P.reshape(len(P), -1).norm(dim=1), descending=True, stable=True)
    widths = torch.zeros(len(P), dtype=torch.int64)
    meta = {"patch": p, "classes": list(CLASSES)}
    if total_bits(len(P), {}, p) > budget:  # not even the classes fit: store nothing
        empty = torch.zeros(0, dtype=torch.uint8)
        tensors = {"classes": empty, "codes": empty, "params": torch.zeros(0, dtype=torch.float16)}
        enc = Encoded("deltadct", (m, n), meta, tensors)
        enc.stats = {"patches_kept": 0, **error_stats(torch.zeros(m, n), D, H)}
        return enc
    widths[order] = torch.tensor(allocate(len(P), p, budget), dtype=torch.int64)
    C = dct_matrix(p)
    coef = (C @ P @ C.T).reshape(len(P), -1).float()  # (P, p^2)
    cls = torch.tensor([CLASSES.index(int(b)) for b in widths], dtype=torch.uint8)
    codes, params = [], []
    kept = torch.nonzero(widths > 0).flatten()
    grids = {}
    if len(kept):
        scale, offset = fit_grid(coef[kept], widths[kept], p * p)
        grids = {int(i): (scale[j], offset[j]) for j, i in enumerate(kept.tolist())}
    for b in CLASSES[:-1]:
        idx = torch.nonzero(widths == b).flatten()
        if len(idx):
            sc = torch.stack([grids[int(i)][0] for i in idx])
            of = torch.stack([grids[int(i)][1] for i in idx])
            q = quantize(coef[idx], sc.expand(-1, p * p), of.expand(-1, p * p), torch.full((len(idx),), b))
            codes.append(pack(q.reshape(-1), b))
    for i in kept.tolist():
        params += [grids[i][0], grids[i][1]]
    tensors = {"classes": pack(cls, CLASS_BITS),
               "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
               "params": torch.cat(params).to(torch.float16) if params else torch.zeros(0, dtype=torch.float16)}
    enc = Encoded("deltadct", (m, n), meta, tensors)
    enc.stats = {"patches_kept": len(kept), **error_stats(decode_deltadct((m, n), meta, tensors), D, H)}
    return enc


@register_meta_check("deltadct")
def check_meta(shape: tuple[int, ...], meta: dict) -> None:
    p, classes = meta.get("patch"), meta.get("classes")
    if len(shape) != 2 or not is_int(p) or p != PATCH or classes != list(CLASSES):
        raise AdamixError(f"malformed deltadct metadata for shape {list(shape)}: {meta!r}")


@register_decoder("deltadct", {"classes": "U8", "codes": "U8", "params": "F16"})
def decode_deltadct(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    check_meta(shape, meta)
    m, n = shape
    p = meta["patch"]
    n_patches = -(-m // p) * -(-n // p)
    if not any(t.numel() for t in tensors.values()):  # the budget held nothing
        return torch.zeros(m, n)
    if tensors["classes"].numel() != packed_nbytes(n_patches, CLASS_BITS):
        raise AdamixError(f"deltadct entry for shape {list(shape)}: {tensors['classes'].numel()} class bytes, "
                          f"{packed_nbytes(n_patches, CLASS_BITS)} expected")
    cls = unpack(tensors["classes"], CLASS_BITS, n_patches).long()
    if bool((cls >= len(CLASSES)).any()):
        raise AdamixError(f"deltadct entry for shape {list(shape)}: a class index is out of range")
    widths = torch.tensor(CLASSES)[cls]
    kept = torch.nonzero(widths > 0).flatten()
    counts = {b: int((widths == b).sum()) for b in CLASSES}
    want = sum(packed_nbytes(counts[b] * p * p, b) for b in CLASSES[:-1])
    codes, params = tensors["codes"], tensors["params"]
    if codes.numel() != want or params.numel() != 2 * len(kept):
        raise AdamixError(f"deltadct entry for shape {list(shape)}: {codes.numel()} code bytes and {params.numel()} "
                          f"params, its classes imply {want} and {2 * len(kept)}")
    grid = params.float().reshape(-1, 2)
    row = torch.full((n_patches,), -1, dtype=torch.int64)
    row[kept] = torch.arange(len(kept))
    coef = torch.zeros(n_patches, p * p)
    pos = 0
    for b in CLASSES[:-1]:
        idx = torch.nonzero(widths == b).flatten()
        size = packed_nbytes(len(idx) * p * p, b)
        q = unpack(codes[pos:pos + size], b, len(idx) * p * p).reshape(len(idx), p * p)
        pos += size
        g = grid[row[idx]]
        coef[idx] = dequantize(q, g[:, :1].expand(-1, p * p), g[:, 1:].expand(-1, p * p))
    C = dct_matrix(p)
    P = C.T @ coef.double().reshape(-1, p, p) @ C
    return unpatch(P, m, n, p).float()


class DeltaDCT(Method):
    name = "deltadct"
    help = "deltadct: Delta-DCT, 16 x 16 patches ranked by norm, DCT coefficients at 4 / 2 / 0 bits per patch (data-free)"
    unit = "patch"
    kinds = ("deltadct",)

    def item_bits(self, m, n, settings):
        n_patches = -(-m // PATCH) * -(-n // PATCH)
        return total_bits(n_patches, {CLASSES[1]: 1}, PATCH)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_deltadct(D, H, settings, budget_bits(*D.shape, settings.alpha, overhead_bits))


register(DeltaDCT())

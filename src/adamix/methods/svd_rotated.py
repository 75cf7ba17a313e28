"""Storage of rotated low-rank factors on Gaussian grids, kind "svd-rotated" (adamix --grid normal).

D^ = R_m^T U'^ V'^ R_n, where R_m, R_n are the seeded random Hadamard rotations of quant.hadamard
(seed `meta["seed"]`) and U'^ (m x k), V'^ (k x n) are quantized on quant.normal's grid: entry =
scale * c_b[code], with c_b the fp16 Lloyd-Max levels of N(0, 1) at the vector's width b and one
fp16 scale per vector. The method runs entirely on the rotated delta R_m D R_n^T with the rotated Gram
R_n H R_n^T (the output error is the same in both coordinates: the rotations are orthogonal).

The kept triplets are ordered by width, widest first; `meta["widths"] = [[b, count], ...]`.
For each width b in that order the tensors hold, concatenated:
  codes (uint8): pack(V' codes, count x n) then pack(U' codes, count x m), each packed at b bits;
  params (fp16): V' scales (count), U' scales (count);
then params ends with one fp16 gain per kept triplet (k, stored order), as svd-mixed's (see there).

The size model: triplet_bits(m, n, b) = b (m + n) codes + 2 x 16 scale bits + the 16-bit gain;
stored_bits adds the byte padding of each width's two code streams (svd_mixed.PACK_PAD_BITS).
The runtime applies these factors de-quantized (float), not through the low-bit kernels.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant import hadamard, normal
from ..quant.pack import pack, packed_nbytes, unpack
from .kinds import (Encoded, is_int, parse_width_meta, register_decoder, register_factors, register_gains,
                    register_meta_check)
from .svd_mixed import GAIN_BITS, sized_tensors, width_groups

KIND = "svd-rotated"
GRID = "normal"
ROTATION = "hadamard"


def width_meta(seed: int, groups: list[list[int]]) -> dict:
    """The metadata of an entry storing `groups` ([[b, count], ...], widest first) rotated with `seed`."""
    return {"widths": [list(p) for p in groups], "grid": GRID, "rotation": ROTATION, "seed": int(seed), "gains": True}


def triplet_bits(m: int, n: int, width: int) -> int:
    """Bits of one triplet at `width` as the allocation counts them (0 for width 0)."""
    return 0 if width == 0 else width * (m + n) + 2 * normal.PARAM_BITS + GAIN_BITS


def expected_sizes(shape: tuple[int, int], meta: dict) -> tuple[int, int]:
    """(bytes of codes, number of fp16 params) that `meta` implies for a tensor of `shape`."""
    m, n = shape
    _, groups = parse_width_meta(meta, KIND, group_size=False)
    nbytes = sum(packed_nbytes(count * n, b) + packed_nbytes(count * m, b) for b, count in groups)
    k = sum(count for _, count in groups)
    return nbytes, 2 * k + k  # two scales and one gain per triplet


def stored_bits(shape: tuple[int, int], meta: dict) -> int:
    """Exact bits stored for an entry of `shape` with `meta`."""
    nbytes, nparams = expected_sizes(shape, meta)
    return 8 * nbytes + 16 * nparams


def encode_factors(shape: tuple[int, int], widths: list[int], seed: int, V: dict[str, torch.Tensor],
                   U: dict[str, torch.Tensor], gains: torch.Tensor, stats: dict | None = None) -> Encoded:
    """Pack rotated factors. widths: (k,) non-increasing, all > 0; V/U hold codes (k, n)/(k, m) and
    scale (k,) as quant.gptq returns them with grid "normal"; gains (k,) as svd_mixed.encode_factors'."""
    if any(a < b for a, b in zip(widths, widths[1:])):
        raise ValueError("widths must be non-increasing")
    if len(gains) != len(widths):
        raise ValueError(f"{len(gains)} gains for {len(widths)} triplets")
    groups = width_groups(widths)
    codes, params, start = [], [], 0
    for b, count in groups:
        rows = slice(start, start + count)
        codes += [pack(V["codes"][rows], b), pack(U["codes"][rows], b)]
        params += [V["scale"][rows], U["scale"][rows]]
        start += count
    params.append(gains)
    tensors = {
        "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
        "params": torch.cat([p.reshape(-1).float() for p in params]).to(torch.float16),
    }
    return Encoded(KIND, tuple(shape), width_meta(seed, groups), tensors, stats or {})


@register_meta_check(KIND)
def check_meta(shape: tuple[int, ...], meta: dict) -> None:
    """One AdamixError for metadata that is not what encode_factors writes."""
    parse_width_meta(meta, KIND, group_size=False)
    if len(shape) != 2 or meta.get("grid") != GRID or meta.get("rotation") != ROTATION \
            or not is_int(meta.get("seed")) or not -2**63 <= meta["seed"] < 2**63:
        raise AdamixError(f"malformed {KIND} metadata: grid {meta.get('grid')!r}, rotation "
                          f"{meta.get('rotation')!r}, seed {meta.get('seed')!r} (expected {GRID!r}, {ROTATION!r}, an integer)")


def checked_tensors(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, params) after checking the metadata, and the tensors' dtypes and sizes against it."""
    check_meta(shape, meta)
    return sized_tensors(tensors, *expected_sizes(shape, meta))


def rotated_factors(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(U'^ (m, k), V'^ (k, n)) float32 as quantized, in the rotated coordinates."""
    m, n = shape
    codes, params = checked_tensors(shape, meta, tensors)
    _, groups = parse_width_meta(meta, KIND, group_size=False)
    V, Ut, cpos, ppos = [torch.zeros(0, n)], [torch.zeros(0, m)], 0, 0

    def take_codes(count: int, length: int, b: int) -> torch.Tensor:
        nonlocal cpos
        size = packed_nbytes(count * length, b)
        cpos += size
        return unpack(codes[cpos - size:cpos], b, count * length).reshape(count, length)

    for b, count in groups:
        cv, cu = take_codes(count, n, b), take_codes(count, m, b)
        sv, su = params[ppos:ppos + count].float(), params[ppos + count:ppos + 2 * count].float()
        ppos += 2 * count
        V.append(normal.dequantize(cv, sv, [b] * count))
        Ut.append(normal.dequantize(cu, su, [b] * count))
    return torch.cat(Ut).T, torch.cat(V)


@register_factors(KIND, rank=lambda meta: sum(count for _, count in meta["widths"]))
def factors(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode to (U^ (m, k), V^ (k, n)) float32 in the delta's own coordinates: R_m^T U'^ and V'^ R_n."""
    U, V = rotated_factors(shape, meta, tensors)
    seed = int(meta["seed"])
    return hadamard.unrotate(U.T, seed).T.contiguous(), hadamard.unrotate(V, seed)


@register_gains(KIND)
def gains(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stored gains (k,) float32 in stored order (see svd_mixed.gains)."""
    _, params = checked_tensors(shape, meta, tensors)
    k = sum(count for _, count in meta["widths"])
    return params[params.numel() - k:].float()


@register_decoder(KIND, {"codes": "U8", "params": "F16"})
def decode_factors(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if len(shape) != 2:
        raise AdamixError(f"{KIND} tensor must be 2-D, manifest says shape {list(shape)}")
    U, V = factors(shape, meta, tensors)
    return U @ V

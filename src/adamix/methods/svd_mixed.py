"""Storage of quantized low-rank factors, kind "svd-mixed": D^ = U^ V^ with per-vector widths.

The kept triplets are ordered by width, widest first; `meta["widths"] = [[b, count], ...]`.
For each width b in that order the tensors hold, concatenated:
  codes (uint8): pack(V codes, count x n) then pack(U codes, count x m), each packed at b bits;
  params (fp16): V scale, V offset (count x ceil(n/g) each), U scale, U offset (count x ceil(m/g)).
With `meta["gains"]` true, params ends with one more fp16 per kept triplet (k in all, stored order):
its gain g_i = (e_i(0) - e_i(b_i)) / E(0), the output error its kept width removes as the allocation
predicted it, relative to the delta's energy E(0) = ||D X||^2. A later rank cap (export-peft
--max-rank R) keeps the R triplets of largest gain and adds the sum of the others' to the predicted
squared relative error. Artifacts written before gains existed have no such tail.
V^ rows are singular vectors of the input side (k x n); U^ columns the output side (m x k), with the
singular values folded into U^ by the reconstruction target correction.

The size model, shared by the allocator, the preflight checks and the reader:
  triplet_bits(m, n, b, g)  what the ILP counts for one triplet at width b: b (m + n) bits of codes
                            plus 32 bits (fp16 scale and offset) per group of u and of v, plus its
                            16-bit gain;
  stored_bits(shape, meta)  the exact bits stored, which adds the byte padding of each width's two
                            packed code streams: at most PACK_PAD_BITS per width.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant.grid import PARAM_BITS, dequantize, expand_groups, n_groups
from ..quant.pack import pack, packed_nbytes, unpack
from .kinds import (Encoded, QuantizedFactors, parse_width_meta, register_decoder, register_factors, register_gains,
                    register_quantized_factors)

PACK_PAD_BITS = 14  # per width and tensor: the byte padding of its two packed code streams (2 x 7 bits)
KIND = "svd-mixed"
GAIN_BITS = 16  # per kept triplet: its fp16 gain


def width_groups(widths: list[int]) -> list[list[int]]:
    """Runs of equal widths: [8, 8, 3, 2, 2] -> [[8, 2], [3, 1], [2, 2]]."""
    groups: list[list[int]] = []
    for b in widths:
        if groups and groups[-1][0] == b:
            groups[-1][1] += 1
        else:
            groups.append([b, 1])
    return groups


def width_meta(group_size: int, groups: list[list[int]]) -> dict:
    """The metadata of an entry storing `groups` ([[b, count], ...], widest first) with gains."""
    return {"widths": [list(p) for p in groups], "group_size": group_size, "gains": True}


def triplet_bits(m: int, n: int, width: int, group_size: int) -> int:
    """Bits of one triplet at `width` as the allocation counts them: codes of u (m) and v (n) plus
    their grids (0 for width 0); the packing's byte padding is left to stored_bits."""
    if width == 0:
        return 0
    return width * (m + n) + PARAM_BITS * (n_groups(m, min(group_size, m)) + n_groups(n, min(group_size, n))) + GAIN_BITS


def stored_bits(shape: tuple[int, int], meta: dict) -> int:
    """Exact bits stored for an entry of `shape` with `meta` ({"group_size", "widths": [[b, count]], "gains"})."""
    nbytes, nparams = expected_sizes(shape, meta)
    return 8 * nbytes + 16 * nparams


def encode_factors(shape: tuple[int, int], widths: list[int], group_size: int,
                   V: dict[str, torch.Tensor], U: dict[str, torch.Tensor], gains: torch.Tensor,
                   stats: dict | None = None) -> Encoded:
    """Pack quantized factors. widths: (k,) non-increasing, all > 0; V/U hold codes (k, n)/(k, m),
    scale and offset (k, G) as returned by quant.gptq / quant.grid; gains (k,): each triplet's
    relative gain (see the module doc), stored in fp16."""
    if any(a < b for a, b in zip(widths, widths[1:])):
        raise ValueError("widths must be non-increasing")
    groups = width_groups(widths)
    codes, params, start = [], [], 0
    for b, count in groups:
        rows = slice(start, start + count)
        codes += [pack(V["codes"][rows], b), pack(U["codes"][rows], b)]
        params += [V["scale"][rows], V["offset"][rows], U["scale"][rows], U["offset"][rows]]
        start += count
    if len(gains) != len(widths):
        raise ValueError(f"{len(gains)} gains for {len(widths)} triplets")
    params.append(gains)
    tensors = {
        "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
        "params": torch.cat([p.reshape(-1).float() for p in params]).to(torch.float16),
    }
    return Encoded("svd-mixed", tuple(shape), width_meta(group_size, groups), tensors, stats or {})


def expected_sizes(shape: tuple[int, int], meta: dict) -> tuple[int, int]:
    """(bytes of codes, number of fp16 params) that `meta` implies for a tensor of `shape`."""
    m, n = shape
    g = int(meta["group_size"])
    nbytes = nparams = 0
    for b, count in meta["widths"]:
        nbytes += packed_nbytes(count * n, b) + packed_nbytes(count * m, b)
        nparams += 2 * count * (n_groups(n, min(g, n)) + n_groups(m, min(g, m)))
        nparams += count if meta.get("gains") else 0
    return nbytes, nparams


def checked_tensors(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, params) after checking their dtypes and sizes against what `meta` implies."""
    return sized_tensors(tensors, *expected_sizes(shape, meta))


def sized_tensors(tensors: dict[str, torch.Tensor], nbytes: int, nparams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, params) after checking that they are `nbytes` uint8 codes and `nparams` fp16 params."""
    codes, params = tensors["codes"], tensors["params"]
    if codes.dtype != torch.uint8 or codes.numel() != nbytes or params.dtype != torch.float16 or params.numel() != nparams:
        raise AdamixError(f"stored factors have {codes.numel()} code bytes and {params.numel()} params, "
                          f"the manifest implies {nbytes} and {nparams}")
    return codes, params


@register_gains("svd-mixed")
def gains(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The stored gains (k,) float32 in stored order, or None for an entry written without them."""
    _, groups = parse_width_meta(meta, "svd-mixed")
    if not meta.get("gains"):
        return None
    _, params = checked_tensors(shape, meta, tensors)
    k = sum(count for _, count in groups)
    return params[params.numel() - k:].float()


@register_quantized_factors("svd-mixed")
def svd_mixed_quantized(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedFactors:
    """The stored codes and grids, unpacked: V^ (k, n) and U^T (k, m), rows widest first."""
    m, n = shape
    g, groups = parse_width_meta(meta, "svd-mixed")
    codes, params = checked_tensors(shape, meta, tensors)
    gn, gm = min(g, n), min(g, m)
    Gn, Gm = n_groups(n, gn), n_groups(m, gm)
    parts = {"vc": [torch.zeros(0, n, dtype=torch.uint8)], "uc": [torch.zeros(0, m, dtype=torch.uint8)],
             "vs": [torch.zeros(0, Gn)], "vo": [torch.zeros(0, Gn)], "us": [torch.zeros(0, Gm)], "uo": [torch.zeros(0, Gm)]}
    cpos, ppos = 0, 0

    def take_codes(count: int, length: int, b: int) -> torch.Tensor:
        nonlocal cpos
        size = packed_nbytes(count * length, b)
        out = unpack(codes[cpos:cpos + size], b, count * length).reshape(count, length)
        cpos += size
        return out

    def take_params(count: int, length: int, g_: int) -> torch.Tensor:
        nonlocal ppos
        size = count * n_groups(length, g_)
        out = params[ppos:ppos + size].float().reshape(count, -1)
        ppos += size
        return out

    for b, count in groups:
        parts["vc"].append(take_codes(count, n, b))
        parts["uc"].append(take_codes(count, m, b))
        for key, length, g_ in (("vs", n, gn), ("vo", n, gn), ("us", m, gm), ("uo", m, gm)):
            parts[key].append(take_params(count, length, g_))
    cat = {key: torch.cat(v) for key, v in parts.items()}
    bits = [b for b, count in groups for _ in range(count)]
    return QuantizedFactors(bits, gn, gm, {"codes": cat["vc"], "scale": cat["vs"], "offset": cat["vo"]},
                            {"codes": cat["uc"], "scale": cat["us"], "offset": cat["uo"]})


@register_factors("svd-mixed", rank=lambda meta: sum(count for _, count in meta["widths"]))
def factors(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode to (U^ (m, k), V^ (k, n)) float32."""
    m, n = shape
    q = svd_mixed_quantized(shape, meta, tensors)
    V = dequantize(q.V["codes"], expand_groups(q.V["scale"], n, q.gv), expand_groups(q.V["offset"], n, q.gv))
    Ut = dequantize(q.U["codes"], expand_groups(q.U["scale"], m, q.gu), expand_groups(q.U["offset"], m, q.gu))
    return Ut.T, V


@register_decoder("svd-mixed", {"codes": "U8", "params": "F16"})
def decode_factors(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if len(shape) != 2:
        raise AdamixError(f"svd-mixed tensor must be 2-D, manifest says shape {list(shape)}")
    U, V = factors(shape, meta, tensors)
    return U @ V

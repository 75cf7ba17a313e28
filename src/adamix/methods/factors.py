"""Storage of quantized low-rank factors, kind "svd-mixed": D^ = U^ V^ with per-vector widths.

The kept triplets are ordered by width, widest first; `meta["widths"] = [[b, count], ...]`.
For each width b in that order the tensors hold, concatenated:
  codes (uint8): pack(V codes, count x n) then pack(U codes, count x m), each packed at b bits;
  params (fp16): V scale, V offset (count x ceil(n/g) each), U scale, U offset (count x ceil(m/g)).
V^ rows are singular vectors of the input side (k x n); U^ columns the output side (m x k), with the
singular values folded into U^ by the reconstruction target correction.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant.grid import dequantize, expand_groups, n_groups
from ..quant.pack import pack, packed_nbytes, unpack
from .base import (Encoded, QuantizedFactors, parse_width_meta, register_decoder, register_factors,
                   register_quantized_factors)


def encode_factors(shape: tuple[int, int], widths: list[int], group_size: int,
                   V: dict[str, torch.Tensor], U: dict[str, torch.Tensor], stats: dict | None = None) -> Encoded:
    """Pack quantized factors. widths: (k,) non-increasing, all > 0; V/U hold codes (k, n)/(k, m),
    scale and offset (k, G) as returned by quant.gptq / quant.grid."""
    if any(a < b for a, b in zip(widths, widths[1:])):
        raise ValueError("widths must be non-increasing")
    groups: list[list[int]] = []
    for b in widths:
        if groups and groups[-1][0] == b:
            groups[-1][1] += 1
        else:
            groups.append([b, 1])
    codes, params, start = [], [], 0
    for b, count in groups:
        rows = slice(start, start + count)
        codes += [pack(V["codes"][rows], b), pack(U["codes"][rows], b)]
        params += [V["scale"][rows], V["offset"][rows], U["scale"][rows], U["offset"][rows]]
        start += count
    tensors = {
        "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
        "params": torch.cat([p.reshape(-1) for p in params]).to(torch.float16) if params else torch.zeros(0, dtype=torch.float16),
    }
    return Encoded("svd-mixed", tuple(shape), {"widths": groups, "group_size": group_size}, tensors, stats or {})


def expected_sizes(shape: tuple[int, int], meta: dict) -> tuple[int, int]:
    """(bytes of codes, number of fp16 params) that `meta` implies for a tensor of `shape`."""
    m, n = shape
    g = int(meta["group_size"])
    nbytes = nparams = 0
    for b, count in meta["widths"]:
        nbytes += packed_nbytes(count * n, b) + packed_nbytes(count * m, b)
        nparams += 2 * count * (n_groups(n, min(g, n)) + n_groups(m, min(g, m)))
    return nbytes, nparams


@register_quantized_factors("svd-mixed")
def svd_mixed_quantized(shape: tuple[int, int], meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedFactors:
    """The stored codes and grids, unpacked: V^ (k, n) and U^T (k, m), rows widest first."""
    m, n = shape
    g, groups = parse_width_meta(meta, "svd-mixed")
    codes, params = tensors["codes"], tensors["params"]
    nbytes, nparams = expected_sizes(shape, meta)
    if codes.dtype != torch.uint8 or codes.numel() != nbytes or params.dtype != torch.float16 or params.numel() != nparams:
        raise AdamixError(f"stored factors have {codes.numel()} code bytes and {params.numel()} params, "
                          f"the manifest implies {nbytes} and {nparams}")
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


@register_factors("svd-mixed")
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

"""BitDelta peer (Liu et al., 2024), kind "bitdelta": D^ = a sign(D), one bit per entry.

a = mean |D| is the scale that minimises ||a sign(D) - D||_F for the fixed signs. Stored: `signs`
(uint8, the m n sign bits packed LSB first, 1 = positive or zero) and `scale` (fp16, shape (1,)).
The size is fixed, 1 bit per weight plus 16 bits, whatever the ratio asked: alpha = 1/16 of fp16.
Scale distillation (training the scales on calibration text to match the fine-tune's outputs,
`--distill-steps N`) is its whole-model step, `distill.distill_scales`.
"""

from __future__ import annotations

import torch

from ..errors import AdamixError
from ..quant.linalg import error_stats
from ..quant.pack import pack, packed_nbytes, unpack
from .distill import distill_scales
from .kinds import Encoded, register_decoder
from .registry import Method, register

BITDELTA_ALPHA = 1 / 16  # one bit per fp16 weight


def compress_bitdelta(D: torch.Tensor, H: torch.Tensor | None = None) -> Encoded:
    """sign(D) (m x n) packed, with scale mean |D|."""
    m, n = D.shape
    scale = D.double().abs().mean().to(torch.float16).reshape(1)
    enc = Encoded("bitdelta", (m, n), {}, {"signs": pack((D >= 0).to(torch.uint8), 1), "scale": scale})
    enc.stats = error_stats(decode_bitdelta((m, n), {}, enc.tensors), D, H)
    return enc


def sign_matrix(shape: tuple[int, int], signs: torch.Tensor) -> torch.Tensor:
    """The stored signs as a float32 (m, n) matrix of +1 / -1."""
    m, n = shape
    if signs.dtype != torch.uint8 or signs.numel() != packed_nbytes(m * n, 1):
        raise AdamixError(f"bitdelta signs hold {signs.numel()} bytes, shape {list(shape)} needs {packed_nbytes(m * n, 1)}")
    return unpack(signs, 1, m * n).reshape(m, n).float() * 2 - 1


@register_decoder("bitdelta", {"signs": "U8", "scale": "F16"})
def decode_bitdelta(shape: tuple[int, ...], meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    scale = tensors["scale"]
    if len(shape) != 2 or scale.dtype != torch.float16 or scale.numel() != 1:
        raise AdamixError(f"malformed bitdelta entry for shape {list(shape)}")
    return float(scale) * sign_matrix(tuple(shape), tensors["signs"])


class BitDelta(Method):
    name = "bitdelta"
    help = "bitdelta: BitDelta, sign(D) times mean |D| per matrix, 1 bit per weight (ratio 1/16); --distill-steps trains the scales"
    unit = "sign matrix"
    options = frozenset({"distill_steps"})
    kinds = ("bitdelta",)

    def check(self, settings):
        if settings.alpha < BITDELTA_ALPHA:
            raise AdamixError(f"bitdelta stores 1 bit per weight (ratio 1/16); it cannot meet --ratio {settings.alpha:.4g}")

    def item_bits(self, m, n, settings):
        return None  # a fixed size: 1 bit per weight, which check() holds against the ratio

    def stored_alpha(self, settings):
        return min(settings.alpha, BITDELTA_ALPHA)

    def compress(self, D, H, settings, overhead_bits=0.0, factors=None, analysis=None):
        return compress_bitdelta(D, H)

    def whole_model_step(self, options):
        steps = getattr(options, "distill_steps", 0)
        if not steps:
            return None

        def step(encoded, ctx):
            return {"distill": distill_scales(encoded, ctx, steps, self.kinds[0], sign_matrix)}
        return step


register(BitDelta())

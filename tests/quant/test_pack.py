"""Bit packing (quant.pack) and round-to-nearest grids (quant.grid), against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from adamix.quant import grid
from adamix.quant.pack import pack, packed_nbytes, unpack

LENGTHS = (0, 1, 3, 7, 13, 1001)


pytestmark = pytest.mark.usefixtures("single_thread")


def random_codes(count: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (count,), generator=g, dtype=torch.int64).to(torch.uint8)


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Pure-Python packer: code j at bits [j*b, (j+1)*b) of the stream, least significant bit first."""
    stream = 0
    for j, c in enumerate(codes):
        assert 0 <= c < 1 << bits
        stream |= c << (j * bits)
    nbytes = (len(codes) * bits + 7) // 8
    return stream.to_bytes(nbytes, "little")


# --------------------------------------------------------------------------------------------- pack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", LENGTHS)
def test_round_trip_and_exact_size(bits, count):
    codes = random_codes(count, bits, seed=1000 * bits + count)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    out = unpack(packed, bits, count)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", (1, 3, 7, 13, 64))
def test_layout_matches_pure_python_packer(bits, count):
    codes = random_codes(count, bits, seed=7 * bits + count)
    expected = reference_pack(codes.tolist(), bits)
    assert bytes(pack(codes, bits).tolist()) == expected
    # and the reader understands a stream written by the independent packer
    stream = torch.tensor(list(expected), dtype=torch.uint8)
    assert torch.equal(unpack(stream, bits, count), codes)


def test_layout_hand_examples():
    # 3-bit codes 1, 2, 7: stream bits 0-2 = 001, 3-5 = 010, 6-8 = 111 (LSB first)
    # -> 0b11_010_001 = 0xD1, then the remaining high bit 0b1 in the next byte.
    assert pack(torch.tensor([1, 2, 7], dtype=torch.uint8), 3).tolist() == [0xD1, 0x01]
    # 1-bit codes, first code in the least significant bit
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x01, 0x01]
    # 4-bit: low nibble first
    assert pack(torch.tensor([0xA, 0x3], dtype=torch.uint8), 4).tolist() == [0x3A]


def test_pack_accepts_2d_codes_row_major():
    codes = random_codes(5 * 7, 3, seed=3)
    assert torch.equal(pack(codes.reshape(5, 7), 3), pack(codes, 3))


@pytest.mark.parametrize("bits", range(1, 8))
def test_out_of_range_code_raises(bits):
    codes = random_codes(10, bits, seed=bits)
    codes[4] = 1 << bits  # one too large
    with pytest.raises(ValueError):
        pack(codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", (1, 7, 13))
def test_wrong_packed_length_raises(bits, count):
    packed = pack(random_codes(count, bits, seed=count), bits)
    with pytest.raises(ValueError):
        unpack(torch.cat([packed, torch.zeros(1, dtype=torch.uint8)]), bits, count)
    with pytest.raises(ValueError):
        unpack(packed[:-1], bits, count)


@pytest.mark.parametrize("bits", (0, 9, -1))
def test_bad_width_raises(bits):
    with pytest.raises(ValueError):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


# --------------------------------------------------------------------------------------------- rtn


def _gaussian(k: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, length, generator=g) * torch.rand(k, 1, generator=g).add(0.1)


@pytest.mark.parametrize("bits_value", (1, 2, 3, 4, 8))
@pytest.mark.parametrize("length, group_size", [(64, 16), (70, 16), (5, 16), (33, 32), (97, 10)])
def test_rtn_values_lie_on_their_group_grid(bits_value, length, group_size):
    k = 6
    x = _gaussian(k, length, seed=length * 10 + bits_value)
    bits = torch.full((k,), bits_value)
    r = grid.rtn(x, bits, group_size)
    G = math.ceil(length / group_size)
    assert r["scale"].shape == r["offset"].shape == (k, G)
    assert r["codes"].shape == r["deq"].shape == (k, length) and r["codes"].dtype == torch.uint8

    # independent float64 check, group by group (the last group may be short)
    deq = r["deq"].double()
    maxq = (1 << bits_value) - 1
    for row in range(k):
        for grp in range(G):
            sl = slice(grp * group_size, min((grp + 1) * group_size, length))
            scale, offset = float(r["scale"][row, grp]), float(r["offset"][row, grp])
            assert scale > 0
            q = (deq[row, sl] - offset) / scale
            assert torch.allclose(q, q.round(), atol=1e-3), "value off its grid"
            assert q.round().min() >= 0 and q.round().max() <= maxq
            assert torch.equal(q.round(), r["codes"][row, sl].double())
            # codes are the nearest grid point for entries inside the grid range
            xs = x[row, sl].double()
            inside = (xs >= offset) & (xs <= offset + maxq * scale)
            dist = (xs - deq[row, sl]).abs()
            assert bool((dist[inside] <= scale / 2 * (1 + 1e-4) + 1e-7).all())
            # clipped entries go to the nearest end of the grid
            assert bool((deq[row, sl][xs < offset] == offset).all())


@pytest.mark.parametrize("bits_value", (2, 3, 4, 8))
def test_rtn_scale_offset_are_fp16_values(bits_value):
    x = _gaussian(8, 75, seed=bits_value) * 1e-3  # small magnitudes: fp16 rounding actually matters
    r = grid.rtn(x, torch.full((8,), bits_value), 32)
    for t in (r["scale"], r["offset"]):
        assert t.dtype == torch.float32
        assert torch.equal(t.to(torch.float16).float(), t)
    # deq is reproduced bit for bit from codes + (fp16) params, as the decoder does after loading
    s = grid.expand_groups(r["scale"].half().float(), 75, 32)
    o = grid.expand_groups(r["offset"].half().float(), 75, 32)
    assert torch.equal(grid.dequantize(r["codes"], s, o), r["deq"])


def test_rtn_error_non_increasing_in_width():
    x = _gaussian(40, 300, seed=11)
    errs = []
    for b in (2, 3, 4, 8):
        deq = grid.rtn(x, torch.full((40,), b), 64)["deq"].double()
        errs.append(((deq - x.double()) ** 2).sum(1))  # per vector
    for lo, hi in zip(errs, errs[1:]):
        assert bool((hi <= lo).all())
    # and the gains are substantial (~4x per extra bit): 8 bits is orders of magnitude below 2 bits
    assert float(errs[3].sum()) < 1e-3 * float(errs[0].sum())


def test_rtn_mixed_widths_per_row_equal_single_width_calls():
    x = _gaussian(5, 50, seed=5)
    bits = torch.tensor([8, 2, 3, 1, 4])
    r = grid.rtn(x, bits, 16)
    for i in range(5):
        ri = grid.rtn(x[i:i + 1], bits[i:i + 1], 16)
        for key in ("codes", "scale", "offset", "deq"):
            assert torch.equal(r[key][i], ri[key][0])
        assert int(r["codes"][i].max()) <= (1 << int(bits[i])) - 1


def test_rtn_last_partial_group_independent_of_other_groups():
    # The last (short) group gets its own grid fitted on its own entries only: changing the
    # entries of the full groups must not change it, and its range follows its own entries.
    g = 16
    x = _gaussian(3, 2 * g + 5, seed=9)
    bits = torch.full((3,), 4)
    r1 = grid.rtn(x, bits, g)
    y = x.clone()
    y[:, : 2 * g] *= 50.0
    r2 = grid.rtn(y, bits, g)
    assert torch.equal(r1["scale"][:, 2], r2["scale"][:, 2])
    assert torch.equal(r1["offset"][:, 2], r2["offset"][:, 2])
    assert torch.equal(r1["deq"][:, 2 * g:], r2["deq"][:, 2 * g:])
    assert not torch.equal(r1["scale"][:, 0], r2["scale"][:, 0])
    tail = x[:, 2 * g:].double()
    span = tail.amax(1) - tail.amin(1)
    # grid spacing is at most the tail's own span / 15 (+ fp16 rounding), far below the full groups'
    assert bool((r1["scale"][:, 2].double() <= span / 15 * (1 + 2e-3)).all())
    assert bool((r2["scale"][:, 2] < r2["scale"][:, :2].amin(1)).all())
    # the short group is quantized exactly as the tail would be on its own
    alone = grid.rtn(x[:, 2 * g:].contiguous(), bits, g)
    assert torch.equal(alone["deq"], r1["deq"][:, 2 * g:])
    assert torch.equal(alone["scale"][:, 0], r1["scale"][:, 2])


def test_rtn_constant_group_is_exact():
    x = torch.full((2, 20), 0.375)  # fp16-exact constant
    r = grid.rtn(x, torch.tensor([2, 8]), 8)
    assert torch.equal(r["deq"], x)
    assert bool((r["scale"] > 0).all())

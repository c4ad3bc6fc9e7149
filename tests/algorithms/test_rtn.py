"""RTN: integers, scales and zero points equal the formulas on hand-made tensors; the graph op agrees."""
from __future__ import annotations

import pytest
import torch

from pt2q.algorithms.rtn import FP4_TABLE, NF4_TABLE, WeightFormat, rtn_quantize
from pt2q.ops import dequantize_weight, pack_codes, unpack_codes


def _graph_op(q):
    fmt = q.fmt
    return dequantize_weight(q.packed(), q.scale, q.zero_point, fmt.code_table, fmt.bits, fmt.group_size,
                             list(q.shape), fmt.group_dim)


def test_symmetric_int4_formula():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0], [2.0, 1.0, -1.0, 0.5]])
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=4, sym=True))
    scale = w.abs().amax(1) / 7                                     # amax / (2**(b-1) - 1)
    assert torch.equal(q.scale[:, 0], scale)
    assert q.zero_point is None
    expected = torch.round(w / scale[:, None]).clamp(-8, 7).to(torch.int64) + 8
    assert torch.equal(q.codes.long()[:, :4], expected)
    assert torch.equal(q.dequantize(), (expected - 8).float() * scale[:, None])


def test_full_range_maps_the_largest_magnitude_to_minus_2_pow_b_minus_1():
    w = torch.tensor([[0.8, -0.2, 0.1, 0.3], [-1.6, 0.4, 0.2, 1.0]])
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=4, sym=True, full_range=True))
    assert torch.allclose(q.scale[:, 0], torch.tensor([-0.8 / 8, 1.6 / 8]))
    signed = q.codes.long()[:, :4] - 8
    assert signed[0, 0] == -8 and signed[1, 0] == -8                # the extreme value uses code -8
    assert torch.equal(q.dequantize(), signed.float() * q.scale)


def test_asymmetric_formula_includes_zero_in_the_range():
    w = torch.tensor([[0.2, 0.5, 0.9, 1.3], [-3.0, -1.0, -0.5, 0.25]])
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=4, sym=False))
    low = torch.tensor([0.0, -3.0])                                  # row 0: min widened to 0
    high = torch.tensor([1.3, 0.25])
    scale = (high - low) / 15
    zero = torch.round(-low / scale).clamp(0, 15)
    assert torch.equal(q.scale[:, 0], scale)
    assert torch.equal(q.zero_point[:, 0], zero.to(torch.uint8))
    codes = (torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, 15).to(torch.int64)
    assert torch.equal(q.codes.long()[:, :4], codes)


def test_quantile_scales_the_range():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.125]])
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=4), quantile=0.5)
    assert torch.allclose(q.scale[0, 0], torch.tensor(0.5 / 7))
    assert q.codes.long()[0, 0] == 15                                       # 1.0 clips to the top code


@pytest.mark.parametrize("dtype,table", [("nf4", NF4_TABLE), ("fp4", FP4_TABLE)])
def test_code_tables(dtype, table):
    w = torch.randn(3, 32)
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=16, dtype=dtype))
    table = torch.tensor(table)
    assert torch.allclose(q.scale, w.reshape(3, 2, 16).abs().amax(-1) / table.abs().max())
    scaled = w.reshape(3, 2, 16) / q.scale[..., None]
    nearest = (scaled[..., None] - table).abs().argmin(-1)
    assert torch.equal(q.codes.long().reshape(3, 2, 16), nearest)
    assert torch.equal(q.dequantize(), (table[nearest] * q.scale[..., None]).reshape(3, 32))


def test_remainder_group_is_zero_padded():
    w = torch.randn(5, 70)                                           # 70 = 2 groups of 32 + 6
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=32, sym=False))
    assert q.scale.shape == (5, 3) and q.codes.long().shape == (5, 96)
    last = w[:, 64:]
    assert torch.allclose(q.scale[:, 2], (last.amax(1).clamp(min=0) - last.amin(1).clamp(max=0)) / 15)
    assert q.dequantize().shape == (5, 70)
    assert torch.equal(q.dequantize(), _graph_op(q))


def test_group_dim_0_groups_along_output_channels():
    w = torch.randn(64, 8)
    q = rtn_quantize(w, WeightFormat(bits=4, group_size=32, group_dim=0))
    assert q.scale.shape == (8, 2)                                   # rows = input columns, groups of outputs
    assert torch.allclose(q.scale[:, 0], w[:32].abs().amax(0) / 7)
    assert q.dequantize().shape == (64, 8)
    assert torch.equal(q.dequantize(), _graph_op(q))


def test_per_channel_group_size_minus_one():
    w = torch.randn(4, 20)
    q = rtn_quantize(w, WeightFormat(bits=8, group_size=-1))
    assert q.scale.shape == (4, 1)
    assert torch.equal(q.scale[:, 0], w.abs().amax(1) / 127)
    assert (q.dequantize() - w).abs().max() <= q.scale.max() / 2 + 1e-7


def test_mse_clip_never_worse_than_plain_rtn():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * torch.rand(16, 128).pow(4) * 3        # heavy tails: clipping pays
    fmt = WeightFormat(bits=3, group_size=32, sym=False)
    plain = (rtn_quantize(w, fmt).dequantize() - w).pow(2).reshape(16, 4, 32).sum(-1)
    clipped = (rtn_quantize(w, fmt, mse_clip=True).dequantize() - w).pow(2).reshape(16, 4, 32).sum(-1)
    assert (clipped <= plain + 1e-7).all() and clipped.sum() < plain.sum()


def test_all_zero_group_gets_scale_one_and_dequantizes_to_zero():
    w = torch.zeros(2, 32)
    for fmt in (WeightFormat(4, 32, True), WeightFormat(4, 32, False), WeightFormat(4, 32, True, "nf4")):
        q = rtn_quantize(w, fmt)
        assert torch.equal(q.scale, torch.ones(2, 1)) and torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_and_is_dense(bits):
    codes = torch.randint(0, 1 << bits, (3, 48))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 48 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_4_bit_packing_is_two_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, True), WeightFormat(4, 32, False), WeightFormat(3, 32, False),
                                 WeightFormat(2, 16, False), WeightFormat(8, -1, True), WeightFormat(4, 32, True, "fp4"),
                                 WeightFormat(5, 12, False), WeightFormat(4, 32, True, full_range=True)],
                         ids=str)
def test_graph_op_equals_eager_dequantize_exactly(fmt):
    w = torch.randn(24, 70)
    q = rtn_quantize(w, fmt)
    assert torch.equal(q.dequantize(), _graph_op(q))
    assert int(q.codes.long().max()) < (1 << fmt.bits) and int(q.codes.long().min()) >= 0

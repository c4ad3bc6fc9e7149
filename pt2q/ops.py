"""pt2q's graph op for weight-only quantization: packed low-bit integers -> float weight.

    weight = pt2q.dequantize_weight(packed, scale, zero_point, code_table, bits, group_size, shape, group_dim)
    out = aten.linear(x, weight, bias)

A quantized weight lives in the graph as three or four constants feeding this one op, which feeds the
original `linear`; the graph stays an ordinary exportable, savable FX graph, and backends replace the pair
with a kernel (`pt2q.backends.inductor`).

Layout. The weight is viewed in its *grouped orientation*: `[rows, cols]` = `[shape[0], prod(shape[1:])]`
when `group_dim == 1` (groups run along the input dimension, the usual case; a conv's input channels and
kernel taps flattened) and the 2-D `shape` transposed when `group_dim == 0`.
`cols` is padded with zeros to a whole number of groups (and of 8 codes); groups of `group_size`
consecutive columns share a scale (`group_size == -1`: one group per row).
- `packed` (uint8, `[rows, padded_cols * bits / 8]`): unsigned codes in `[0, 2**bits)`. Every 8
  consecutive codes of a row fill `bits` bytes, least significant bits first, so 4-bit codes are two per
  byte (low nibble first), 2-bit four per byte, 8-bit one per byte, 3-bit 8 codes in 3 bytes.
- `scale` (float32, `[rows, groups]`).
- `zero_point` (`[rows, groups]`) or None: integer codes dequantize as `(code - zero_point) * scale`, in
  float32; None means symmetric, zero point `2**(bits-1)`. uint8 for the integer zero points of RTN / GPTQ /
  AWQ, float32 for HQQ's fitted ones (any real value, also outside the code range).
- `code_table` (float32, `[2**bits]`) or None: codes index the table instead (NF4 / FP4): `table[code] * scale`.
"""
from __future__ import annotations

import math

import torch

__all__ = ["choose_fp8_scale", "dequantize_fp8", "dequantize_weight", "pack_codes", "padded_columns", "quantize_fp8",
           "unpack_codes"]


def padded_columns(cols: int, group_size: int) -> int:
    """Columns after padding to whole groups and to a multiple of 8 codes (the packing unit)."""
    group = cols if group_size == -1 else group_size
    cols = -(-cols // group) * group
    return -(-cols // 8) * 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes `[rows, cols]` (cols a multiple of 8, values < 2**bits) into uint8."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"pack_codes: {cols} columns is not a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    units = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (units << shifts).sum(-1)                                   # 8 codes in 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.reshape(rows, cols // 8 * bits).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 `[rows, cols * bits / 8]` -> int64 codes `[rows, cols]`."""
    rows = packed.shape[0]
    if bits == 8:
        return packed.to(torch.int64)
    units = packed.to(torch.int64).reshape(rows, -1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (units << byte_shifts).sum(-1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       code_table: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Float values `[rows, groups * group_size]` from codes in the grouped orientation (the op's arithmetic)."""
    group = codes.shape[1] if group_size == -1 else group_size
    # Columns past the last whole group are packing padding (beyond the real columns): dropped.
    codes = codes[:, :scale.shape[1] * group]
    if code_table is not None:
        values = code_table.to(torch.float32)[codes]
    else:
        # In float32: exact for integer zero points (small integers), and a float zero point (HQQ) is
        # subtracted as it is.
        zero = (torch.full_like(scale, 1 << (bits - 1), dtype=torch.float32) if zero_point is None
                else zero_point.to(torch.float32))
        values = codes.to(torch.float32) - zero.repeat_interleave(group, dim=1)
    scales = scale.to(torch.float32).repeat_interleave(group, dim=1)
    return values * scales


@torch.library.custom_op("pt2q::dequantize_weight", mutates_args=())
def dequantize_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      code_table: torch.Tensor | None, bits: int, group_size: int, shape: list[int],
                      group_dim: int) -> torch.Tensor:
    """The float32 weight of `shape` (2-D, or a conv's) encoded by the packed codes (see the module docstring)."""
    codes = unpack_codes(packed, bits)
    values = dequantize_grouped(codes, scale, zero_point, code_table, bits, group_size)
    if group_dim == 0:
        return values[:shape[1], :shape[0]].t().contiguous()
    return values[:, :math.prod(shape[1:])].reshape(shape).contiguous()


@dequantize_weight.register_fake
def _(packed, scale, zero_point, code_table, bits, group_size, shape, group_dim):
    return packed.new_empty(list(shape), dtype=torch.float32)


DEQUANTIZE_WEIGHT = torch.ops.pt2q.dequantize_weight.default


# -- FP8 quantize / dequantize (pt2q/fp8.py has the arithmetic and the formats) ------------------------
#   activation:  q = pt2q.quantize_fp8(x, scale, dtype, saturation); x' = pt2q.dequantize_fp8(q, scale, float32)
#   dynamic:     scale = pt2q.choose_fp8_scale(x, saturation), then the same pair
#   weight:      w' = pt2q.dequantize_fp8(w_fp8 constant, scale, float32)   (quantized at convert)
# `scale` is float32 and broadcasts against the tensor: shape [] per tensor, [channels, 1] per output channel
# of a weight. `saturation` is the target device's full scale (pt2q.fp8.full_scale).
@torch.library.custom_op("pt2q::quantize_fp8", mutates_args=())
def quantize_fp8(input: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, saturation: float) -> torch.Tensor:
    """`cast_rne(clamp(input * (1 / scale), -saturation, saturation))` as the float8 `dtype`."""
    from . import fp8

    return fp8.quantize(input, scale, dtype, saturation)


@quantize_fp8.register_fake
def _(input, scale, dtype, saturation):
    return input.new_empty(input.shape, dtype=dtype)


@torch.library.custom_op("pt2q::dequantize_fp8", mutates_args=())
def dequantize_fp8(input: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`input * scale` as `out_dtype`."""
    from . import fp8

    return fp8.dequantize(input, scale, out_dtype)


@dequantize_fp8.register_fake
def _(input, scale, out_dtype):
    return input.new_empty(input.shape, dtype=out_dtype)


@torch.library.custom_op("pt2q::choose_fp8_scale", mutates_args=())
def choose_fp8_scale(input: torch.Tensor, saturation: float) -> torch.Tensor:
    """The per-tensor scale `max|input| / saturation` of this call (dynamic activations), shape []."""
    from . import fp8

    return fp8.dynamic_scale(input, saturation)


@choose_fp8_scale.register_fake
def _(input, saturation):
    return input.new_empty((), dtype=torch.float32)


QUANTIZE_FP8 = torch.ops.pt2q.quantize_fp8.default
DEQUANTIZE_FP8 = torch.ops.pt2q.dequantize_fp8.default
CHOOSE_FP8_SCALE = torch.ops.pt2q.choose_fp8_scale.default

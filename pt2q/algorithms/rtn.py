"""Round-to-nearest weight quantization, and the grouped integer arithmetic every weight-only algorithm shares.

A weight `[out, in]` is viewed in its grouped orientation (`[out, in]` for `group_dim=1`, transposed for
`group_dim=0`), padded with zeros to whole groups, and split into groups of `group_size` columns
(`-1`: one group per row). Per group (formulas in ../shared/docs/field-notes.md):

- symmetric int: `scale = amax * ratio / (2**(b-1) - 1)`, `q = clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1)`,
  stored as the unsigned code `q + 2**(b-1)`. With `full_range`, `scale = -m * ratio / 2**(b-1)` where `m`
  is the group's value of largest magnitude (signed), so that value maps to `-2**(b-1)` and no code is lost.
- asymmetric int: `[min, max]` widened to include 0 and multiplied by `ratio`, `scale = (max - min) / (2**b - 1)`,
  `zero_point = clamp(round(-min / scale), 0, 2**b - 1)`, `code = clamp(round(w / scale) + zero_point, 0, 2**b - 1)`.
- nf4 / fp4: `scale = amax * ratio / max|table|`, code = index of the nearest table entry to `w / scale`.

`ratio` is `quantile` (a clip factor on the range), or with `mse_clip` the best of `quantile * (1 - i/200)`,
i < 40, per group (least squared error). A group whose values are all zero gets scale 1.
Padding zeros never move a group's range (0 is always inside it) and dequantize to exactly 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops import dequantize_grouped, pack_codes, padded_columns

NF4_TABLE = (-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
             0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0)
# FP4 E2M1: codes 0-7 are the positive magnitudes, 8-15 the same magnitudes negated.
_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_TABLE = _FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES)
CODE_TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
WEIGHT_DTYPES = ("int", *CODE_TABLES)
MSE_CLIP_RATIOS = tuple(1 - i / 200 for i in range(40))


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: what the config fields `bits, group_size, sym, dtype, full_range, group_dim`
    say for a layer."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True
    dtype: str = "int"
    full_range: bool = False
    group_dim: int = 1

    @property
    def code_table(self) -> torch.Tensor | None:
        table = CODE_TABLES.get(self.dtype)
        return None if table is None else torch.tensor(table, dtype=torch.float32)

    def grouped_shape(self, shape) -> tuple[int, int]:
        if self.group_dim == 0:
            return shape[1], shape[0]
        return shape[0], math.prod(shape[1:])

    def group_width(self, cols: int) -> int:
        return padded_columns(cols, -1) if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    """Integer codes in the grouped orientation and their group parameters (see pt2q.ops for the layout)."""

    codes: torch.Tensor            # uint8 [rows, padded_cols] (a code always fits a byte; int64 would take
                                   # twice the float weight's memory while a model is being quantized)
    scale: torch.Tensor            # float32 [rows, groups]
    zero_point: torch.Tensor | None  # [rows, groups]: uint8 (RTN, GPTQ, AWQ) or float32 (HQQ's fitted zero
                                     # points); None for symmetric / table formats
    fmt: WeightFormat
    shape: tuple[int, ...]         # the float weight's shape: [out, in], or a conv's [out, in, *kernel]

    def __post_init__(self):
        self.codes = self.codes.to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight `[out, in]`, computed exactly as the graph's dequantize op computes it."""
        values = dequantize_grouped(self.codes.to(torch.int64), self.scale, self.zero_point, self.fmt.code_table,
                                    self.fmt.bits, self.fmt.group_size)
        rows, cols = self.fmt.grouped_shape(self.shape)
        values = values[:rows, :cols]
        return (values.reshape(self.shape) if self.fmt.group_dim == 1 else values.t()).contiguous()

    def packed(self) -> torch.Tensor:
        return pack_codes(self.codes, self.fmt.bits)

    @property
    def num_bytes(self) -> int:
        zero = 0 if self.zero_point is None else self.zero_point.numel() * self.zero_point.element_size()
        return self.packed().numel() + self.scale.numel() * 4 + zero


def grouped(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """float32 `[rows, padded_cols]`: the weight in its grouped orientation, zero padded."""
    values = weight.detach().to(torch.float32)
    values = values.reshape(values.shape[0], -1) if fmt.group_dim == 1 else values.t()
    rows, cols = values.shape
    padded = padded_columns(cols, fmt.group_size)
    if padded != cols:
        values = torch.nn.functional.pad(values, (0, padded - cols))
    return values.contiguous()


def _split(values: torch.Tensor, fmt: WeightFormat, cols: int) -> torch.Tensor:
    """[rows, padded_cols] -> [rows, groups, group]: the groups covering the `cols` real columns (packing
    padding past the last of them dropped)."""
    rows, padded = values.shape
    width = fmt.group_width(padded)
    groups = -(-cols // width)
    return values[:, :groups * width].reshape(rows, groups, width)


def group_parameters(groups: torch.Tensor, fmt: WeightFormat, ratio) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point) of shape `groups.shape[:-1]` for values `[..., group]`; `ratio` broadcasts."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    if fmt.dtype != "int":
        table_max = max(abs(v) for v in CODE_TABLES[fmt.dtype])
        amax = groups.abs().amax(-1) * ratio
        scale = amax / table_max
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    if fmt.sym:
        if fmt.full_range:
            top, bottom = groups.amax(-1), groups.amin(-1)
            extreme = torch.where(bottom.abs() >= top.abs(), bottom, top) * ratio
            scale = -extreme / (1 << (fmt.bits - 1))
            return torch.where(extreme != 0, scale, torch.ones_like(scale)), None
        amax = groups.abs().amax(-1) * ratio
        scale = amax / ((1 << (fmt.bits - 1)) - 1)
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    low = groups.amin(-1).clamp(max=0) * ratio
    high = groups.amax(-1).clamp(min=0) * ratio
    scale = (high - low) / ((1 << fmt.bits) - 1)
    scale = torch.where(high > low, scale, torch.ones_like(scale))
    zero_point = torch.round(-low / scale).clamp(0, (1 << fmt.bits) - 1)
    return scale, zero_point.to(torch.uint8)


def quantize_values(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    fmt: WeightFormat) -> torch.Tensor:
    """int64 codes of `values` under (scale, zero_point), which broadcast against `values`."""
    if fmt.dtype != "int":
        table = fmt.code_table
        distance = (values.unsqueeze(-1) / scale.unsqueeze(-1) - table).abs()
        return distance.argmin(-1)
    top = (1 << fmt.bits) - 1
    if zero_point is None:
        half = 1 << (fmt.bits - 1)
        return torch.round(values / scale).clamp(-half, half - 1).to(torch.int64) + half
    return (torch.round(values / scale) + zero_point.to(torch.float32)).clamp(0, top).to(torch.int64)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      fmt: WeightFormat) -> torch.Tensor:
    """Float values of `codes`, with the same arithmetic as the graph op (pt2q.ops.dequantize_grouped)."""
    if fmt.code_table is not None:
        return fmt.code_table[codes] * scale
    zero = float(1 << (fmt.bits - 1)) if zero_point is None else zero_point.to(torch.float32)
    return (codes.to(torch.float32) - zero) * scale


def _codes_for(groups: torch.Tensor, fmt: WeightFormat, ratio):
    scale, zero_point = group_parameters(groups, fmt, ratio)
    zero = None if zero_point is None else zero_point.unsqueeze(-1)
    codes = quantize_values(groups, scale.unsqueeze(-1), zero, fmt)
    return codes, scale, zero_point


def _fake_quantized(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    fmt: WeightFormat) -> torch.Tensor:
    """dequantize_values(quantize_values(values, scale, zero_point[..., None]), ...): for integer formats
    the levels are kept in float (exact for these small integers), the same numbers without int64 copies."""
    if fmt.dtype != "int":
        zero = None if zero_point is None else zero_point.unsqueeze(-1)
        return dequantize_values(quantize_values(values, scale, zero, fmt), scale, zero, fmt)
    level = torch.round(values / scale)
    if zero_point is None:
        half = 1 << (fmt.bits - 1)
        return level.clamp_(-half, half - 1).mul_(scale)
    zero = zero_point.unsqueeze(-1).to(torch.float32)
    return level.add_(zero).clamp_(0, (1 << fmt.bits) - 1).sub_(zero).mul_(scale)


# mse_group_parameters tries this many values of (ratios x group elements) at once, at most.
_MSE_CHUNK_ELEMENTS = 1 << 22


def mse_group_parameters(groups: torch.Tensor, fmt: WeightFormat, quantile=1.0):
    """(scale, zero_point) per group of `groups` [..., group]: of the range factors `quantile * r`, r in
    MSE_CLIP_RATIOS, the one with the least squared quantization error of the group (ties: the widest).
    Several factors are tried in one pass (a leading dimension, as many as fit _MSE_CHUNK_ELEMENTS)."""
    per_chunk = max(1, min(len(MSE_CLIP_RATIOS), _MSE_CHUNK_ELEMENTS // max(groups.numel(), 1)))
    shape = (-1,) + (1,) * (groups.dim() - 1)
    best = None
    for first in range(0, len(MSE_CLIP_RATIOS), per_chunk):
        ratios = torch.tensor([quantile * r for r in MSE_CLIP_RATIOS[first:first + per_chunk]],
                              dtype=torch.float32, device=groups.device).reshape(shape)
        scale, zero_point = group_parameters(groups, fmt, ratios)   # [ratios, ...]
        error = (_fake_quantized(groups, scale.unsqueeze(-1), zero_point, fmt) - groups).pow(2).sum(-1)
        error, index = error.min(0)                  # the first of equal errors: the widest range
        scale = scale.gather(0, index.unsqueeze(0)).squeeze(0)
        if zero_point is not None:
            zero_point = zero_point.gather(0, index.unsqueeze(0)).squeeze(0)
        if best is None:
            best = [error, scale, zero_point]
            continue
        better = error < best[0]
        best[0] = torch.where(better, error, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero_point is not None:
            best[2] = torch.where(better, zero_point, best[2])
    return best[1], best[2]


def rtn_quantize(weight: torch.Tensor, fmt: WeightFormat, *, quantile: float = 1.0,
                 mse_clip: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight `[out, in]` or `[out, in, *kernel]` (see the module docstring)."""
    values = grouped(weight, fmt)
    groups = _split(values, fmt, fmt.grouped_shape(weight.shape)[1])
    if mse_clip:
        scale, zero_point = mse_group_parameters(groups, fmt, quantile)
        zero = None if zero_point is None else zero_point.unsqueeze(-1)
        codes = quantize_values(groups, scale.unsqueeze(-1), zero, fmt)
    else:
        codes, scale, zero_point = _codes_for(groups, fmt, quantile)
    return assemble(codes, scale, zero_point, fmt, tuple(weight.shape), values.shape[1])


def assemble(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: WeightFormat,
             shape: tuple[int, ...], padded_cols: int) -> QuantizedWeight:
    """A QuantizedWeight from codes `[rows, groups, group]` (see `_split`) and their group parameters: the
    columns past the last group (packing padding) get the code of the value 0."""
    rows, cols = codes.shape[0], padded_cols
    flat = codes.reshape(rows, -1)
    if flat.shape[1] < cols:  # packing padding past the last whole group: the zero-point code (value 0)
        fill = (CODE_TABLES[fmt.dtype].index(0.0) if fmt.dtype != "int"
                else (1 << (fmt.bits - 1)) if zero_point is None else None)
        pad = (torch.full((rows, cols - flat.shape[1]), fill, dtype=torch.int64) if fill is not None
               else zero_point[:, -1:].to(torch.int64).expand(rows, cols - flat.shape[1]))
        flat = torch.cat([flat, pad], dim=1)
    return QuantizedWeight(flat.contiguous(), scale.contiguous(), zero_point, fmt, tuple(shape))

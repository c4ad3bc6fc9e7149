"""TEQ (trainable equivalent transformation): per-channel scales learnt by gradient descent, then RTN.

For linears sharing an input `x` (q/k/v after a norm; gate/up), a positive per-input-channel scale `s`
leaves `x W^T = (x / s) (W s)^T` unchanged in fp32; quantizing `W s` instead of `W` changes how each
column's values fall on the quantization grid. TEQ starts from `s = 1` (plain round to nearest) and trains
`s` with Adam to make the block's outputs with fake-quantized weights `Q(W s)` and inputs `x / s` closer to
the float block's. Afterwards `1/s` goes into the producer of `x` (or an explicit `mul`) and `s` into the
weights' input columns, exactly like SmoothQuant's and AWQ's scales, and the weights are rounded to nearest.

This module knows nothing about graphs:

- `fake_quantize(weight, fmt)` is `rtn_quantize(weight, fmt).dequantize()`, bit for bit, with a gradient:
  rounding (to an integer, or to the nearest NF4/FP4 table value) passes its gradient straight through
  (the straight-through estimator), while each group's scale still depends on the group's range.
- `train_scales(channels, loss_with, ...)` runs the optimisation, given a function that builds the loss of
  one calibration sample for a set of scales (pt2q.weight_only builds it from pt2q.blockwise.Block.forward).
  It measures the loss over every sample before (s = 1) and after training, and keeps the trained scales
  only when they lower it: TEQ is never worse than RTN on its calibration data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ops import padded_columns
from .rtn import CODE_TABLES, WeightFormat, _split, group_parameters

log = logging.getLogger(__name__)

# Scales are kept at or above this while training (a scale at 0 would divide the input by 0).
MIN_SCALE = 1e-5


class _StraightThrough(torch.autograd.Function):
    """Forward: `snap(x)` (a rounding, no gradient of its own); backward: the gradient reaches `x` unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, snap: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return snap(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _nearest_table_value(table: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def snap(x: torch.Tensor) -> torch.Tensor:
        return table[(x.unsqueeze(-1) - table).abs().argmin(-1)]
    return snap


def fake_quantize(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """The float32 weight `[out, in]` that `rtn_quantize(weight, fmt).dequantize()` gives (equal bit for bit),
    differentiable in `weight`: the grid's scale (and asymmetric range) follows each group's values, and
    the rounding onto the grid passes gradients straight through."""
    values = weight.to(torch.float32)
    values = values if fmt.group_dim == 1 else values.t()
    rows, cols = values.shape
    padded = padded_columns(cols, fmt.group_size)
    if padded != cols:
        values = torch.nn.functional.pad(values, (0, padded - cols))
    groups = _split(values, fmt, cols)                                   # [rows, groups, width]
    scale, zero_point = group_parameters(groups, fmt, 1.0)
    scale = scale.unsqueeze(-1)
    if fmt.dtype != "int":
        table = torch.tensor(CODE_TABLES[fmt.dtype], dtype=torch.float32)
        result = _StraightThrough.apply(groups / scale, _nearest_table_value(table)) * scale
    else:
        level = _StraightThrough.apply(groups / scale, torch.round)
        if zero_point is None:
            half = 1 << (fmt.bits - 1)
            result = level.clamp(-half, half - 1) * scale
        else:
            zero = zero_point.unsqueeze(-1).to(torch.float32)
            result = ((level + zero).clamp(0, (1 << fmt.bits) - 1) - zero) * scale
    result = result.reshape(rows, -1)[:, :cols]
    return result if fmt.group_dim == 1 else result.t()


@dataclass
class TrainedScales:
    """What `train_scales` found. `scales`: one tensor per group, all ones when training did not help.
    `rtn_loss` / `trained_loss`: the mean loss over every sample with s = 1 and with the trained scales."""

    scales: list[torch.Tensor]
    rtn_loss: float
    trained_loss: float
    kept: bool
    steps: int


def sample_order(samples: int, steps: int, seed: int) -> list[int]:
    """The sample each step trains on: shuffled passes over all samples (a fixed `seed`, a fixed order)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(samples, generator=generator).tolist())
    return order[:steps]


def _mean_loss(loss_with, scales: list[torch.Tensor], samples: int) -> float:
    with torch.no_grad():
        loss_of = loss_with(scales)
        return sum(float(loss_of(sample)) for sample in range(samples)) / samples


def train_scales(channels: list[int], loss_with: Callable[[list[torch.Tensor]], Callable[[int], torch.Tensor]],
                 samples: int, *, steps: int, lr: float, seed: int = 0, progress: bool = True,
                 desc: str = "pt2q teq") -> TrainedScales:
    """Train one scale vector per entry of `channels` (its length), starting from ones, with Adam.

    `loss_with(scales)` returns `loss_of(sample) -> scalar tensor`, the loss of calibration sample `sample`
    with those (positive) scales: building it once per set of scales lets the caller fake-quantize the
    weights once per step rather than once per sample. Each step trains on one sample (`sample_order`).
    A progress bar shows the loss (averaged over the last steps)."""
    parameters = [torch.ones(count, dtype=torch.float32, requires_grad=True) for count in channels]

    def positive(tensors):
        return [t.clamp(min=MIN_SCALE) for t in tensors]

    rtn_loss = _mean_loss(loss_with, positive(parameters), samples)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    recent: list[float] = []
    bar = tqdm(sample_order(samples, steps, seed), desc=desc, unit="step", leave=False, disable=not progress)
    try:
        with torch.enable_grad():
            for sample in bar:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_with(positive(parameters))(sample)
                loss.backward()
                optimizer.step()
                recent = (recent + [loss.item()])[-16:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}")
    finally:
        bar.close()
    trained = [t.detach() for t in positive(parameters)]
    trained_loss = _mean_loss(loss_with, trained, samples)
    kept = trained_loss < rtn_loss
    if not kept:
        trained = [torch.ones(count, dtype=torch.float32) for count in channels]
    return TrainedScales(trained, rtn_loss, trained_loss, kept, steps)

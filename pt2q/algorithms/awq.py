"""AWQ (activation-aware weight quantization): per-channel scales searched on real inputs, then clipping.

For layers sharing one input `x` (q/k/v after a norm; gate/up), an input-channel scale `s` makes
`x W^T = (x / s) (W s)^T` exactly; quantizing `W s` instead of `W` protects the channels with large
activations. Facts (../shared/docs/field-notes.md):

- scale search: for r in {0, 0.05, ..., 0.95}, `s = mean|x|^r / mean_norm|W|^(1-r)` (mean_norm|W|: each
  weight's magnitude divided by its group's max, averaged over the output rows of all layers), normalised
  by `sqrt(max(s) * min(s))`; the s with the least output error `sum ||x W^T - (x/s) Q(W s)^T||^2` over the
  sampled rows wins. `s = 1` (plain round to nearest) is a candidate too, so the search never picks
  anything worse than RTN on its own data.
- clip search: per layer, output row and group, the range factor in `1 - i/100` (i < 10) with the least
  error of that group's share of the output, `||x_g (W_g - Q(W_g))^T||^2`.

The caller folds `1/s` into the producer of `x` (a norm's weight, the rows of a previous linear) and `s`
into the layers' input columns (pt2q.weight_only does it on the graph's constants).
"""
from __future__ import annotations

import torch

from .rtn import QuantizedWeight, WeightFormat, _split, grouped, rtn_quantize

SCALE_GRID = tuple(i / 20 for i in range(20))
CLIP_RATIOS = tuple(1 - i / 100 for i in range(10))


class InputStatistics:
    """AWQ's recorder: called with each batch of a group's input, it keeps the mean |x| per channel over
    every row (`mean`, for the scale search) and up to `max_rows` rows spread over the samples (`sample`,
    on which the scale and clip searches measure the output error)."""

    def __init__(self, samples: int, max_rows: int = 2048):
        self.per_call = max(1, max_rows // max(samples, 1))
        self.total, self.count, self.rows = None, 0, []

    def __call__(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        total = flat.abs().sum(0)
        self.total = total if self.total is None else self.total + total
        self.count += flat.shape[0]
        step = max(1, flat.shape[0] // self.per_call)
        self.rows.append(flat[::step][:self.per_call].clone())

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def _output_error(x: torch.Tensor, references: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    return float(sum((x @ w.t() - ref).pow(2).sum() for w, ref in zip(weights, references)))


def normalized_weight_mean(weights: list[torch.Tensor], fmt: WeightFormat) -> torch.Tensor:
    """Per input channel: |W| divided by its group's max |W|, averaged over every layer's output rows."""
    parts = []
    for weight in weights:
        values = grouped(weight, fmt)
        groups = _split(values, fmt, weight.shape[1]).abs()
        normalized = groups / groups.amax(-1, keepdim=True).clamp(min=1e-12)
        parts.append(normalized.reshape(weight.shape[0], -1)[:, :weight.shape[1]])
    return torch.cat(parts).mean(0)


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], fmt: WeightFormat,
                 grid: tuple[float, ...] = SCALE_GRID, x_mean: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, float | None, float, float]:
    """(scales, chosen r or None for s = 1, error with them, error of plain RTN) for sampled input rows
    `x` [rows, in] shared by `weights` ([out_i, in] each). `x_mean`: mean |x| per channel over all rows
    (default: over the sample)."""
    x = x.to(torch.float32)
    references = [x @ w.t() for w in weights]
    x_mean = x.abs().mean(0) if x_mean is None else x_mean.to(torch.float32)
    w_mean = normalized_weight_mean(weights, fmt)
    plain = _output_error(x, references, [rtn_quantize(w, fmt).dequantize() for w in weights])
    best = (torch.ones_like(x_mean), None, plain)
    for ratio in grid:
        scales = x_mean.pow(ratio).clamp(min=1e-4) / w_mean.pow(1 - ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        if not torch.isfinite(scales).all():
            continue
        candidates = [rtn_quantize(w * scales, fmt).dequantize() for w in weights]
        error = _output_error(x / scales, references, candidates)
        if error < best[2]:
            best = (scales, ratio, error)
    return best[0], best[1], best[2], plain


def search_clip(x: torch.Tensor, weight: torch.Tensor, fmt: WeightFormat,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per (output row, group): the range factor with the least error of the group's output share."""
    x = x.to(torch.float32)
    columns = weight.shape[1]
    x_groups = _split(grouped(x, fmt), fmt, columns)                          # [rows_x, groups, g]
    w_groups = _split(grouped(weight, fmt), fmt, columns)                     # [out, groups, g]
    best_error, best_ratio = None, None
    for ratio in ratios:
        quantized = rtn_quantize(weight, fmt, quantile=ratio).dequantize()
        q_groups = _split(grouped(quantized, fmt), fmt, columns)
        # error[o, g] = || x_g (w_og - q_og) ||^2 over the sampled rows
        diff = w_groups - q_groups
        error = torch.einsum("rgk,ogk->ogr", x_groups, diff).pow(2).sum(-1)
        if best_error is None:
            best_error, best_ratio = error, torch.full_like(error, ratio)
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, torch.full_like(error, ratio), best_ratio)
    return best_ratio


def awq_quantize(weight: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round to nearest with the searched per-(row, group) clip factors (None: no clipping)."""
    return rtn_quantize(weight, fmt, quantile=1.0 if clip is None else clip)

"""HQQ (half-quadratic quantization): per-group scales and zero points fitted to the weight alone, no data.

HQQ minimises, for each group of `group_size` weights `w` (the grouped orientation of pt2q.algorithms.rtn),
the sparsity-promoting reconstruction loss `sum |w - (q - z) * s|^p` (p = lp_norm < 1) over the zero point
`z` (and here the scale `s` too), with the codes `q = clamp(round(w / s + z), 0, 2**bits - 1)`. The loss is
not convex, so it is split with an auxiliary error variable `e` (half-quadratic splitting); every step:

1. codes and residual for the current parameters:  q = clamp(round(w / s + z)),  r = w - (q - z) * s;
2. `e` = the proximal step of |.|^p / beta at r, a generalised soft threshold (`shrink_lp`) that keeps the
   large errors (outliers) in `e` and sets the small ones to 0:  e = sign(r) * max(|r| - |r|^(p-1) / beta, 0);
3. the parameters that best fit `w - e` with the codes q, by least squares: with `fit_scale` (default) the
   affine fit `w - e ~ s * q - s * z` of both s and z; without, z alone, `mean(q - (w - e) / s)`, HQQ's
   published step (scale fixed at its start);
4. beta *= kappa.

Start: `s = (max - min) / (2**bits - 1)` and `z = -min / s` from the group's own range (not widened to
include 0). Every group keeps the parameters with the least squared error `sum r^2` among all it reached
(the start included). With `early_stop` a group stops at its first step that does not lower that error,
and the groups still moving are gathered into a smaller tensor each step (at 4 bits g32 on MiniLM 58% of
the groups still move at step 3, 7% at step 6), so the cost is a few passes over the layer, not `iters`;
without it all `iters` steps run on every group. `iters=0` is the start: asymmetric min/max round to
nearest with a float zero point. Every group of a layer is solved at once; a short last group (zero padded
in the packed form) is solved on its real columns only.

Measured on real all-MiniLM-L6-v2 (its 37 linear weights, `tools/bench_hqq.py`), relative squared error
`sum (w - w')^2 / sum w^2`:

                         W3 g32    W4 g32    W3 g64    W4 g64
  RTN asym (uint8 zero)  0.03166   0.00690   0.04144   0.00904
  RTN asym, mse_clip     0.02743   0.00644   0.03388   0.00831
  hqq 0.2.8 (axis=1)     0.02656   0.00579   0.03708   0.00807
  HQQ, fit_scale=False   0.02656   0.00579   0.03708   0.00807
  HQQ (float zero)       0.02394   0.00554   0.03152   0.00766
  HQQ, zero rounded      0.02818   0.00652   0.03457   0.00848   (uint8 zero, scale re-fitted to it)

Solving all 37 weights (10.8 M values; 1 thread on a shared 2-core machine, best of 3): HQQ 0.49 / 0.43 /
0.65 / 0.56 s in the four formats above, the hqq package 1.54 / 1.46 / 2.06 / 2.16 s, RTN under 0.2 s.

- Selection by squared error, not by the lp loss: keeping each group's lowest `sum |r|^0.7` instead gave
  0.02784 / 0.00606 (W3 / W4 g32, fit_scale=False), worse in squared and in absolute error.
- On these weights (|r| ~ 6e-3) at the default beta=10 the threshold |r|^(p-1) / beta ~ 0.45 is far above
  every residual, so e = 0 and each step is the plain least-squares fit (the hqq package behaves the same:
  fit_scale=False reproduces its results). The lp term acts once beta^(-1/(2-p)) falls below the residuals
  (beta of 1e3..1e5 for weights of this size); the step skips the shrink when it provably is 0.

Why the zero point stays a float (float32 in the graph; pt2q.ops.dequantize_weight computes
`(code - zero) * scale` in float32): rounding it to an integer in [0, 2**bits - 1] and re-fitting the
scale to it ("zero rounded" above: 20 rounds of least-squares scale and re-rounded codes, each group
keeping its best) gave 18% more squared error at W3 / W4 g32 and 10% at g64: worse than RTN with
mse_clip in all four, and at g32 worse than HQQ with the scale fixed. A float zero also has no range limit (a
group of all-positive weights has z < 0, which a uint8 zero cannot hold). It costs 3 bytes per group
more than a uint8 zero (0.75 bit per weight at g32, 0.375 at g64).

The graph's weight is `hqq_quantize(...).dequantize()` bit for bit (the same op computes both); the
solver's residuals are that reconstruction's up to float32 rounding (a fused multiply-add).
"""
from __future__ import annotations

import torch

from .rtn import QuantizedWeight, WeightFormat, _split, grouped

__all__ = ["hqq_parameters", "hqq_quantize", "shrink_is_zero_below", "shrink_lp"]

# A fitted scale is used only when the group's codes vary (sum (q - mean q)^2 of integer codes is >= 1 - 1/n
# when they do) and the fit is a positive step.
_MIN_CODE_SPREAD = 0.25


def shrink_lp(residual: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The proximal operator of |x|^p / beta, elementwise: `sign(x) * max(|x| - |x|^(p-1) / beta, 0)`.
    At x = 0 the threshold is infinite and the result 0 (no NaN)."""
    magnitude = residual.abs()
    threshold = magnitude.pow(lp_norm - 1).div_(beta)
    return magnitude.sub_(threshold).clamp_min_(0).copysign_(residual)


def shrink_is_zero_below(beta: float, lp_norm: float) -> float:
    """The magnitude up to which `shrink_lp` returns 0: |x| <= |x|^(p-1) / beta  <=>  |x| <= beta^(-1/(2-p))."""
    return beta ** (-1.0 / (2.0 - lp_norm))


def _initial_parameters(groups: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group from its min and max: `(max - min) / (2**b - 1)` and `-min / scale`. A constant
    group (or a range at the float32 underflow limit) gets scale 1, which represents a constant exactly."""
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / ((1 << fmt.bits) - 1)
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    return scale, -low / scale


def hqq_parameters(groups: torch.Tensor, fmt: WeightFormat, *, iters: int = 20, lp_norm: float = 0.7,
                   beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True,
                   fit_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), float32 of shape `groups.shape[:-1]`, for the groups `[..., group]` (every entry counts;
    see the module docstring)."""
    top = (1 << fmt.bits) - 1
    width = groups.shape[-1]
    values = groups.reshape(-1, width)
    scale, zero = _initial_parameters(values, fmt)
    best_error = torch.full_like(zero, torch.inf)
    best_scale, best_zero = scale.clone(), zero.clone()
    sum_w = values.sum(-1)
    # The working set: the groups still moving (all of them until one stops), their rows in `values`.
    index = None
    work, work_sum_w = values, sum_w
    for iteration in range(iters + 1):
        step, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        codes = torch.div(work, step).add_(z).round_().clamp_(0, top)
        residual = torch.addcmul(work, codes - z, step, value=-1)   # w - (q - z) * s
        error = torch.linalg.vecdot(residual, residual)
        previous = best_error if index is None else best_error[index]
        better = error < previous
        where = better.nonzero().squeeze(-1) if index is None else index[better]
        best_error[where], best_scale[where], best_zero[where] = error[better], scale[better], zero[better]
        if iteration == iters or (early_stop and not bool(better.any())):
            break
        # e: the outlier part of the residual. It is exactly 0 when no residual exceeds the threshold's fixed
        # point, and then w - e is w itself (its sums are known).
        low, high = torch.aminmax(residual)
        if max(-low.item(), high.item()) <= shrink_is_zero_below(beta, lp_norm):
            target, sum_target = work, work_sum_w
        else:
            target = work - shrink_lp(residual, beta, lp_norm)
            sum_target = target.sum(-1)
        sum_q = codes.sum(-1)
        if fit_scale:
            spread = torch.linalg.vecdot(codes, codes) - sum_q * sum_q / width
            covariance = torch.linalg.vecdot(codes, target) - sum_q * sum_target / width
            fitted = covariance / spread
            usable = (spread > _MIN_CODE_SPREAD) & (fitted > torch.finfo(torch.float32).tiny)
            scale = torch.where(usable, fitted, scale)
        zero = (sum_q - sum_target / scale) / width
        beta *= kappa
        if early_stop and not bool(better.all()):  # carry on with the groups that improved
            keep = better.nonzero().squeeze(-1)
            index = keep if index is None else index[keep]
            work, work_sum_w = values[index], sum_w[index]
            scale, zero = scale[keep], zero[keep]
    shape = groups.shape[:-1]
    return best_scale.reshape(shape), best_zero.reshape(shape)


def hqq_quantize(weight: torch.Tensor, fmt: WeightFormat, *, iters: int = 20, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True,
                 fit_scale: bool = True) -> QuantizedWeight:
    """HQQ quantization of a weight `[out, in]` or `[out, in, *kernel]`: unsigned integer codes, float32
    scales and float32 zero points per group (see the module docstring). `fmt` must be asymmetric int."""
    if fmt.dtype != "int" or fmt.sym:
        raise ValueError(f"hqq_quantize fits a zero point per group: it needs an asymmetric integer format, got "
                         f"dtype={fmt.dtype!r}, sym={fmt.sym}")
    options = dict(iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa, early_stop=early_stop, fit_scale=fit_scale)
    values = grouped(weight, fmt)
    rows, padded = values.shape
    cols = fmt.grouped_shape(weight.shape)[1]
    groups = _split(values, fmt, cols)
    count, width = groups.shape[1:]
    whole = cols // width  # groups without padding; a short last group is solved on its real columns
    parts = [hqq_parameters(groups[:, :whole], fmt, **options)] if whole else []
    if whole < count:
        parts.append(hqq_parameters(values[:, whole * width:cols].unsqueeze(1), fmt, **options))
    scale = torch.cat([part[0] for part in parts], dim=1)
    zero = torch.cat([part[1] for part in parts], dim=1)
    top = (1 << fmt.bits) - 1
    codes = torch.div(groups, scale.unsqueeze(-1)).add_(zero.unsqueeze(-1)).round_().clamp_(0, top).reshape(rows, -1)
    if codes.shape[1] < padded:  # packing padding past the last whole group: the code nearest to value 0
        fill = torch.round(zero[:, -1:]).clamp_(0, top).expand(rows, padded - codes.shape[1])
        codes = torch.cat([codes, fill], dim=1)
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scale.contiguous(), zero.contiguous(), fmt,
                           tuple(weight.shape))

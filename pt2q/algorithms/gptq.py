"""GPTQ: quantize a weight column by column, folding each column's rounding error into the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., "GPTQ", 2022).

The layer's output error for inputs X is `||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) * n / 2` with
`H = (2/n) sum x x^T` (`hessian_update` accumulates it). Quantizing column i to `q_i` and updating the later
columns by `-(w_i - q_i) / Hinv[i, i] * Hinv[i, i:]`, where `Hinv` is the upper Cholesky factor of `H^-1`,
is the optimal correction of the remaining columns (OBQ). Columns go in blocks of `block_size`: inside a block
the update is applied column by column to the block only, and the block's errors reach the later columns in
one matmul when the block is done (lazy batch updates), which is the same arithmetic in another order.

The integer arithmetic (group parameters, codes, dequantized values) is pt2q.algorithms.rtn's, so the codes
this returns dequantize in the graph op (pt2q.ops) to exactly the values whose error GPTQ propagated.
"""
from __future__ import annotations

import logging

import torch

from ..errors import CalibrationError
from .rtn import (QuantizedWeight, WeightFormat, _split, dequantize_values, group_parameters, grouped,
                  mse_group_parameters, quantize_values)

__all__ = ["HessianRecorder", "gptq_quantize", "hessian_update", "symmetric_hessian"]

log = logging.getLogger(__name__)

# Damping tried after `percdamp` fails: multiplied by this factor, this many times.
_DAMP_GROWTH = 10.0
_DAMP_RETRIES = 4


# hessian_update(lower=True) multiplies in bands of this many rows, each up to its diagonal block.
_LOWER_BAND = 128


@torch.no_grad()
def hessian_update(h: torch.Tensor | None, n: int, x: torch.Tensor, *, lower: bool = False
                   ) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs `x [..., in]` into the running Hessian `h = (2/n) sum x x^T`.

    `h` is `None` (or anything with `n == 0`) before the first batch; `n` counts the rows folded so far.
    Returns `(h, n)`. The sum is kept as a running mean (`h * n/(n+m) + (2/(n+m)) x^T x`), so its magnitude
    does not grow with the number of rows. `h` is float32 and is updated in place when it already is one.

    `lower=True` computes only the bands of `_LOWER_BAND` rows up to their diagonal block (the lower
    triangle, and the diagonal blocks whole): about half the multiply-adds of a wide layer, each entry
    computed as in the full product. The blocks above the diagonal are then stale until
    `symmetric_hessian(h)` mirrors the lower triangle onto them (GPTQ's Cholesky reads the lower one).
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    rows, width = x.shape
    if h is None or n == 0:
        h = torch.zeros(width, width, dtype=torch.float32, device=x.device)
        n = 0
    elif h.dtype != torch.float32:
        h = h.to(torch.float32)
    if h.shape != (width, width):
        raise ValueError(f"hessian_update: inputs have {width} features but the Hessian is {tuple(h.shape)}")
    if rows == 0:
        return h, n
    x = x.to(h.device)
    total = n + rows
    h.mul_(n / total)
    if not lower or width <= _LOWER_BAND:
        h.addmm_(x.t(), x, alpha=2.0 / total)
    else:
        for start in range(0, width, _LOWER_BAND):
            stop = min(start + _LOWER_BAND, width)
            h[start:stop, :stop].addmm_(x[:, start:stop].t(), x[:, :stop], alpha=2.0 / total)
    return h, total


class HessianRecorder:
    """GPTQ's recorder: called with each batch of one layer's inputs, it accumulates their Hessian (the
    lower triangle, `hessian_update(lower=True)`). `hessian()` mirrors it once and returns it with the
    number of rows seen. Layers reading the same tensor (q/k/v) share one recorder."""

    def __init__(self):
        self.h: torch.Tensor | None = None
        self.rows = 0
        self._mirrored = False

    def __call__(self, x: torch.Tensor) -> None:
        self.h, self.rows = hessian_update(self.h, self.rows, x, lower=True)
        self._mirrored = False

    def hessian(self) -> tuple[torch.Tensor | None, int]:
        if self.rows and not self._mirrored:
            symmetric_hessian(self.h)
            self._mirrored = True
        return self.h, self.rows


def symmetric_hessian(h: torch.Tensor) -> torch.Tensor:
    """`h` with its strictly upper triangle replaced by the transpose of its lower one (in place), for a
    Hessian accumulated with `hessian_update(..., lower=True)`."""
    upper = torch.ones(h.shape, dtype=torch.bool, device=h.device).triu_(1)
    return h.copy_(torch.where(upper, h.t(), h))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(h + damp I)^-1`, damping more (and logging it) while that fails."""
    base = damp
    for attempt in range(_DAMP_RETRIES + 1):
        damped = h.clone()
        damped.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            # A non-finite entry of H^-1 reaches the diagonal of its factor: checking that is enough.
            if info.item() == 0 and torch.isfinite(upper.diagonal()).all():
                return upper
        if attempt == _DAMP_RETRIES:
            break
        grown = damp * _DAMP_GROWTH if damp > 0 else 0.01 * float(h.diagonal().mean())
        log.warning("gptq: the Hessian is not positive definite with damping %.3g; retrying with %.3g",
                    damp, grown)
        damp = grown
    raise CalibrationError(
        f"gptq: the Hessian ({h.shape[0]}x{h.shape[0]}) is not positive definite even with damping {damp:.3g} "
        f"({_DAMP_RETRIES} retries from {base:.3g}); calibrate with more (or more varied) samples, or raise "
        f"percdamp")


@torch.no_grad()
def _gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, block_size: int, percdamp: float,
          act_order: bool, static_groups: bool, mse_clip: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """gptq_quantize, also returning the float32 values `[out, in]` GPTQ quantized to (for the tests)."""
    if fmt.group_dim != 1:
        raise ValueError(f"gptq: group_dim={fmt.group_dim} is not supported; GPTQ walks the input columns, "
                         f"use group_dim=1")
    if weight.dim() != 2:
        raise ValueError(f"gptq: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"gptq: the Hessian is {tuple(hessian.shape)}, expected ({cols}, {cols}) for a weight "
                         f"of shape {tuple(weight.shape)}")
    if block_size < 1:
        raise ValueError(f"gptq: block_size must be >= 1, got {block_size}")
    h_in = hessian.detach().to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(h_in).all():
        raise CalibrationError("gptq: the Hessian has non-finite entries (inf/NaN in the calibration inputs?)")

    values = grouped(weight, fmt)                       # [rows, padded_cols]; padding columns are 0
    _, groups, width = _split(values, fmt, cols).shape  # the groups covering the real columns
    size = groups * width                               # GPTQ's columns: those groups, padding included
    w = values[:, :size].clone()

    # The Hessian padded like the weight: padding columns are dead inputs (weight 0, diagonal set to 1).
    h = torch.zeros(size, size, dtype=torch.float32, device=w.device)
    h[:cols, :cols] = h_in
    diag = h.diagonal()
    dead = diag == 0
    live = diag[:cols][~dead[:cols]]
    # Damping relative to the real, live inputs only, so that padding does not change it.
    damp = percdamp * (float(live.mean()) if live.numel() else 1.0)
    w[:, dead] = 0
    h[dead, dead] = 1

    def find_parameters(group_values: torch.Tensor, fmt: WeightFormat):
        if mse_clip:
            return mse_group_parameters(group_values, fmt)
        return group_parameters(group_values, fmt, 1.0)

    static = static_groups or act_order
    if static:                                          # params of consecutive ORIGINAL columns, from W
        scale, zero_point = find_parameters(w.reshape(rows, groups, width), fmt)
    else:
        scale = torch.ones(rows, groups, dtype=torch.float32, device=w.device)
        zero_point = None if fmt.sym or fmt.dtype != "int" else torch.zeros(rows, groups, dtype=torch.uint8,
                                                                              device=w.device)

    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    # Per processed column, the row of its group's parameters ([size, rows], contiguous per column).
    group_of = torch.arange(size, device=w.device) // width
    if perm is not None:
        group_of = group_of[perm]
    if static:
        col_scale = scale.t()[group_of].contiguous()
        col_zero = None if zero_point is None else zero_point.t()[group_of].contiguous()

    hinv = _inverse_cholesky(h, damp)
    del h

    # Column-major from here on ([size, rows]): each step reads and updates whole contiguous columns.
    wt = w.t().contiguous()
    del w
    # Integer formats: each column's integer levels are computed in float (exact for these small integers)
    # into `levels`, and its dequantized values straight from them, `(level - zero) * scale`, which is
    # rtn.dequantize_values' arithmetic on the same numbers; the codes are taken from `levels` per block.
    # Code tables (nf4 / fp4) use rtn's quantize / dequantize functions column by column.
    lean = fmt.dtype == "int"
    half, top = 1 << (fmt.bits - 1), (1 << fmt.bits) - 1
    if lean:
        levels = torch.empty(size, rows, dtype=torch.float32, device=wt.device)
        codes = torch.empty(size, rows, dtype=torch.uint8, device=wt.device)
    else:
        codes = torch.empty(size, rows, dtype=torch.int64, device=wt.device)
    used = torch.empty(size, rows, dtype=torch.float32, device=wt.device)
    if static and col_zero is not None:
        col_zero_f = col_zero.to(torch.float32)
    s = z = zf = None
    for start in range(0, size, block_size):
        stop = min(start + block_size, size)
        count = stop - start
        block = wt[start:stop].clone()
        errors = torch.empty(count, rows, dtype=torch.float32, device=wt.device)
        hblock = hinv[start:stop, start:stop]
        diag = hblock.diagonal().tolist()
        for i in range(count):
            col = start + i
            if static:
                s = col_scale[col]
                if col_zero is not None:
                    z, zf = col_zero[col], col_zero_f[col]
            elif col % width == 0:
                # The group's current values: updated in this block, and beyond the block the values after
                # the previous blocks' propagation minus this block's pending updates (Hinv^T @ Err).
                end = col + width
                current = block[i:i + width]
                if end > stop:
                    later = wt[stop:end] - hinv[start:col, stop:end].t() @ errors[:i]
                    current = torch.cat([current, later])
                s, z = find_parameters(current.t(), fmt)
                zf = None if z is None else z.to(torch.float32)
                scale[:, col // width] = s
                if z is not None:
                    zero_point[:, col // width] = z
            column = block[i]
            if lean:
                level = torch.div(column, s, out=levels[col]).round_()
                if z is None:
                    q = torch.mul(level.clamp_(-half, half - 1), s, out=used[col])
                else:
                    q = torch.sub(level.add_(zf).clamp_(0, top), zf, out=used[col]).mul_(s)
            else:
                code = quantize_values(column, s, z, fmt)
                q = dequantize_values(code, s, z, fmt)
                codes[col] = code
                used[col] = q
            err = torch.sub(column, q, out=errors[i]).div_(diag[i])
            block[i:].addr_(hblock[i, i:], err, alpha=-1)
        if lean:  # the block's codes: levels + 2**(b-1) (symmetric) or the levels themselves (zero point)
            chunk = levels[start:stop]
            codes[start:stop] = chunk.add_(half) if zero_point is None else chunk
        if stop < size:
            wt[stop:].addmm_(hinv[start:stop, stop:].t(), errors, alpha=-1)

    codes, used = codes.t(), used.t()
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, used = codes[:, inverse], used[:, inverse]
    extra = values.shape[1] - size
    if extra:  # packing padding past the last whole group: the code of 0 under the last group's params
        zero = torch.zeros(rows, extra, dtype=torch.float32, device=codes.device)
        fill = quantize_values(zero, scale[:, -1:], None if zero_point is None else zero_point[:, -1:], fmt)
        codes = torch.cat([codes, fill], dim=1)
    result = QuantizedWeight(codes.contiguous(), scale.contiguous(),
                             None if zero_point is None else zero_point.contiguous(), fmt, (rows, cols))
    return result, used[:, :cols].contiguous()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  mse_clip: bool = False) -> QuantizedWeight:
    """GPTQ quantization of a 2-D weight `[out, in]` given its inputs' Hessian `[in, in]` (`hessian_update`).

    - Dead inputs (`diag H == 0`) get weight 0 and diagonal 1. `percdamp * mean(diag H)` (mean over the live
      inputs) is added to the diagonal; if `H` is still not positive definite the damping is raised x10, up
      to 4 times (logged), then `CalibrationError` is raised.
    - Groups (`fmt.group_size` consecutive input columns, `-1`: the whole row) get their (scale, zero point)
      from rtn.group_parameters. By default a group's parameters are computed when GPTQ reaches its first
      column, from the group's current, error-updated values. `static_groups=True` computes them all from the
      original weight first.
    - `act_order=True` quantizes the columns in order of descending `diag H` (the most active inputs first).
      The graph's dequantize op has no per-column group index, so groups stay runs of consecutive ORIGINAL
      columns, and their parameters must be fixed before the permuted walk: act_order implies static_groups.
    - `mse_clip=True`: each group's parameters use the range factor with the least squared error of the
      group's values (rtn.mse_group_parameters) instead of the full range.
    - Only `group_dim == 1` (groups along the input dimension) is supported; anything else is a ValueError.

    Returns codes, scale and zero point in rtn_quantize's layout, such that `.dequantize()` is exactly the
    weight whose errors GPTQ propagated.
    """
    return _gptq(weight, hessian, fmt, block_size, percdamp, act_order, static_groups, mse_clip)[0]

"""AutoRound (SignRound): per transformer block, learn how each weight rounds and how far each group's range
reaches, by signed gradient descent on the block's output error.

For a weight in groups `g` (pt2q.algorithms.rtn's grouped orientation), the trained quantities are:

- `value` V, one per weight element in [-0.5, 0.5]: the code is `round(g / scale + V)` instead of
  `round(g / scale)`, so each element may round the other way;
- `min_scale`, `max_scale`, one each per group in [0, 1] (with `enable_minmax_tuning`): the group's
  minimum and maximum (each widened to include 0) are multiplied by them before the scale and zero point
  are computed with RTN's formulas, which clips the range.

`round` passes its gradient straight through (the straight-through estimator). The loss is the mean
squared error between the block's outputs with these fake-quantized weights and the float block's
outputs. With V = 0 and both factors 1 everything is round to nearest, bit for bit: `iters=0` is RTN.

The optimizer is signed SGD by default (`p -= lr * sign(grad)`, the learning rate decaying linearly to 0
over `iters`), or Adam / AdamW. The iterate with the lowest loss is kept (measured before its update),
unless `not_use_mse`. This module knows nothing about graphs: `tune` is given a loss function of the
fake-quantized weights (pt2q.weight_only builds it from pt2q.blockwise.Block.forward).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .rtn import QuantizedWeight, WeightFormat, _split, assemble, grouped

OPTIMIZERS = ("sign_sgd", "adam", "adamw")
SAMPLERS = ("rand", "fix")


class SampleStore:
    """Per-sample values (each a tuple of tensors) kept in memory, or with `on_disk` in a temporary
    directory and memory-mapped back when read (AutoRound's `low_mem`: what it caches besides the block
    runner's own inputs then costs disk, not RAM)."""

    def __init__(self, on_disk: bool = False):
        import tempfile

        self._directory = tempfile.TemporaryDirectory(prefix="pt2q-autoround-") if on_disk else None
        self._values: list = []

    def append(self, values: tuple) -> None:
        if self._directory is None:
            self._values.append(values)
            return
        path = f"{self._directory.name}/{len(self._values)}.pt"
        torch.save(list(values), path)
        self._values.append(path)

    def __getitem__(self, index: int) -> tuple:
        value = self._values[index]
        if self._directory is None:
            return value
        return tuple(torch.load(value, mmap=True, weights_only=True))

    def __len__(self) -> int:
        return len(self._values)

    def close(self) -> None:
        self._values = []
        if self._directory is not None:
            self._directory.cleanup()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class _FakeQuantize(torch.autograd.Function):
    """`(clamp(round(g / scale + value) + zero, low, high) - zero) * scale` with the straight-through
    round, in one function: the same values and gradients as composing torch ops with `round_ste`, but
    its backward is a few passes over the weight instead of autograd's chain of weight-sized temporaries
    (about half the cost of the fake quantization in a training step). `zero` is None for symmetric codes.

    Gradients: d/d value = dout * scale * inside (inside: the unclamped positions); d/d scale = sum over
    the group of dout * level - (dout * scale * inside) * g / scale**2; d/d zero = -sum dout * scale * outside.
    """

    @staticmethod
    def forward(ctx, groups, value, scale, zero, low: float, high: float):
        codes = torch.round(groups / scale + value)
        if zero is not None:
            codes = codes.add_(zero)
        inside = (codes >= low) & (codes <= high)
        level = codes.clamp_(low, high)
        if zero is not None:
            level = level.sub_(zero)
        ctx.save_for_backward(groups, scale, level, inside)
        ctx.has_zero = zero is not None
        return level * scale

    @staticmethod
    def backward(ctx, grad):
        groups, scale, level, inside = ctx.saved_tensors
        grad_level = grad * scale
        grad_value = grad_level * inside
        grad_scale = (grad * level).sum(-1, keepdim=True) - (grad_value * groups).sum(-1, keepdim=True) / scale.square()
        grad_zero = None
        if ctx.has_zero:
            grad_zero = -(grad_level - grad_value).sum(-1, keepdim=True)
        return None, grad_value, grad_scale, grad_zero, None, None


class RoundingParameters:
    """The trainable rounding of one weight `[out, in]` (or a conv's) in format `fmt` (integer codes)."""

    def __init__(self, weight: torch.Tensor, fmt: WeightFormat, minmax: bool = True):
        if fmt.dtype != "int":
            raise ValueError(f"AutoRound quantizes to integer codes, not the {fmt.dtype!r} table")
        self.fmt, self.shape = fmt, tuple(weight.shape)
        values = grouped(weight, fmt)
        self.padded_cols = values.shape[1]
        self.groups = _split(values, fmt, fmt.grouped_shape(weight.shape)[1])          # [rows, groups, g]
        self.low = self.groups.amin(-1).clamp(max=0)
        self.high = self.groups.amax(-1).clamp(min=0)
        self.value = torch.zeros_like(self.groups, requires_grad=True)
        shape = self.groups.shape[:-1]
        self.min_scale = torch.ones(shape, requires_grad=minmax)
        self.max_scale = torch.ones(shape, requires_grad=minmax)

    @property
    def rounding(self) -> list[torch.Tensor]:
        return [self.value]

    @property
    def ranges(self) -> list[torch.Tensor]:
        return [self.min_scale, self.max_scale] if self.min_scale.requires_grad else []

    def clamp_(self) -> None:
        with torch.no_grad():
            self.value.clamp_(-0.5, 0.5)
            self.min_scale.clamp_(0.0, 1.0)
            self.max_scale.clamp_(0.0, 1.0)

    def _parameters(self):
        """(scale [rows, groups], zero_point [rows, groups] float or None): RTN's formulas (see
        rtn.group_parameters) on the range scaled by the trained factors."""
        fmt = self.fmt
        low, high = self.low * self.min_scale, self.high * self.max_scale
        if fmt.sym:
            if fmt.full_range:
                extreme = torch.where(-low >= high, low, high)
                scale = -extreme / (1 << (fmt.bits - 1))
                return torch.where(extreme != 0, scale, torch.ones_like(scale)), None
            amax = torch.maximum(-low, high)
            scale = amax / ((1 << (fmt.bits - 1)) - 1)
            return torch.where(amax > 0, scale, torch.ones_like(scale)), None
        scale = (high - low) / ((1 << fmt.bits) - 1)
        scale = torch.where(high > low, scale, torch.ones_like(scale))
        zero_point = round_ste(-low / scale).clamp(0, (1 << fmt.bits) - 1)
        return scale, zero_point

    def _levels(self, scale, zero_point) -> torch.Tensor:
        """Integer levels (float tensor) `[rows, groups, g]`, centred (code - zero point)."""
        fmt = self.fmt
        level = round_ste(self.groups / scale.unsqueeze(-1) + self.value)
        if zero_point is None:
            half = 1 << (fmt.bits - 1)
            return level.clamp(-half, half - 1)
        zero = zero_point.unsqueeze(-1)
        return (level + zero).clamp(0, (1 << fmt.bits) - 1) - zero

    def _code_range(self) -> tuple[float, float]:
        if self.fmt.sym:
            half = 1 << (self.fmt.bits - 1)
            return -half, half - 1
        return 0, (1 << self.fmt.bits) - 1

    def fake_quantized(self) -> torch.Tensor:
        """The dequantized weight in its float shape, differentiable in the trained quantities."""
        scale, zero_point = self._parameters()
        zero = None if zero_point is None else zero_point.unsqueeze(-1)
        values = _FakeQuantize.apply(self.groups, self.value, scale.unsqueeze(-1), zero, *self._code_range())
        values = values.reshape(self.groups.shape[0], -1)
        rows, cols = self.fmt.grouped_shape(self.shape)
        values = values[:, :cols]
        return values.reshape(self.shape) if self.fmt.group_dim == 1 else values.t()

    def quantized(self) -> QuantizedWeight:
        """The codes and group parameters of the current state (what the graph stores)."""
        with torch.no_grad():
            scale, zero_point = self._parameters()
            levels = self._levels(scale, zero_point)
            if zero_point is None:
                codes = levels + (1 << (self.fmt.bits - 1))
            else:
                codes = levels + zero_point.unsqueeze(-1)
                zero_point = zero_point.to(torch.uint8)
            return assemble(codes.to(torch.int64), scale.detach().clone(), zero_point, self.fmt, self.shape,
                            self.padded_cols)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().clone() for t in (self.value, self.min_scale, self.max_scale))

    def load_state(self, state: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            for tensor, saved in zip((self.value, self.min_scale, self.max_scale), state):
                tensor.copy_(saved)


@dataclass
class TuneSettings:
    """What `tune` needs from an AutoRoundConfig (see its docstring for each field)."""

    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    sampler: str = "rand"
    seed: int = 42
    not_use_mse: bool = False
    dynamic_max_gap: int = -1
    optimizer: str = "sign_sgd"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def range_learning_rate(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.learning_rate


@dataclass
class TuneResult:
    """A block's losses: over every sample before training (round to nearest) and with the weights kept
    (`final_loss`); over the step's samples, the best seen and the last; the iterations run."""

    initial_loss: float
    final_loss: float | None
    best_loss: float
    last_loss: float
    best_iteration: int
    iterations: int
    seconds: float
    losses: list[float]


class _SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the rule is in the class docstring
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def _optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if name == "sign_sgd":
        return _SignSGD(groups, lr=groups[0]["lr"])
    if name == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.AdamW(groups)


class Sampler:
    """The samples of each step: `batch_size` of them. "rand": epochs of a random permutation (from the
    seed) taken `batch_size` at a time, so every sample is seen once per epoch; a step never holds one
    sample twice (an epoch's leftover is topped up from the next permutation). "fix": the samples in
    order, `batch_size` at a time, wrapping around."""

    def __init__(self, settings: TuneSettings, samples: int):
        self.settings, self.samples = settings, samples
        self.size = min(settings.batch_size, samples)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.queue: list[int] = []
        self.step = 0

    def next(self) -> list[int]:
        if self.settings.sampler == "fix":
            start = (self.step * self.size) % self.samples
            self.step += 1
            return [(start + i) % self.samples for i in range(self.size)]
        batch = self.queue[:self.size]
        self.queue = self.queue[self.size:]
        while len(batch) < self.size:
            epoch = torch.randperm(self.samples, generator=self.generator).tolist()
            missing = self.size - len(batch)
            top_up = [i for i in epoch if i not in batch][:missing]
            batch += top_up
            self.queue = [i for i in epoch if i not in top_up]
        return batch


def tune(parameters: dict[str, RoundingParameters], loss_of: Callable[[list[int], dict[str, torch.Tensor]], torch.Tensor],
         samples: int, settings: TuneSettings, *, progress: bool = True, desc: str = "autoround",
         measure_final: bool = True) -> TuneResult:
    """Train `parameters` to minimise `loss_of(sample indices, {name: fake-quantized weight})`, the mean
    block output error over those samples; leaves them at the best iterate (see the module docstring).
    The loss over every sample is measured before training and, with `measure_final`, after it (False:
    `final_loss` is None, for a caller that measures it on a run it makes anyway)."""
    start = time.perf_counter()
    layers = list(parameters.values())
    sampler = Sampler(settings, samples)

    def evaluate(indices: list[int]) -> torch.Tensor:
        return loss_of(indices, {name: p.fake_quantized() for name, p in parameters.items()})

    def full_loss() -> float:
        """The loss over every sample (in chunks of batch_size)."""
        with torch.no_grad():
            chunks = [list(range(i, min(i + settings.batch_size, samples))) for i in range(0, samples, settings.batch_size)]
            return sum(float(evaluate(chunk)) * len(chunk) for chunk in chunks) / samples

    initial = full_loss()
    if settings.iters == 0:
        return TuneResult(initial, initial if measure_final else None, initial, initial, -1, 0,
                          time.perf_counter() - start, [])
    optimizer = _optimizer(settings.optimizer, [
        {"params": [t for p in layers for t in p.rounding], "lr": settings.learning_rate},
        {"params": [t for p in layers for t in p.ranges], "lr": settings.range_learning_rate}])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.iters)
    best_loss, best_iteration, best_state = math.inf, -1, None
    losses: list[float] = []
    bar = tqdm(total=settings.iters, desc=desc, unit="it", leave=False, disable=not progress)
    try:
        for iteration in range(settings.iters):
            total = 0.0
            for _ in range(settings.gradient_accumulate_steps):
                indices = sampler.next()
                loss = evaluate(indices) / settings.gradient_accumulate_steps
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise FloatingPointError(f"{desc}: the block loss became {total} at iteration {iteration}")
            losses.append(total)
            if total < best_loss:
                best_loss, best_iteration = total, iteration
                best_state = {name: p.state() for name, p in parameters.items()}
            elif settings.dynamic_max_gap > 0 and iteration - best_iteration >= settings.dynamic_max_gap:
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            for p in layers:
                p.clamp_()
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3g}", best=f"{best_loss:.3g}")
    finally:
        bar.close()
    if not settings.not_use_mse and best_state is not None:
        for name, p in parameters.items():
            p.load_state(best_state[name])
    return TuneResult(initial, full_loss() if measure_final else None, best_loss, losses[-1], best_iteration, len(losses),
                      time.perf_counter() - start, losses)

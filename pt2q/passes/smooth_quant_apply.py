"""Compute SmoothQuant scales from the recorders and fold them into the graph.

For a group with input channels j shared by consumers W1..Wk:
    s_j = max|X_j|^alpha / max_j|[W1; ...; Wk]|^(1 - alpha)
(weight max clipped at 1e-5; s_j = 1 where the activation max is 0). Consumers' input columns are
multiplied by s; the producer's output channels are divided by s (norm weight/bias, Linear/Conv rows and
bias, RMSNorm's constant, SwiGLU `up` rows), or, where nothing can absorb it, an explicit `mul` by 1/s is
placed before the consumers (Inductor fuses it into the following quantize). Every new value is a new
constant with its own `get_attr`: no tensor is written in place, tied weights stay tied to the rest.

A group is left unsmoothed when smoothing would raise its consumers' fake-quantized output error on the
recorded sample (`skip_if_worse`, default on): e.g. GELU outputs, whose asymmetric range smoothing
stretches. The report says so, with both errors.

On an observed graph (after torchao's `prepare_pt2e` and one calibration pass), the observers at the
smoothed inputs are replaced by min/max observers whose range follows exactly from the per-channel
min/max (`min_j(min_j / s_j)`, `max_j(max_j / s_j)`), and weight observers re-observe the new weights:
no second calibration pass is needed.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult
from torchao.quantization.pt2e.observer import MinMaxObserver, ObserverBase

from ..errors import CalibrationError, ConfigError
from ..graph import add_constant, class_path, get_constant, module_fqn, module_stack
from .insert_channel_recorders import ChannelRecorder, remove_recorders
from .smooth_quant_groups import Absorb, AbsorbGroup, constant_value
from .manager import Pass

aten = torch.ops.aten
_WEIGHT_CLIP = 1e-5


@dataclass
class GroupReport:
    producer: str
    consumers: list[str]
    scale: torch.Tensor | None = None
    alpha: float | None = None
    absorbed: bool = False
    reason: str = ""


@dataclass
class SmoothQuantReport:
    groups: list[GroupReport] = field(default_factory=list)    # smoothed (absorbed or explicit mul)
    skipped: list[GroupReport] = field(default_factory=list)   # with reasons

    @property
    def num_absorbed(self) -> int:
        return sum(g.absorbed for g in self.groups)

    def summary(self) -> str:
        return (f"SmoothQuant: {len(self.groups)} groups smoothed ({self.num_absorbed} absorbed, "
                f"{len(self.groups) - self.num_absorbed} explicit mul), {len(self.skipped)} skipped")

    def lines(self) -> list[str]:
        """One line per group: how it was smoothed (producer -> consumers, alpha, scale range) or why not."""
        def alpha(group) -> str:
            return f" alpha={group.alpha:.4g}" if group.alpha is not None else ""

        lines = []
        for group in self.groups:
            kind = "absorbed" if group.absorbed else "explicit mul"
            scale = (f" scale(n={group.scale.numel()} min={group.scale.min().item():.4g} "
                     f"max={group.scale.max().item():.4g})") if isinstance(group.scale, torch.Tensor) else ""
            producer = group.producer.removeprefix("explicit mul:")
            lines.append(f"  {kind}: {producer} -> {', '.join(group.consumers)}{alpha(group)}{scale}")
        for group in self.skipped:
            lines.append(f"  skipped: {group.producer} -> {', '.join(group.consumers)}{alpha(group)}: {group.reason}")
        return lines


# -- small helpers --------------------------------------------------------------------------------
def _is_observer(gm: GraphModule, node) -> bool:
    return isinstance(node, Node) and node.op == "call_module" and \
        isinstance(gm.get_submodule(node.target), ObserverBase)


def _through_observer(gm: GraphModule, node: Node) -> tuple[Node, Node | None]:
    """(the value node, its observer node or None) for a consumer argument."""
    if _is_observer(gm, node):
        return node.args[0], node
    return node, None


def _constant_through_observer(gm: GraphModule, node: Node) -> torch.Tensor:
    """The constant a node argument holds, looking through its weight observer on observed graphs."""
    return get_constant(gm, _through_observer(gm, node)[0]).detach()


def _replace_constant(gm: GraphModule, user: Node, arg_index: int, value: torch.Tensor, hint: str) -> Node:
    """Point `user.args[arg_index]` (possibly through its observer) at a new constant `value`."""
    current = user.args[arg_index]
    source, observer = _through_observer(gm, current) if isinstance(current, Node) else (current, None)
    if observer is not None and set(observer.users) != {user}:
        # One observer serving several nodes (a Linear called twice shares its weight's observer):
        # the others keep reading the old value through it; `user` gets its own copy.
        observer = _copy_observer(gm, observer, source)
        user.update_arg(arg_index, observer)
    name = add_constant(gm, hint, value)
    with gm.graph.inserting_before(observer or user):
        new_node = gm.graph.get_attr(name)
    if isinstance(source, Node) and "val" in source.meta:
        new_node.meta["val"] = source.meta["val"]
    if observer is not None:
        observer.update_arg(0, new_node)
        module = gm.get_submodule(observer.target)
        if hasattr(module, "reset_min_max_vals"):
            module.reset_min_max_vals()
        module(value)  # re-observe the new weight
    else:
        user.update_arg(arg_index, new_node)
    return new_node


def _copy_observer(gm: GraphModule, observer: Node, observed: Node) -> Node:
    """A new observer node (a copy of `observer`'s module) on `observed`, placed right after it."""
    name = f"{observer.target}_sq"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, copy.deepcopy(gm.get_submodule(observer.target)))
    with gm.graph.inserting_after(observed):
        node = gm.graph.call_module(name, (observed,))
    node.meta = dict(observer.meta)
    return node


def _channel_shape(ndim: int, channel_dim: int, channels: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_dim] = channels
    return shape


def fake_quant_activation(x: torch.Tensor, low: float, high: float, qmin: int, qmax: int) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / (qmax - qmin), 2 ** -12)
    zero_point = qmin - round(low / scale)
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fake_quant_weight(weight: torch.Tensor, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """int8 symmetric per output channel (dim 0), as the quantizers' weight spec (torchao's symmetric
    scale: amax over half the range)."""
    amax = weight.abs().reshape(weight.shape[0], -1).amax(1).clamp(min=2 ** -12)
    scale = (amax / ((qmax - qmin) / 2)).reshape(_channel_shape(weight.dim(), 0, weight.shape[0]))
    return torch.clamp(torch.round(weight / scale), qmin, qmax) * scale


# -- the pass -------------------------------------------------------------------------------------
class SmoothQuantApply(Pass):
    """See the module docstring. `alpha` is a float, "auto", or a dict {regex | nn.Module class |
    ATen op: float | "auto" | None} (the first key matching a group's consumers wins; unmatched groups
    use `default_alpha`; None leaves a group unsmoothed)."""

    name = "smooth_quant_apply"

    def __init__(self, groups: list[AbsorbGroup], recorders: dict[str, str], *, alpha=0.5,
                 default_alpha: float = 0.5, folding_only: bool = False,
                 auto_grid: tuple[float, ...] = tuple(i / 10 for i in range(11)), auto_criterion: str = "mean",
                 skip_if_worse: bool = True, activation_range: tuple[int, int] = (0, 255),
                 weight_range: tuple[int, int] = (-128, 127)):
        self.groups = groups
        self.recorders = recorders
        self.alpha = alpha
        self.default_alpha = default_alpha
        self.folding_only = folding_only
        self.auto_grid = auto_grid
        self.auto_criterion = auto_criterion
        self.skip_if_worse = skip_if_worse
        self.activation_range = activation_range
        self.weight_range = weight_range
        self.report = SmoothQuantReport()

    # -- alpha ----------------------------------------------------------------------------------
    @staticmethod
    def _key_matches(key, group: AbsorbGroup) -> bool:
        for consumer in group.consumers:
            if isinstance(key, str):
                if any(re.fullmatch(key, fqn) for fqn, _ in module_stack(consumer)):
                    return True
            elif isinstance(key, type):
                if class_path(key) in {cls for _, cls in module_stack(consumer)}:
                    return True
            elif consumer.target is key or getattr(consumer.target, "overloadpacket", None) is key:
                return True
        return False

    def _validate_alpha_keys(self, groups: list[AbsorbGroup]) -> None:
        if not isinstance(self.alpha, dict):
            return
        for key in self.alpha:
            if not any(self._key_matches(key, g) for g in groups):
                known = sorted({name for g in groups for name in g.consumer_names})
                raise ConfigError(f"SmoothQuant alpha key {key!r} matches no smoothed layer; layers are: "
                                  f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")

    def _alpha_for(self, group: AbsorbGroup):
        if isinstance(self.alpha, dict):
            for key, value in self.alpha.items():
                if self._key_matches(key, group):
                    return value
            return self.default_alpha
        return self.alpha

    # -- scales ---------------------------------------------------------------------------------
    @staticmethod
    def _weight_column_absmax(gm: GraphModule, group: AbsorbGroup) -> torch.Tensor:
        maxima = []
        for consumer in group.consumers:
            weight = _constant_through_observer(gm, consumer.args[1]).float()
            maxima.append(weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1))
        return torch.stack(maxima).amax(0).clamp(min=_WEIGHT_CLIP)

    @staticmethod
    def _scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        scales = act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
        scales = torch.where(act_absmax > 0, scales, torch.ones_like(scales))
        return scales.clamp(min=_WEIGHT_CLIP)

    def _consumer_errors(self, gm: GraphModule, group: AbsorbGroup, recorder: ChannelRecorder,
                         weight_absmax: torch.Tensor, alpha: float | None) -> list[float]:
        """Per consumer, the relative mean squared error of its output when its input and weight are
        fake-quantized after smoothing with `alpha` (None: without smoothing), on the recorded sample."""
        sample = recorder.sample.float()
        qmin, qmax = self.activation_range
        if alpha is None:
            scales = torch.ones(group.channels)
        else:
            scales = self._scales(recorder.absmax, weight_absmax, alpha)
        low = (recorder.min_val / scales).min().item()
        high = (recorder.max_val / scales).max().item()
        x = fake_quant_activation(sample / scales.reshape(_channel_shape(sample.dim(), group.channel_dim,
                                                                           group.channels)), low, high, qmin, qmax)
        errors = []
        for consumer in group.consumers:
            weight = _constant_through_observer(gm, consumer.args[1]).float()
            extra = [get_constant(gm, a) if isinstance(a, Node) else a for a in consumer.args[2:]]
            reference = self._reference(consumer, sample, weight, extra)
            w = fake_quant_weight(weight * scales.reshape(_channel_shape(weight.dim(), 1, group.channels)),
                                  *self.weight_range)
            error = torch.mean((consumer.target(x, w, *extra) - reference) ** 2)
            errors.append((error / reference.pow(2).mean().clamp(min=1e-30)).item())
        return errors

    def _reference(self, consumer: Node, sample: torch.Tensor, weight: torch.Tensor, extra: list) -> torch.Tensor:
        """The consumer's fp32 output on the sample, computed once for all the alphas tried."""
        if consumer not in self._references:
            self._references[consumer] = consumer.target(sample, weight, *extra)
        return self._references[consumer]

    def _auto_alpha(self, gm: GraphModule, group: AbsorbGroup, recorder: ChannelRecorder,
                    weight_absmax: torch.Tensor) -> float:
        """Per consumer, the grid alpha minimising its fake-quantized output error; then the group's
        alpha by the criterion (min / max / mean of the consumers' best alphas)."""
        table = [self._consumer_errors(gm, group, recorder, weight_absmax, a) for a in self.auto_grid]
        best = [self.auto_grid[min(range(len(table)), key=lambda i: table[i][k])]
                for k in range(len(group.consumers))]
        if self.auto_criterion == "min":
            return min(best)
        if self.auto_criterion == "max":
            return max(best)
        return sum(best) / len(best)

    def _worse_than_unsmoothed(self, gm, group, recorder, weight_absmax, alpha: float) -> str:
        """A reason to skip when smoothing with `alpha` raises the group's estimated error, else ''."""
        smoothed = sum(self._consumer_errors(gm, group, recorder, weight_absmax, alpha))
        plain = sum(self._consumer_errors(gm, group, recorder, weight_absmax, None))
        if smoothed < plain:
            return ""
        return (f"smoothing with alpha {alpha:.2f} would raise the estimated output error "
                f"({plain:.2e} -> {smoothed:.2e})")

    # -- rewriting ------------------------------------------------------------------------------
    def _scale_consumers(self, gm: GraphModule, group: AbsorbGroup, scales: torch.Tensor) -> None:
        for consumer in group.consumers:
            weight = _constant_through_observer(gm, consumer.args[1])
            scaled = weight * scales.to(weight.dtype).reshape(_channel_shape(weight.dim(), 1, group.channels))
            _replace_constant(gm, consumer, 1, scaled, f"{module_fqn(consumer) or consumer.name}.weight_sq")

    def _absorb(self, gm: GraphModule, group: AbsorbGroup, scales: torch.Tensor) -> None:
        producer, absorber = group.producer, group.absorber
        hint = module_fqn(producer) or producer.name
        if absorber.how is Absorb.AFFINE_ARGS:
            for index in absorber.scaled_args:
                arg = producer.args[index] if index < len(producer.args) else None
                if arg is None:
                    if index != absorber.scaled_args[0]:
                        continue  # no bias: nothing to scale
                    value = torch.ones(group.channels)  # no weight: it becomes 1/s
                else:
                    value = get_constant(gm, arg).detach()
                _replace_constant(gm, producer, index, value / scales.to(value.dtype), f"{hint}.sq")
        elif absorber.how in (Absorb.OUTPUT_ROWS, Absorb.LINEAR_OPERAND):
            target = group.absorb_target if absorber.how is Absorb.LINEAR_OPERAND else producer
            weight = _constant_through_observer(gm, target.args[1])
            row_scales = scales.to(weight.dtype).reshape(_channel_shape(weight.dim(), 0, group.channels))
            _replace_constant(gm, target, 1, weight / row_scales, f"{module_fqn(target) or target.name}.weight_sq")
            bias = target.args[2] if len(target.args) > 2 else None
            if bias is not None:
                value = _constant_through_observer(gm, bias)
                _replace_constant(gm, target, 2, value / scales.to(value.dtype),
                                  f"{module_fqn(target) or target.name}.bias_sq")
        elif absorber.how is Absorb.CONSTANT_OPERAND:
            for index, operand in enumerate(producer.args[:2]):
                value = constant_value(gm, operand)
                if value is not None and value.numel() == group.channels:
                    _replace_constant(gm, producer, index, value.detach() / scales.to(value.dtype), f"{hint}.sq")
                    break

    def _insert_mul(self, gm: GraphModule, group: AbsorbGroup, scales: torch.Tensor) -> None:
        """x -> x * (1/s) before the consumers (after each distinct input they read)."""
        inputs: dict[Node, list[tuple[Node, Node | None]]] = {}
        for consumer in group.consumers:
            value, observer = _through_observer(gm, consumer.args[0])
            inputs.setdefault(value, []).append((consumer, observer))
        for value, readers in inputs.items():
            shape = _channel_shape(value.meta["val"].dim(), group.channel_dim, group.channels)
            name = add_constant(gm, f"{value.name}_sq_inv_scale", (1.0 / scales).reshape(shape))
            with gm.graph.inserting_after(value):
                constant = gm.graph.get_attr(name)
            with gm.graph.inserting_after(constant):
                mul = gm.graph.call_function(aten.mul.Tensor, (value, constant))
            mul.meta = {k: v for k, v in value.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
            moved: dict[Node, Node] = {}
            for consumer, observer in readers:
                if observer is None:
                    consumer.update_arg(0, mul)
                    continue
                if observer not in moved:
                    moved[observer] = self._observer_for_mul(gm, observer, mul, group)
                consumer.update_arg(0, moved[observer])

    @staticmethod
    def _observer_for_mul(gm: GraphModule, observer: Node, mul: Node, group: AbsorbGroup) -> Node:
        """The observer node the group's consumers read after `mul`. An observer that also serves ops
        outside the group (a residual add sharing the conv input's observer) keeps observing the
        unscaled value for them; the group gets its own copy."""
        if set(observer.users) <= set(group.consumers):
            observer.update_arg(0, mul)
            return observer
        return _copy_observer(gm, observer, mul)

    def _update_activation_observers(self, gm: GraphModule, group: AbsorbGroup, recorder: ChannelRecorder,
                                     scales: torch.Tensor) -> None:
        low = (recorder.min_val / scales).min()
        high = (recorder.max_val / scales).max()
        for consumer in group.consumers:
            _, observer_node = _through_observer(gm, consumer.args[0])
            if observer_node is None:
                continue
            old = gm.get_submodule(observer_node.target)
            exact = MinMaxObserver(dtype=old.dtype, qscheme=old.qscheme, quant_min=old.quant_min,
                                   quant_max=old.quant_max, eps=float(old.eps))
            exact.min_val, exact.max_val = low.clone(), high.clone()
            for attribute in ("is_dynamic",):
                if hasattr(old, attribute):
                    setattr(exact, attribute, getattr(old, attribute))
            setattr(gm, observer_node.target, exact)

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = SmoothQuantReport()
        self._references: dict[Node, torch.Tensor] = {}
        live = [g for g in self.groups if not g.skipped and g.root.name in self.recorders]
        self._validate_alpha_keys(live)
        recorders = {g.root.name: graph_module.get_submodule(self.recorders[g.root.name]) for g in live}
        for group in live:  # check everything before changing anything
            recorder = recorders[group.root.name]
            if recorder.non_finite:
                raise CalibrationError(f"SmoothQuant: the input of {', '.join(group.consumer_names)} "
                                       f"({group.root.name}) was NaN/Inf during calibration")
            if recorder.min_val is None:
                raise CalibrationError(f"SmoothQuant: no calibration data reached {group.root.name}")
        for group in self.groups:
            if group.skipped or (self.folding_only and not group.absorbed):
                self.report.skipped.append(GroupReport(group.describe_producer(), group.consumer_names,
                                                       reason=group.reason or "skipped"))
        for group in live:
            if self.folding_only and not group.absorbed:
                continue
            recorder = recorders[group.root.name]
            weight_absmax = self._weight_column_absmax(graph_module, group)
            alpha = self._alpha_for(group)
            if alpha is None:
                self.report.skipped.append(GroupReport(group.describe_producer(), group.consumer_names,
                                                       reason="alpha rule None: not smoothed"))
                continue
            if alpha == "auto":
                alpha = self._auto_alpha(graph_module, group, recorder, weight_absmax)
            alpha = float(alpha)
            reason = self._worse_than_unsmoothed(graph_module, group, recorder, weight_absmax, alpha) \
                if self.skip_if_worse else ""
            if reason:
                self.report.skipped.append(GroupReport(group.describe_producer(), group.consumer_names,
                                                       alpha=alpha, reason=reason))
                continue
            scales = self._scales(recorder.absmax, weight_absmax, alpha)
            self._scale_consumers(graph_module, group, scales)
            if group.absorbed:
                self._absorb(graph_module, group, scales)
            else:
                self._insert_mul(graph_module, group, scales)
            self._update_activation_observers(graph_module, group, recorder, scales)
            self.report.groups.append(GroupReport(group.describe_producer(), group.consumer_names, scales,
                                                  alpha, group.absorbed, group.reason))
        remove_recorders(graph_module)
        graph_module.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "get_attr" or bool(n.users))
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)


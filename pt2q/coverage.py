"""What a quantized model left in floating point, and why: `qmodel.meta["pt2q_report"]`.

Every op that multiplies by a constant float weight of two or more dimensions (linear, convolutions,
addmm / mm / matmul / bmm / baddbmm / einsum with a constant operand, seen through views and transposes)
is a *weighted op*. It is quantized when its weight reaches it through a dequantize (int8 Q/DQ, FP8, or
pt2q's packed weight-only form). Each one left in float gets a reason:

- "set_local(..., None)": the config keeps it float on purpose (a module-name, class or op rule);
- "LM head / tied embedding": a linear sharing its weight with an embedding lookup (not counted);
- "no quantizer rule for aten.<op>": no rule of the quantizer matches the op (MatmulToLinear did not
  turn it into a linear);
- the weight-only plan's own reason (e.g. "weight is not a constant float tensor");
- "weight computed from constants at run time": a parametrization FoldConstantWeights did not fold (QAT);
- "left float by the quantizer" otherwise (a rule matched but the quantizer did not annotate it).

The share counts weight *elements* (embeddings and tied LM heads excluded): a model with 99 small
quantized layers and one huge float one is not 99% covered. `pt2q.quantize(..., require_full_coverage=True)`
raises `CoverageError` naming the first weighted op left float for any reason but the config's own
set_local; otherwise one warning line names what was left float without being asked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .errors import CoverageError
from .graph import VIEW_OPS, WEIGHT_ARGUMENTS, get_constant, module_fqn

log = logging.getLogger(__name__)
aten = torch.ops.aten

SET_LOCAL = "set_local(..., None)"
TIED = "LM head / tied embedding (not counted)"
UNEXPLAINED = "left float by the quantizer"
LM_HEAD_KEPT = "LM head / tied embedding"   # weight-only's default (pt2q.weight_only.plan)
_DEQUANTIZE_NAMESPACES = ("quantized_decomposed", "pt2q", "pt2q_gaudi2", "pt2q_gaudi3")
_WEIGHT_VIEWS = VIEW_OPS | {aten.numpy_T.default}
COMPUTED = "weight computed from constants at run time"


@dataclass
class FloatLayer:
    node: str
    module: str
    op: str
    elements: int
    reason: str


@dataclass
class CoverageReport:
    """Weighted ops of a quantized model: how many weight elements are quantized, and each float one."""

    quantized_layers: int = 0
    quantized_elements: int = 0
    float_elements: int = 0          # counted float weights (set_local ones included; tied heads not)
    float_layers: list[FloatLayer] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Quantized share of the counted weight elements (1.0 for a model without weighted ops)."""
        total = self.quantized_elements + self.float_elements
        return self.quantized_elements / total if total else 1.0

    @property
    def unexpected(self) -> list[FloatLayer]:
        """The float layers the config did not ask for: not set_local, not a tied head, not weight-only's
        default of keeping the LM head float."""
        return [layer for layer in self.float_layers
                if layer.reason not in (SET_LOCAL, TIED) and not layer.reason.startswith(LM_HEAD_KEPT)]

    def summary(self) -> str:
        return (f"coverage: {self.quantized_layers} weighted ops quantized, {100 * self.share:.2f}% of weight "
                f"elements; {len(self.float_layers)} left float ({len(self.unexpected)} not asked for)")

    def lines(self) -> list[str]:
        return [f"{layer.node} ({layer.module or 'top level'}, {layer.op}, {layer.elements} elements): {layer.reason}"
                for layer in self.float_layers]


def _weight_source(graph_module: GraphModule, argument) -> tuple[torch.Tensor | None, bool, bool]:
    """(the constant tensor behind `argument`, through views; whether a dequantize produced it; whether
    it is computed from constants at run time). A computed weight (a parametrization FoldConstantWeights
    did not fold) comes back as its recorded value (meta["val"]: shape and dtype, for the count)."""
    from .passes.fold_constant_weights import _closure

    node = argument
    while isinstance(node, Node):
        if node.op == "get_attr":
            return get_constant(graph_module, node), False, False
        if node.op != "call_function":
            return None, False, False
        if getattr(node.target, "namespace", None) in _DEQUANTIZE_NAMESPACES and "dequantize" in str(node.target):
            return None, True, False
        if node.target not in _WEIGHT_VIEWS:
            value = node.meta.get("val")
            computed = isinstance(value, torch.Tensor) and bool(_closure(node))
            return (value, False, True) if computed else (None, False, False)
        node = node.args[0]
    return None, False, False


def weighted_ops(graph_module: GraphModule):
    """(node, weight tensor or None, quantized, computed) for every op with a constant weight operand,
    in graph order."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        positions = WEIGHT_ARGUMENTS.get(node.target, ())
        if node.target is aten.einsum.default:
            positions = tuple(range(len(node.args[1])))
        operands = node.args[1] if node.target is aten.einsum.default else node.args
        for position in positions:
            if position >= len(operands):
                continue
            weight, quantized, computed = _weight_source(graph_module, operands[position])
            if quantized or (weight is not None and weight.is_floating_point() and weight.dim() >= 2):
                yield node, weight, quantized, computed
                break


def _tied(graph_module: GraphModule) -> set[int]:
    return {id(get_constant(graph_module, n.args[0])) for n in graph_module.graph.nodes
            if n.op == "call_function" and n.target is aten.embedding.default}


def _reason(node: Node, quantizer, weight_only_kept: dict) -> str:
    if node.name in weight_only_kept:
        return weight_only_kept[node.name]
    if quantizer is not None:
        rule = quantizer._rule(node)
        if rule is None:
            return f"no quantizer rule for aten.{node.target.__name__}"
        if not quantizer._enabled(rule, node):
            return f"rule {rule.name!r} is opt-in and off (the config option {rule.opt_in!r} turns it on)"
        if quantizer.scheme_for(node) is None:
            return SET_LOCAL
    return UNEXPLAINED


def _quantizer_of(config):
    try:
        return config.to_quantizer() if config is not None and hasattr(config, "to_quantizer") else None
    except Exception as error:  # noqa: BLE001 - a config that cannot build one has no rules to explain with
        log.debug("coverage: no quantizer from %s (%s)", type(config).__name__, error)
        return None


def coverage_report(graph_module: GraphModule, config=None) -> CoverageReport:
    """The CoverageReport of a quantized graph (see the module docstring); `config` explains the float ops."""
    from . import meta

    weight_only = graph_module.meta.get(meta.WEIGHT_ONLY_REPORT)
    kept = dict(getattr(weight_only, "kept_float", {}) or {})
    quantizer = None if weight_only is not None else _quantizer_of(config)
    tied = _tied(graph_module)
    report = CoverageReport()
    for node, weight, quantized, computed in weighted_ops(graph_module):
        if quantized:
            report.quantized_layers += 1
            report.quantized_elements += _quantized_elements(graph_module, node)
            continue
        elements = weight.numel()
        if id(weight) in tied and node.target is aten.linear.default:
            reason = TIED
        else:
            reason = COMPUTED if computed else _reason(node, quantizer, kept)
            report.float_elements += elements
        report.float_layers.append(FloatLayer(node.name, module_fqn(node), str(node.target), elements, reason))
    return report


def _quantized_elements(graph_module: GraphModule, node: Node) -> int:
    """Weight elements of a quantized op: its dequantize's recorded output, else the stored codes (pt2q's
    packed weights hold several codes per element: their recorded shape is used first)."""
    for argument in node.args[:3]:
        source = argument
        while isinstance(source, Node) and source.op == "call_function" and source.target in _WEIGHT_VIEWS:
            source = source.args[0]
        if not (isinstance(source, Node) and source.op == "call_function" and "dequantize" in str(source.target)):
            continue
        value = source.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.numel()
        codes = get_constant(graph_module, source.args[0])
        if codes is not None:
            return codes.numel()
    return 0


def check_coverage(report: CoverageReport, *, require_full: bool = False) -> None:
    """Raise CoverageError (require_full) or log one warning line for float layers nobody asked for."""
    unexpected = report.unexpected
    if not unexpected:
        return
    first = unexpected[0]
    if require_full:
        raise CoverageError(f"require_full_coverage: weighted op {first.node!r} (module {first.module!r}, {first.op}) "
                            f"is left in float: {first.reason}; {len(unexpected)} such op(s) in all, listed in "
                            "qmodel.meta['pt2q_report'] when require_full_coverage is off. Add a rule for the op, "
                            "or keep it float on purpose with config.set_local(...)", report)
    names = ", ".join(f"{layer.node} ({layer.reason})" for layer in unexpected[:3])
    log.warning("pt2q: %d weighted op(s) left in float without being asked: %s%s; %.2f%% of weight elements "
                "quantized (qmodel.meta['pt2q_report'])", len(unexpected), names,
                ", ..." if len(unexpected) > 3 else "", 100 * report.share)

"""`RuleQuantizer`: a torchao `Quantizer` that annotates an exported graph from the table in `rules.py`.

Backends (x86.py, xpu.py) only choose dtypes and observers. Per-node configuration follows
`set_module_name` (regex on module names) > `set_op_type` (ATen op or module class) > `set_global`;
`None` keeps the matched nodes in fp32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.observer import (
    HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver,
    PlaceholderObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation, QuantizationSpec, Quantizer, SharedQuantizationSpec,
)

from .. import meta
from ..errors import ConfigError
from ..isa import GUARD_BOUNDS, RESOLVED_GUARDS, resolve_saturation_guard
from ..graph import class_path, get_constant, is_float_tensor, module_stack
from ..passes.manager import PassManager
from ..passes.matmul_to_linear import MatmulToLinear
from .rules import RULE_BY_OP, Role

ANNOTATION_KEY = meta.ANNOTATION
_EPS = 2 ** -12  # smallest scale: keeps all-zero tensors from producing a zero scale

ACTIVATION_OBSERVERS = {
    "minmax": MinMaxObserver,
    "histogram": HistogramObserver,
    "moving_average": MovingAverageMinMaxObserver,
}


@dataclass(frozen=True)
class QuantScheme:
    """How one op is quantized: the activation spec (None: weight-only), the weight spec, and the
    saturation guard already applied to their ranges (a key of pt2q.isa.GUARD_BOUNDS)."""

    activation: QuantizationSpec | None
    weight: QuantizationSpec
    saturation_guard: str = "off"

    def for_rule(self, rule) -> "QuantScheme":
        """The scheme an op of `rule` gets. A GEMM of two activations has no weight to narrow, so
        "weights7" becomes 7-bit activations there."""
        if self.saturation_guard != "weights7" or rule.weight_arg is not None or self.activation is None:
            return self
        activation, weight = _guarded_specs(self.activation, self.weight, "activations7")
        return QuantScheme(activation, weight, "activations7")

    @property
    def is_dynamic(self) -> bool:
        return self.activation is not None and self.activation.is_dynamic

    @property
    def weight_only(self) -> bool:
        return self.activation is None


def make_scheme(activation_dtype: torch.dtype, *, dynamic: bool = False, observer: str = "minmax",
                per_channel: bool = True, weight_only: bool = False, saturation_guard: str = "off") -> QuantScheme:
    """Affine per-tensor activations of `activation_dtype` (none when `weight_only`); int8 symmetric
    weights (per channel). `saturation_guard` (already resolved: a key of pt2q.isa.GUARD_BOUNDS) takes one
    bit off the weights or the activations, so that no u8 x s8 pair sum leaves int16 in oneDNN's kernels
    on CPUs without VNNI."""
    if observer not in ACTIVATION_OBSERVERS:
        raise ConfigError(f"unknown activation observer {observer!r}; valid: {sorted(ACTIVATION_OBSERVERS)}")
    if saturation_guard not in RESOLVED_GUARDS:
        raise ConfigError(f"make_scheme: saturation_guard={saturation_guard!r}; valid: "
                          f"{', '.join(map(repr, RESOLVED_GUARDS))} (resolve 'auto' with "
                          "pt2q.isa.resolve_saturation_guard)")
    if weight_only:
        saturation_guard = "off"  # fp32 activations: the GEMM is not an int8 one
    info = torch.iinfo(activation_dtype)
    observer_ctr = PlaceholderObserver if dynamic else ACTIVATION_OBSERVERS[observer]
    activation = None if weight_only else QuantizationSpec(
        dtype=activation_dtype, quant_min=info.min, quant_max=info.max, qscheme=torch.per_tensor_affine,
        is_dynamic=dynamic, observer_or_fake_quant_ctr=observer_ctr.with_args(eps=_EPS))
    if per_channel:
        weight = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
            ch_axis=0, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=_EPS))
    else:
        weight = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=_EPS))
    activation, weight = _guarded_specs(activation, weight, saturation_guard)
    return QuantScheme(activation, weight, saturation_guard)


def _guarded_specs(activation: QuantizationSpec | None, weight: QuantizationSpec, guard: str):
    """Narrow the specs to the guard's (activation span, weight magnitude) from pt2q.isa.GUARD_BOUNDS,
    so that no u8 x s8 pair sum leaves int16: activations [0, span] for uint8 (centred on 0 for int8),
    weights [-magnitude, magnitude - 1]. A side the guard leaves at full range is kept as it is."""
    span, magnitude = GUARD_BOUNDS[guard]
    if activation is not None and span < 255:
        low = 0 if activation.quant_min >= 0 else -((span + 1) // 2)
        activation = replace(activation, quant_min=low, quant_max=low + span)
    if magnitude < 128:
        weight = replace(weight, quant_min=-magnitude, quant_max=magnitude - 1)
    return activation, weight


_UNSET = object()


class RuleQuantizer(Quantizer):
    """Annotates linear/conv (and the other rules of the table) by matching ATen ops.

    Usable with torchao's `prepare_pt2e` / `convert_pt2e` directly.
    """

    activation_dtype: torch.dtype = torch.uint8
    # Whether the quantized graph runs on this machine's CPU kernels (oneDNN): the "auto" saturation
    # guard looks at this CPU only for such targets.
    targets_this_cpu: bool = True
    # The rules of rules.py this quantizer applies (by name); None: all of them.
    rule_names: frozenset | None = None

    def __init__(self, *, quantize_attention_matmul: bool = False):
        super().__init__()
        self.global_scheme: QuantScheme | None = None
        self.module_name_rules: list[tuple[re.Pattern, QuantScheme | None]] = []
        self.op_type_rules: list[tuple[object, QuantScheme | None]] = []
        self.options = {"quantize_attention_matmul": quantize_attention_matmul}
        self.annotated_nodes: dict[str, str] = {}  # node name -> rule name, after annotate()
        self.applied_guards: dict[str, str] = {}  # node name -> saturation guard of its int8 GEMM

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def static_scheme(cls, observer: str = "minmax", per_channel: bool = True,
                      saturation_guard: str = "auto") -> QuantScheme:
        """Calibrated activations. `saturation_guard`: "auto" (7-bit weights where this CPU's int8
        kernels saturate, else off), "weights7", "activations7" or "off"; see pt2q.isa."""
        return make_scheme(cls.activation_dtype, observer=observer, per_channel=per_channel,
                           saturation_guard=cls.resolve_saturation_guard(saturation_guard))

    @classmethod
    def dynamic_scheme(cls, per_channel: bool = True, saturation_guard: str = "auto") -> QuantScheme:
        return make_scheme(cls.activation_dtype, dynamic=True, per_channel=per_channel,
                           saturation_guard=cls.resolve_saturation_guard(saturation_guard))

    @classmethod
    def resolve_saturation_guard(cls, policy: str) -> str:
        return resolve_saturation_guard(policy, targets_this_cpu=cls.targets_this_cpu,
                                        where=f"{cls.__name__} saturation_guard")

    @classmethod
    def weight_only_scheme(cls, per_channel: bool = True) -> QuantScheme:
        """int8 weights (round to nearest), fp32 activations."""
        return make_scheme(cls.activation_dtype, weight_only=True, per_channel=per_channel)

    def set_global(self, scheme: QuantScheme | None) -> "RuleQuantizer":
        self.global_scheme = self._checked(scheme, "set_global")
        return self

    def set_module_name(self, name_regex: str, scheme: QuantScheme | None) -> "RuleQuantizer":
        """Rule for the modules whose fully qualified name (as in `named_modules()`) matches the regex
        entirely; it applies to every node inside them."""
        try:
            pattern = re.compile(name_regex)
        except re.error as error:
            raise ConfigError(f"set_module_name: {name_regex!r} is not a valid regex: {error}") from error
        self.module_name_rules.append((pattern, self._checked(scheme, "set_module_name")))
        return self

    def set_op_type(self, op_or_module_class, scheme: QuantScheme | None) -> "RuleQuantizer":
        """Rule for an ATen op (`torch.ops.aten.linear` or `.default`) or for every node inside modules
        of a class (`torch.nn.Linear`)."""
        if not (isinstance(op_or_module_class, type) and issubclass(op_or_module_class, torch.nn.Module)
                or isinstance(op_or_module_class, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))):
            raise ConfigError(f"set_op_type takes an ATen op or an nn.Module subclass, "
                              f"got {op_or_module_class!r}")
        self.op_type_rules.append((op_or_module_class, self._checked(scheme, "set_op_type")))
        return self

    @staticmethod
    def _checked(scheme, where: str):
        if scheme is not None and not isinstance(scheme, QuantScheme):
            raise ConfigError(f"{where} takes a QuantScheme (e.g. X86Quantizer.static_scheme()) or None, "
                              f"got {type(scheme).__name__}")
        return scheme

    def scheme_for(self, node: Node) -> QuantScheme | None:
        stack = module_stack(node)
        found = _UNSET
        for pattern, scheme in self.module_name_rules:  # later rules override earlier ones
            if any(pattern.fullmatch(fqn) for fqn, _ in stack):
                found = scheme
        if found is not _UNSET:
            return found
        classes = {cls for _, cls in stack}
        for key, scheme in self.op_type_rules:
            if isinstance(key, type):
                hit = class_path(key) in classes
            else:
                hit = node.target is key or getattr(node.target, "overloadpacket", None) is key
            if hit:
                found = scheme
        return self.global_scheme if found is _UNSET else found

    # -- torchao Quantizer interface ------------------------------------------------------------
    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        model, _ = PassManager([MatmulToLinear()])(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        self.annotated_nodes, self.applied_guards = {}, {}
        nodes = list(model.graph.nodes)
        for node in nodes:
            rule = RULE_BY_OP.get(node.target) if node.op == "call_function" else None
            if rule is None or rule.role in (Role.PROPAGATE, Role.RESIDUAL) or not self.applies(rule):
                continue
            if rule.opt_in and not self.options.get(rule.opt_in):
                continue
            scheme = self.scheme_for(node)
            if scheme is not None:
                self._annotate_compute(model, node, rule, scheme.for_rule(rule))
        for node in nodes:
            rule = RULE_BY_OP.get(node.target) if node.op == "call_function" else None
            if rule is not None and rule.role is Role.RESIDUAL and self.applies(rule):
                self._annotate_residual(node, rule)
        for node in reversed(nodes):  # consumers first, so chains of propagating ops are found
            rule = RULE_BY_OP.get(node.target) if node.op == "call_function" else None
            if rule is not None and rule.role is Role.PROPAGATE and self.applies(rule):
                self._annotate_propagation(node, rule)
        return model

    def applies(self, rule) -> bool:
        return self.rule_names is None or rule.name in self.rule_names

    def validate(self, model: GraphModule) -> None:
        for node in model.graph.nodes:
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            for arg in annotation.input_qspec_map:
                if not is_float_tensor(arg):
                    raise ConfigError(f"node {node.name}: input {arg.name} is not a float tensor and "
                                      f"must not be quantized (annotated by another quantizer?)")

    # -- rule handlers ----------------------------------------------------------------------------
    def _annotate_compute(self, model: GraphModule, node: Node, rule, scheme: QuantScheme) -> None:
        if ANNOTATION_KEY in node.meta:
            return  # annotated by someone else (e.g. a composed quantizer): theirs stands
        activations = [node.args[i] for i in rule.activation_args if i < len(node.args)]
        if not activations or not all(is_float_tensor(a) and get_constant(model, a) is None
                                      for a in activations):
            return  # never observe ids, masks or constants as activations
        input_map = {} if scheme.weight_only else {a: scheme.activation for a in activations}
        if rule.weight_arg is not None:
            weight = node.args[rule.weight_arg]
            if get_constant(model, weight) is None or not is_float_tensor(weight):
                return  # a weight computed at run time: leave the op in fp32
            input_map[weight] = replace(scheme.weight, ch_axis=rule.weight_channel_axis) \
                if scheme.weight.ch_axis is not None else scheme.weight
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=input_map, _annotated=True)
        node.meta[meta.SCHEME] = scheme
        self.annotated_nodes[node.name] = rule.name
        if not scheme.weight_only:
            self.applied_guards[node.name] = scheme.saturation_guard

    def _annotate_residual(self, node: Node, rule) -> None:
        if ANNOTATION_KEY in node.meta or len(node.args) != 2:
            return
        lhs, rhs = node.args
        if not (is_float_tensor(lhs) and is_float_tensor(rhs)) or lhs.meta["val"].shape != rhs.meta["val"].shape:
            return
        for producer, extra in ((lhs, rhs), (rhs, lhs)):
            if producer.target in rule.after and producer.name in self.annotated_nodes and \
                    len(producer.users) == 1:
                scheme = producer.meta[meta.SCHEME]
                if scheme.is_dynamic or scheme.weight_only:
                    return
                node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
                    input_qspec_map={extra: scheme.activation}, _annotated=True)
                self.annotated_nodes[node.name] = rule.name
                return

    def _annotate_propagation(self, node: Node, rule) -> None:
        """Quantize the input and share its qparams with the output, when a consumer wants int8."""
        if ANNOTATION_KEY in node.meta or not is_float_tensor(node):
            return
        wanted = [self._edge_spec(node, user) for user in node.users]
        wanted = [spec for spec in wanted if spec is not None and not spec.is_dynamic]
        if not wanted:
            return
        spec = wanted[0]
        inputs = list(node.args[0]) if node.target is torch.ops.aten.cat.default else [node.args[0]]
        if not all(is_float_tensor(i) for i in inputs):
            return
        first = inputs[0]
        input_map = {first: spec}
        for other in inputs[1:]:  # cat: every input shares the first input's qparams
            input_map[other] = SharedQuantizationSpec((first, node))
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map=input_map, output_qspec=SharedQuantizationSpec((first, node)), _annotated=True)
        self.annotated_nodes[node.name] = rule.name

    @staticmethod
    def _edge_spec(producer: Node, user: Node):
        annotation = user.meta.get(ANNOTATION_KEY)
        if annotation is None:
            return None
        spec = annotation.input_qspec_map.get(producer)
        if isinstance(spec, QuantizationSpec):
            return spec
        if isinstance(spec, SharedQuantizationSpec):
            # the user is a cat sharing its first input's qparams: find that root spec
            root = annotation.input_qspec_map
            return next((s for s in root.values() if isinstance(s, QuantizationSpec)), None)
        return None

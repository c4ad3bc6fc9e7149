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
from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize
from torchao.quantization.pt2e.observer import (
    HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver, PlaceholderObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation, QuantizationSpec, Quantizer, SharedQuantizationSpec,
)

from .. import meta
from ..errors import ConfigError
from ..isa import GUARD_BOUNDS, RESOLVED_GUARDS, resolve_saturation_guard
from ..graph import class_path, get_constant, is_float_tensor, module_stack
from ..passes.manager import PassManager
from ..passes.fold_constant_weights import FoldConstantWeights
from ..passes.matmul_to_linear import MatmulToLinear
from .rules import ADD, FUSIONS, RULE_BY_OP, Role

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
    qat: bool = False  # fake quantization (prepare_qat_pt2e / pt2q.prepare_qat) instead of observers

    def for_rule(self, rule) -> "QuantScheme":
        """The scheme an op of `rule` gets. A GEMM of two activations has no weight to narrow, so
        "weights7" becomes 7-bit activations there."""
        if self.saturation_guard != "weights7" or rule.weight_arg is not None or self.activation is None:
            return self
        activation, weight = _guarded_specs(self.activation, self.weight, "activations7")
        return QuantScheme(activation, weight, "activations7", qat=self.qat)

    @property
    def is_dynamic(self) -> bool:
        return self.activation is not None and self.activation.is_dynamic

    @property
    def weight_only(self) -> bool:
        return self.activation is None


QAT_RANGES = ("ema", "learnable")


def make_scheme(activation_dtype: torch.dtype, *, dynamic: bool = False, observer: str = "minmax",
                per_channel: bool = True, weight_only: bool = False, saturation_guard: str = "off",
                qat: bool = False, qat_ranges: str = "ema") -> QuantScheme:
    """Affine per-tensor activations of `activation_dtype` (none when `weight_only`); int8 symmetric
    weights (per channel). `saturation_guard` (already resolved: a key of pt2q.isa.GUARD_BOUNDS) takes one
    bit off the weights or the activations, so that no u8 x s8 pair sum leaves int16 in oneDNN's kernels
    on CPUs without VNNI.

    `qat`: fake quantization for training instead of observers. Weights and static activations track
    their ranges by exponential moving average (`qat_ranges="ema"`); with "learnable" the activations'
    scale and zero point are trained by backpropagation (LSQ), starting from the observed range. Dynamic
    activations are fake-quantized with the range of each batch, as they will be computed at run time."""
    if observer not in ACTIVATION_OBSERVERS:
        raise ConfigError(f"unknown activation observer {observer!r}; valid: {sorted(ACTIVATION_OBSERVERS)}")
    if saturation_guard not in RESOLVED_GUARDS:
        raise ConfigError(f"make_scheme: saturation_guard={saturation_guard!r}; valid: "
                          f"{', '.join(map(repr, RESOLVED_GUARDS))} (resolve 'auto' with "
                          "pt2q.isa.resolve_saturation_guard)")
    if qat_ranges not in QAT_RANGES:
        raise ConfigError(f"make_scheme: qat_ranges={qat_ranges!r}; valid: {', '.join(map(repr, QAT_RANGES))}")
    if weight_only:
        saturation_guard = "off"  # fp32 activations: the GEMM is not an int8 one
    info = torch.iinfo(activation_dtype)
    if qat:
        activation_ctr = _qat_activation_ctr(dynamic, qat_ranges)
    else:
        activation_ctr = (PlaceholderObserver if dynamic else ACTIVATION_OBSERVERS[observer]).with_args(eps=_EPS)
    activation = None if weight_only else QuantizationSpec(
        dtype=activation_dtype, quant_min=info.min, quant_max=info.max, qscheme=torch.per_tensor_affine,
        is_dynamic=dynamic, observer_or_fake_quant_ctr=activation_ctr)
    if per_channel:
        weight_ctr = TrainedRangeFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=_EPS) if qat else \
            PerChannelMinMaxObserver.with_args(eps=_EPS)
        weight = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
            ch_axis=0, observer_or_fake_quant_ctr=weight_ctr)
    else:
        weight_ctr = TrainedRangeFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, eps=_EPS) if qat else MinMaxObserver.with_args(eps=_EPS)
        weight = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=weight_ctr)
    activation, weight = _guarded_specs(activation, weight, saturation_guard)
    return QuantScheme(activation, weight, saturation_guard, qat=qat)


class TrainedRangeFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """torchao's fused moving-average fake quant, converted with the qparams training used.

    convert_pt2e asks a fake quant for `calculate_qparams()`, which torchao answers by recomputing them
    from the observer's range. For symmetric int8 the two disagree: the fused training op divides the
    largest magnitude by 127, the observer by 127.5, so the deployed grid is not the one the weights were
    trained on and the largest weight of each channel is clipped. This returns the fused op's own scale
    and zero point, so the converted model computes what the trained fake-quantized one did."""

    def calculate_qparams(self):
        return self.scale.detach().clone(), self.zero_point.detach().clone()


def _qat_activation_ctr(dynamic: bool, ranges: str):
    if dynamic:
        # the range of the current batch (averaging constant 1), as dynamic quantization will use
        return FakeQuantize.with_args(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1),
                                      eps=_EPS)
    if ranges == "learnable":
        return LearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=_EPS,
                                               use_grad_scaling=True)
    return TrainedRangeFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=_EPS)


def float16_weight_scheme() -> QuantScheme:
    """fp16 weights, fp32 activations (Inductor's linear_dynamic_fp16: the weight is stored in half
    precision and widened in the kernel). No calibration: the weight is only rounded to fp16."""
    weight = QuantizationSpec(dtype=torch.float16, observer_or_fake_quant_ctr=PlaceholderObserver)
    return QuantScheme(None, weight, "off")


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


def _is_op(node: Node, key) -> bool:
    """`key` (an ATen overload or overload packet) names `node`'s op."""
    return node.target is key or getattr(node.target, "overloadpacket", None) is key


@dataclass
class PatternAnnotation(QuantizationAnnotation):
    """torchao's annotation plus the flag of its X86 Inductor contract: this node is the output of a
    quantized pattern (its value is int8 when the next op takes int8), so int8-in, int8-out ops after it
    (pooling, cat, flatten) may run in int8."""

    _is_output_of_quantized_pattern: bool = False


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
    def qat_scheme(cls, dynamic: bool = False, per_channel: bool = True, ranges: str = "ema",
                   saturation_guard: str = "auto") -> QuantScheme:
        """Fake quantization for quantization-aware training (torchao's prepare_qat_pt2e or
        pt2q.prepare_qat): `ranges` "ema" (moving-average ranges) or "learnable" (LSQ activation ranges);
        `dynamic` fake-quantizes activations with each batch's range, for a dynamic-int8 model."""
        return make_scheme(cls.activation_dtype, dynamic=dynamic, per_channel=per_channel, qat=True,
                           qat_ranges=ranges, saturation_guard=cls.resolve_saturation_guard(saturation_guard))

    @classmethod
    def float16_weight_scheme(cls) -> QuantScheme:
        """fp16 weights and fp32 activations for linear layers (Inductor's linear_dynamic_fp16)."""
        return float16_weight_scheme()

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
        name_rule = self._module_rule(node)
        if name_rule is not None:
            return name_rule[1]
        classes = {cls for _, cls in module_stack(node)}
        found = _UNSET
        for key, scheme in self.op_type_rules:  # later rules override earlier ones
            if class_path(key) in classes if isinstance(key, type) else _is_op(node, key):
                found = scheme
        return self.global_scheme if found is _UNSET else found

    # -- torchao Quantizer interface ------------------------------------------------------------
    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        # A weight computed from constants (weight norm) is folded first, so it can be quantized; not for
        # QAT, whose training keeps updating the parametrization's tensors.
        fold = not self._is_qat() and FoldConstantWeights.applies(model)
        passes = [FoldConstantWeights(), MatmulToLinear()] if fold else [MatmulToLinear()]
        model, _ = PassManager(passes)(model)
        return model

    def _is_qat(self) -> bool:
        schemes = [self.global_scheme, *(s for _, s in self.module_name_rules), *(s for _, s in self.op_type_rules)]
        return any(scheme is not None and scheme.qat for scheme in schemes)

    def annotate(self, model: GraphModule) -> GraphModule:
        self.annotated_nodes, self.applied_guards = {}, {}
        nodes = list(model.graph.nodes)
        # 1. weighted ops with their post-op chains, and activation-only ops
        for node in nodes:
            rule = self._rule(node)
            if rule is None or rule.role is Role.PROPAGATE or not self._enabled(rule, node):
                continue
            scheme = self.scheme_for(node)
            if scheme is not None:
                self._annotate_compute(model, node, rule, scheme.for_rule(rule))
        # 2. int8 onwards through pooling / cat / flatten fed by quantized patterns (producers first)
        for node in nodes:
            rule = self._rule(node)
            if rule is not None and rule.role is Role.PROPAGATE:
                self._propagate_from_inputs(node, rule)
        # 3. ... and backwards into them from consumers that take int8 (consumers first, for chains)
        for node in reversed(nodes):
            rule = self._rule(node)
            if rule is not None and rule.role is Role.PROPAGATE:
                self._propagate_from_users(node, rule)
        return model

    def _rule(self, node: Node):
        rule = RULE_BY_OP.get(node.target) if node.op == "call_function" else None
        return rule if rule is not None and self.applies(rule) else None

    def applies(self, rule) -> bool:
        return self.rule_names is None or rule.name in self.rule_names

    def _enabled(self, rule, node: Node) -> bool:
        """An opt-in rule is on through its option, or for an op a set_op_type rule names with a scheme."""
        if rule.opt_in is None or self.options.get(rule.opt_in):
            return True
        return any(scheme is not None and not isinstance(key, type) and _is_op(node, key)
                   for key, scheme in self.op_type_rules)

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
        if rule.same_shape and len({tuple(a.meta["val"].shape) for a in activations}) != 1:
            return
        if scheme.weight.dtype == torch.float16 and rule.name != "linear":
            return  # fp16 weights have a kernel for linear only (Inductor's linear_dynamic_fp16)
        input_map = {} if scheme.weight_only else {a: scheme.activation for a in activations}
        if rule.weight_arg is not None:
            weight = node.args[rule.weight_arg]
            if get_constant(model, weight) is None or not is_float_tensor(weight):
                return  # a weight computed at run time: leave the op in fp32
            input_map[weight] = replace(scheme.weight, ch_axis=rule.weight_channel_axis) \
                if scheme.weight.ch_axis is not None else scheme.weight
        fusion, chain = self._match_fusion(node, scheme) if rule.role is Role.WEIGHTED else (None, [])
        node.meta[ANNOTATION_KEY] = PatternAnnotation(
            input_qspec_map=input_map, _annotated=True,
            _is_output_of_quantized_pattern=not chain and not scheme.weight_only)
        node.meta[meta.SCHEME] = scheme
        self.annotated_nodes[node.name] = rule.name
        if not scheme.weight_only:
            self.applied_guards[node.name] = scheme.saturation_guard
        static = not scheme.is_dynamic
        for position, post_op in enumerate(chain):
            last = position == len(chain) - 1
            extra_map = {}
            if post_op.target in ADD and fusion.quantize_extra_input and static:
                previous = chain[position - 1] if position else node
                extra = next(a for a in post_op.args if a is not previous)
                extra_map[extra] = scheme.activation
            output = scheme.activation if last and fusion.quantize_output and static else None
            post_op.meta[ANNOTATION_KEY] = PatternAnnotation(
                input_qspec_map=extra_map, output_qspec=output, _annotated=True,
                _is_output_of_quantized_pattern=last)
            self.annotated_nodes[post_op.name] = fusion.name

    def _match_fusion(self, anchor: Node, scheme: QuantScheme):
        """The first fusion of the table whose post-ops follow `anchor`: (fusion, post-op nodes), or
        (None, []). Weight-only layers keep fp32 activations, so they have nothing to fuse."""
        if scheme.weight_only:
            return None, []
        weight = anchor.args[1] if len(anchor.args) > 1 else None
        if isinstance(weight, Node) and sum(user.target in RULE_BY_OP for user in weight.users) > 1:
            # A layer called at several sites (a reused module): plain annotation at each, as torchao
            # does. Inductor still fuses a linear's post-ops by pattern; the Q/DQ graph is the same.
            return None, []
        for fusion in FUSIONS:
            if anchor.target in fusion.anchor:
                chain = self._follow(anchor, fusion.post_ops)
                if chain is not None:
                    return fusion, chain
        return None, []

    def _follow(self, anchor: Node, steps) -> list[Node] | None:
        chain, current = [], anchor
        for step in steps:
            if len(current.users) != 1:
                return None  # the value is needed outside the fused kernel
            (user,) = current.users
            if user.op != "call_function" or user.target not in step or ANNOTATION_KEY in user.meta:
                return None
            if step is ADD:
                if len(user.args) != 2 or user.args[0] is user.args[1] or \
                        not all(is_float_tensor(a) for a in user.args) or \
                        user.args[0].meta["val"].shape != user.args[1].meta["val"].shape:
                    return None  # the fused "sum" takes a second tensor of the output's shape
            elif not user.args or user.args[0] is not current:
                return None
            if self._module_rule(user) is not self._module_rule(anchor):
                return None  # the post-op lives in a module configured apart from the layer
            chain.append(user)
            current = user
        return chain

    def _module_rule(self, node: Node):
        """The set_module_name rule (pattern, scheme) that decides `node`: the last one matching the name of
        a module the node lies in, or None."""
        stack = module_stack(node)
        found = None
        for rule in self.module_name_rules:
            if any(rule[0].fullmatch(fqn) for fqn, _ in stack):
                found = rule
        return found

    @staticmethod
    def _is_int8_output(node) -> bool:
        annotation = node.meta.get(ANNOTATION_KEY) if isinstance(node, Node) else None
        return bool(getattr(annotation, "_is_output_of_quantized_pattern", False))

    def _propagation_spec(self, node: Node):
        scheme = self.scheme_for(node)
        if scheme is None or scheme.weight_only or scheme.is_dynamic:
            return None
        return scheme.activation

    @staticmethod
    def _propagation_inputs(node: Node) -> list:
        return list(node.args[0]) if node.target is torch.ops.aten.cat.default else [node.args[0]]

    def _propagate_from_inputs(self, node: Node, rule) -> None:
        """torchao's recipe: an int8-in, int8-out op whose inputs are all outputs of quantized patterns
        runs in int8 (a flatten only when a quantizable op consumes it)."""
        if ANNOTATION_KEY in node.meta or not is_float_tensor(node):
            return
        spec = self._propagation_spec(node)
        inputs = self._propagation_inputs(node)
        if spec is None or not inputs or not all(is_float_tensor(i) and self._is_int8_output(i) for i in inputs):
            return
        if node.target is torch.ops.aten.flatten.using_ints and not any(
                user.op == "call_function" and user.target in RULE_BY_OP for user in node.users):
            return
        self._annotate_shared(node, rule, inputs, spec)

    def _propagate_from_users(self, node: Node, rule) -> None:
        """Quantize the input and share its qparams with the output, when a consumer wants int8."""
        if ANNOTATION_KEY in node.meta or not is_float_tensor(node):
            return
        wanted = [self._edge_spec(node, user) for user in node.users]
        wanted = [spec for spec in wanted if spec is not None and not spec.is_dynamic]
        inputs = self._propagation_inputs(node)
        if not wanted or not inputs or not all(is_float_tensor(i) for i in inputs):
            return
        self._annotate_shared(node, rule, inputs, wanted[0])

    def _annotate_shared(self, node: Node, rule, inputs: list, spec) -> None:
        """int8 in and out with one observer: the first input's, shared by the other inputs (cat) and
        the output."""
        first = inputs[0]
        shared = SharedQuantizationSpec((first, node))
        input_map = {first: spec}
        for other in inputs[1:]:
            input_map.setdefault(other, shared)  # cat([x, x]): one entry
        node.meta[ANNOTATION_KEY] = PatternAnnotation(
            input_qspec_map=input_map, output_qspec=shared, _annotated=True,
            _is_output_of_quantized_pattern=True)
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

"""SmoothQuant absorb-group analysis: which consumers share an input, and who can absorb its scale.

Finds, without changing the graph, every group of consumers (linear / conv with a constant weight)
reading one activation, and classifies the activation's producer:

- absorbing producers (the table `ABSORBERS`): LayerNorm / GroupNorm / BatchNorm (weight and bias),
  RMSNorm in the decomposed form Hugging Face exports (`mul` by a per-channel constant, including
  Gemma's `1 + weight`), the output rows of a Linear / Conv (also through ReLU / LeakyReLU, which
  commute with positive scales), and the `up` projection of a SwiGLU product `act(gate) * up`;
- otherwise (no producer, or the producer's output also reaches ops that cannot take the scale, as
  the residual adds of post-LN BERT) the group needs an explicit `mul` before its consumers.

Shape-only ops that keep the channel dim (views, reshapes, casts, eval dropout) are followed. The walk
runs on a networkx view of the graph. `report` is the list of `AbsorbGroup`s.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..graph import get_constant, is_float_tensor, module_fqn, tensor_meta, to_networkx
from ..quantizers.rules import CONV_OPS, LINEAR_OPS
from .manager import Pass

aten = torch.ops.aten


class Absorb(enum.Enum):
    AFFINE_ARGS = "affine_args"        # per-channel weight/bias arguments (norms)
    OUTPUT_ROWS = "output_rows"        # a Linear/Conv's output channels: weight rows and bias
    CONSTANT_OPERAND = "constant"      # mul by a per-channel constant (decomposed RMSNorm)
    LINEAR_OPERAND = "linear_operand"  # mul by a Linear's output (SwiGLU `up`): that Linear's rows


@dataclass(frozen=True)
class Absorber:
    name: str
    ops: frozenset
    how: Absorb
    channel_dim: int | None  # None: the last dim
    scaled_args: tuple[int, ...] = ()


ABSORBERS: tuple[Absorber, ...] = (
    Absorber("layer_norm", frozenset({aten.layer_norm.default}), Absorb.AFFINE_ARGS, None, (2, 3)),
    Absorber("rms_norm", frozenset({aten.rms_norm.default}), Absorb.AFFINE_ARGS, None, (2,)),
    Absorber("group_norm", frozenset({aten.group_norm.default}), Absorb.AFFINE_ARGS, 1, (2, 3)),
    Absorber("batch_norm", frozenset({aten.batch_norm.default}), Absorb.AFFINE_ARGS, 1, (1, 2)),
    Absorber("linear", LINEAR_OPS, Absorb.OUTPUT_ROWS, None),
    Absorber("conv", CONV_OPS, Absorb.OUTPUT_ROWS, 1),
    Absorber("rms_norm_mul", frozenset({aten.mul.Tensor}), Absorb.CONSTANT_OPERAND, None),
    Absorber("swiglu_up", frozenset({aten.mul.Tensor}), Absorb.LINEAR_OPERAND, None),
)

# Ops that pass values through unchanged per channel (any layout change keeps the channel dim).
_CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
                    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
                    aten.dropout.default})
_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
# Positive scales commute with these: relu(x / s) == relu(x) / s for s > 0.
_POSITIVE_HOMOGENEOUS = frozenset({aten.relu.default, aten.leaky_relu.default})


def consumer_channel_dim(consumer: Node) -> int:
    return -1 if consumer.target in LINEAR_OPS else 1


def _keeps_channel(node: Node, channel_dim: int) -> bool:
    """True when `node` passes its first argument through with the channel dim intact."""
    if node.op != "call_function":
        return False
    if node.target in _CASTS:
        return node.target is not aten.dropout.default or not (len(node.args) > 2 and node.args[2])
    if node.target in _RESHAPES and channel_dim == -1:
        before, after = tensor_meta(node.args[0]), tensor_meta(node)
        return before is not None and after is not None and before.shape[-1] == after.shape[-1]
    return False


@dataclass
class AbsorbGroup:
    """Consumers sharing one input, and where their SmoothQuant scale goes."""

    root: Node                      # the activation all consumers read (before any view)
    consumers: list[Node]
    channel_dim: int                # of the consumers' input: -1 (linear) or 1 (conv)
    channels: int
    producer: Node | None = None    # the absorbing node, None when an explicit mul is needed
    absorber: Absorber | None = None
    absorb_target: Node | None = None  # LINEAR_OPERAND: the Linear whose rows take the scale
    reason: str = ""                # why it is not absorbed (explicit mul) or skipped
    skipped: bool = False
    path: list[Node] = field(default_factory=list)  # nodes between producer and root (scale flows through)

    @property
    def absorbed(self) -> bool:
        return self.producer is not None

    @property
    def consumer_names(self) -> list[str]:
        return [module_fqn(c) or c.name for c in self.consumers]

    def describe_producer(self) -> str:
        node = self.producer or self.root
        fqn = module_fqn(node)
        kind = self.absorber.name if self.absorber else "explicit mul"
        return f"{kind}:{node.name}" + (f" ({fqn})" if fqn else "")


def constant_value(gm: GraphModule, node, _memo: dict | None = None) -> torch.Tensor | None:
    """Value of a node computed from constants only (get_attr, casts, arithmetic with scalars)."""
    if not isinstance(node, Node):
        return None
    direct = get_constant(gm, node)
    if direct is not None:
        return direct
    if node.op != "call_function" or not node.all_input_nodes:
        return None
    # Memoised and stopping at the first non-constant input: without both, the walk up a residual
    # stream revisits every diamond (add of two branches) and grows exponentially with depth.
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    memo[node] = None
    inputs = {}
    for arg in node.all_input_nodes:
        value = constant_value(gm, arg, memo)
        if value is None:
            return None
        inputs[arg] = value
    args = torch.fx.node.map_arg(node.args, lambda n: inputs[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: inputs[n])
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    memo[node] = value if isinstance(value, torch.Tensor) else None
    return memo[node]


class SmoothQuantGroups(Pass):
    """Analysis pass (does not modify the graph). See the module docstring."""

    name = "smooth_quant_groups"

    def __init__(self) -> None:
        self.report: list[AbsorbGroup] = []

    # -- consumers and roots ----------------------------------------------------------------------
    @staticmethod
    def _is_consumer(gm: GraphModule, node: Node) -> bool:
        if node.op != "call_function" or node.target not in LINEAR_OPS | CONV_OPS:
            return False
        weight = get_constant(gm, node.args[1])
        if weight is None or not is_float_tensor(node.args[0]) or get_constant(gm, node.args[0]) is not None:
            return False
        groups = node.args[6] if node.target in CONV_OPS and len(node.args) > 6 else 1
        return groups == 1

    @staticmethod
    def _root(consumer: Node) -> Node:
        node, channel_dim = consumer.args[0], consumer_channel_dim(consumer)
        while _keeps_channel(node, channel_dim):
            node = node.args[0]
        return node

    # -- producer search --------------------------------------------------------------------------
    def _blocking_use(self, flow: nx.DiGraph, start: Node, consumers: list[Node], channel_dim: int) -> Node | None:
        """None when every use of `start` reaches the group's consumers (as their activation) through
        channel-keeping ops only, so scaling `start` changes nothing else; else the first other op."""
        targets = {(c.args[0], c) for c in consumers}
        frontier, seen = [start], {start}
        while frontier:
            node = frontier.pop()
            for user_name in flow.successors(node.name):
                user = flow.nodes[user_name]["node"]
                if (node, user) in targets and user.args[0] is node:
                    continue
                if _keeps_channel(user, channel_dim) and user.args[0] is node:
                    if user not in seen:
                        seen.add(user)
                        frontier.append(user)
                    continue
                return user
        return None

    def _find_producer(self, gm: GraphModule, flow: nx.DiGraph, group: AbsorbGroup) -> None:
        if group.root.op == "placeholder":
            group.reason = f"graph input {group.root.name}: no producer to absorb the scale"
            return
        blocker = self._blocking_use(flow, group.root, group.consumers, group.channel_dim)
        if blocker is not None:
            group.reason = f"{group.root.name} also feeds {blocker.name}, which cannot take the scale"
            return
        node, path = group.root, []
        while node.op == "call_function" and node.target in _POSITIVE_HOMOGENEOUS:
            path.append(node)
            node = node.args[0]
            if len(node.users) != 1:
                group.reason = f"{node.name} feeds {path[-1].name} and other ops"
                return
        for absorber in ABSORBERS:
            if node.op != "call_function" or node.target not in absorber.ops:
                continue
            if not self._channel_matches(absorber, group):
                continue
            target = self._absorb_target(gm, node, absorber, group)
            if target is False:
                continue
            group.producer, group.absorber, group.path = node, absorber, path
            group.absorb_target = target if isinstance(target, Node) else None
            return
        group.reason = f"producer {node.name} ({node.target}) cannot absorb a per-channel scale"

    @staticmethod
    def _channel_matches(absorber: Absorber, group: AbsorbGroup) -> bool:
        if absorber.channel_dim is None:
            return group.channel_dim == -1
        return absorber.channel_dim == group.channel_dim

    def _absorb_target(self, gm: GraphModule, node: Node, absorber: Absorber, group: AbsorbGroup):
        """False when `node` cannot absorb; else True or the Linear node that takes the rows."""
        channels = group.channels
        if absorber.how is Absorb.AFFINE_ARGS:
            if absorber.name in ("layer_norm", "rms_norm"):
                shape = node.args[1]
                if list(shape) != [channels]:
                    return False
            for index in absorber.scaled_args:
                arg = node.args[index] if index < len(node.args) else None
                if arg is not None and get_constant(gm, arg) is None:
                    return False
            return True
        if absorber.how is Absorb.OUTPUT_ROWS:
            weight = get_constant(gm, node.args[1])
            bias = node.args[2] if len(node.args) > 2 else None
            groups = node.args[6] if node.target in CONV_OPS and len(node.args) > 6 else 1
            return (weight is not None and weight.shape[0] == channels and groups == 1
                    and (bias is None or get_constant(gm, bias) is not None))
        if absorber.how is Absorb.CONSTANT_OPERAND:
            for operand in node.args[:2]:
                value = constant_value(gm, operand)
                if value is not None and value.numel() == channels and value.shape[-1] == channels:
                    return True
            return False
        if absorber.how is Absorb.LINEAR_OPERAND:
            for operand in node.args[:2]:
                if isinstance(operand, Node) and operand.target in LINEAR_OPS and len(operand.users) == 1:
                    weight = get_constant(gm, operand.args[1])
                    bias = operand.args[2] if len(operand.args) > 2 else None
                    if weight is not None and weight.shape[0] == channels and \
                            (bias is None or get_constant(gm, bias) is not None):
                        return operand
            return False
        return False

    # -- pass entry -------------------------------------------------------------------------------
    def call(self, graph_module: GraphModule) -> PassResult:
        flow = to_networkx(graph_module.graph)
        by_root: dict[Node, AbsorbGroup] = {}
        for node in graph_module.graph.nodes:
            if not self._is_consumer(graph_module, node):
                continue
            root = self._root(node)
            channel_dim = consumer_channel_dim(node)
            value = tensor_meta(root)
            channels = value.shape[channel_dim] if value is not None else None
            group = by_root.get(root)
            if group is None:
                group = by_root[root] = AbsorbGroup(root, [], channel_dim, channels)
            elif group.channel_dim != channel_dim:
                group.skipped, group.reason = True, "linear and conv consumers share one input"
            group.consumers.append(node)
        for group in by_root.values():
            if group.skipped:
                continue
            if group.channels is None or tensor_meta(group.root) is None:
                group.skipped, group.reason = True, "input shape unknown"
                continue
            self._find_producer(graph_module, flow, group)
        self.report = list(by_root.values())
        return PassResult(graph_module, False)

"""Fold a weight computed from constants (weight norm, other parametrizations) into a plain constant.

`torch.nn.utils.parametrizations.weight_norm` (and the older hook-based `weight_norm`, spectral norm,
any `register_parametrization`) exports as ops that rebuild the weight on every call:
`conv1d(x, _weight_norm(v, g, dim), bias)`. Nothing quantizes a computed weight, so such layers stayed
float (the positional conv of speech encoders). This pass evaluates, once, every weight argument of a
weighted op (graph.WEIGHT_ARGUMENTS: linear, convolutions, addmm, ...) that is computed from
constants only, stores the result as a new constant and points the op at it. The parametrization's own
tensors stay (other users may read them); the user's module is not touched.

Left alone: weights that depend on an input, chains of views / transposes of one constant (they cost
no compute, and MatmulToLinear reads them as they are), and anything with a random op. Not for QAT
graphs (the quantizer does not run it there): training must keep updating the parametrization's tensors.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassResult

from ..graph import VIEW_OPS, WEIGHT_ARGUMENTS, add_constant, get_constant
from .manager import Pass

_RANDOM = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial")


def _closure(node: Node) -> list[Node] | None:
    """The call_function nodes `node` is computed from, producers first, if only constants feed them.
    Iterative (a weight may sit thousands of nodes deep: a recursive walk ran out of stack); stops at
    the first input, random op or other node that is not a constant."""
    order: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        current, inputs_done = stack.pop()
        if inputs_done:
            order.append(current)
            continue
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            continue
        if current.op != "call_function" or any(word in str(current.target) for word in _RANDOM):
            return None
        stack.append((current, True))
        stack.extend((arg, False) for arg in reversed(current.all_input_nodes) if arg not in seen)
    return order


def _candidates(graph_module: GraphModule):
    """(weighted op, its weight node, the nodes computing it) for each weight this pass folds."""
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in WEIGHT_ARGUMENTS:
            continue
        position = WEIGHT_ARGUMENTS[node.target][-1]  # the weight's place (addmm: mat2, mm / matmul: the right)
        if position >= len(node.args) or not isinstance(node.args[position], Node):
            continue
        weight = node.args[position]
        computed = _closure(weight)
        if computed and not all(n.target in VIEW_OPS for n in computed):
            yield node, weight, computed


class FoldConstantWeights(Pass):
    """See the module docstring. `report` lists (weighted op name, folded weight node name)."""

    name = "fold_constant_weights"

    def __init__(self) -> None:
        self.report: list[tuple[str, str]] = []

    @staticmethod
    def applies(graph_module: GraphModule) -> bool:
        """Whether the graph has a weight to fold (callers leave the pass out of a pipeline otherwise, so
        the dump tool shows it only where it acts)."""
        return next(_candidates(graph_module), None) is not None

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = []
        graph = graph_module.graph
        dead: list[Node] = []
        for node, weight, computed in _candidates(graph_module):
            values: dict[Node, object] = {}

            def lookup(arg: Node):
                return values[arg] if arg in values else get_constant(graph_module, arg)

            with torch.no_grad():
                for step in computed:
                    values[step] = step.target(*map_arg(step.args, lookup), **map_arg(step.kwargs, lookup))
            folded = values[weight]
            if not isinstance(folded, torch.Tensor):
                continue
            name = add_constant(graph_module, f"{weight.name}_folded", folded.detach().clone())
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            constant.meta["val"] = weight.meta.get("val")
            node.replace_input_with(weight, constant)
            self.report.append((node.name, weight.name))
            dead.extend(computed)
        if not self.report:
            return PassResult(graph_module, False)
        for step in reversed(list(dict.fromkeys(dead))):  # the ops nothing reads any more, consumers first
            if not step.users:
                graph.erase_node(step)
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

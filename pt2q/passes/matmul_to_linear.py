"""Rewrite `addmm(bias, x, W)` / `mm(x, W)` with a constant weight into `linear(x, W^T, bias)`.

Hugging Face GPT-2's `Conv1D` stores its weight as [in, out] and exports as `addmm`; rewritten as
`linear`, one quantizer rule covers it and Inductor's int8 linear kernels (which expect weights as
[out, in], per output channel) apply. The transposed weight is a new tensor: the user's parameter is
never touched. A weight already transposed in the graph (`t`/`permute`/`transpose` of a constant) is
used as stored, without a copy.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..graph import add_constant, get_constant
from .manager import Pass

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


def _is_2d_transpose(node: Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]


class MatmulToLinear(Pass):
    """See the module docstring. `report` lists the rewritten node names."""

    name = "matmul_to_linear"

    def __init__(self) -> None:
        self.report: list[str] = []

    def _linear_weight(self, gm: GraphModule, weight: Node, user: Node) -> Node | None:
        """A node holding the weight as [out, in], or None when `weight` is not a 2-D constant."""
        if (isinstance(weight, Node) and weight.op == "call_function" and weight.target in _TRANSPOSES
                and _is_2d_transpose(weight)):
            stored = get_constant(gm, weight.args[0])
            if stored is not None and stored.dim() == 2:
                return weight.args[0]
        stored = get_constant(gm, weight)
        if stored is None or stored.dim() != 2:
            return None
        name = add_constant(gm, f"{weight.target}_linear", stored.detach().t().contiguous())
        with gm.graph.inserting_before(user):
            new_weight = gm.graph.get_attr(name)
        new_weight.meta["val"] = weight.meta["val"].t().contiguous() if "val" in weight.meta else None
        return new_weight

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = []
        for node in list(graph_module.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.addmm.default and not node.kwargs:
                bias, x, weight = node.args[:3]
            elif node.target is aten.mm.default:
                (x, weight), bias = node.args[:2], None
            else:
                continue
            if not isinstance(x, Node) or get_constant(graph_module, x) is not None:
                continue
            linear_weight = self._linear_weight(graph_module, weight, node)
            if linear_weight is None:
                continue
            with graph_module.graph.inserting_before(node):
                linear = graph_module.graph.call_function(aten.linear.default, (x, linear_weight, bias))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            graph_module.graph.erase_node(node)
            if isinstance(weight, Node) and weight.op == "call_function" and not weight.users:
                graph_module.graph.erase_node(weight)  # the old transpose of the weight
            self.report.append(linear.name)
        return PassResult(graph_module, bool(self.report))

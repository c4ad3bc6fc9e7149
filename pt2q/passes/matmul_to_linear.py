"""Rewrite matmuls by a constant 2-D weight into `linear(x, W, bias)`, whatever their spelling:
`addmm(bias, x, W)`, `mm(x, W)`, `matmul(x, W)` (`x @ W`, `x @ W.T`, `x @ W.t()`, `x @ W.transpose(0, 1)`)
and two-operand `einsum` whose constant operand is contracted with x's last dimension
("bsi,oi->bso", "...i,io->...o").

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
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _is_2d_transpose(node: Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
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
            if stored is not None and stored.dim() == 2 and stored.is_floating_point():
                return weight.args[0]
        stored = get_constant(gm, weight)
        if stored is None or stored.dim() != 2 or not stored.is_floating_point():
            return None
        name = add_constant(gm, f"{weight.target}_linear", stored.detach().t().contiguous())
        with gm.graph.inserting_before(user):
            new_weight = gm.graph.get_attr(name)
        new_weight.meta["val"] = weight.meta["val"].t().contiguous() if "val" in weight.meta else None
        return new_weight

    def _einsum_weight(self, gm: GraphModule, node: Node) -> tuple[Node, Node] | None:
        """(x, a node holding the weight as [out, in]) for a linear spelled as einsum, or None."""
        equation, operands = node.args[0], node.args[1]
        if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
            return None
        inputs, output = equation.replace(" ", "").split("->")
        terms = inputs.split(",")
        constant = [i for i, operand in enumerate(operands) if get_constant(gm, operand) is not None]
        if len(terms) != 2 or len(constant) != 1:
            return None
        w_index = constant[0]
        x, weight, x_term, w_term = operands[1 - w_index], operands[w_index], terms[1 - w_index], terms[w_index]
        if len(w_term) != 2 or "." in w_term or not x_term or x_term[-1] not in w_term:
            return None
        contracted = x_term[-1]
        kept = w_term.replace(contracted, "")
        if len(kept) != 1 or kept in x_term or output != x_term[:-1] + kept or x_term.count(contracted) != 1:
            return None
        if w_term == kept + contracted:      # stored [out, in]: as linear takes it
            return x, weight
        return x, self._linear_weight(gm, weight, node)  # stored [in, out]: transposed once

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = []
        for node in list(graph_module.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.einsum.default:
                found = self._einsum_weight(graph_module, node)
                if found is None:
                    continue
                (x, linear_weight), bias, weight = found, None, None
                if not isinstance(x, Node) or linear_weight is None:
                    continue
                self._replace(graph_module, node, x, linear_weight, bias, weight)
                continue
            if node.target is aten.addmm.default and not node.kwargs:
                bias, x, weight = node.args[:3]
            elif node.target in (aten.mm.default, aten.matmul.default):
                (x, weight), bias = node.args[:2], None
            else:
                continue
            if not isinstance(x, Node) or get_constant(graph_module, x) is not None:
                continue
            linear_weight = self._linear_weight(graph_module, weight, node)
            if linear_weight is None:
                continue
            self._replace(graph_module, node, x, linear_weight, bias, weight)
        return PassResult(graph_module, bool(self.report))

    def _replace(self, graph_module: GraphModule, node: Node, x: Node, linear_weight: Node, bias, weight) -> None:
        with graph_module.graph.inserting_before(node):
            linear = graph_module.graph.call_function(aten.linear.default, (x, linear_weight, bias))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph_module.graph.erase_node(node)
        if isinstance(weight, Node) and weight.op == "call_function" and not weight.users:
            graph_module.graph.erase_node(weight)  # the old transpose of the weight
        self.report.append(linear.name)

"""Rewrite `quantized_decomposed.choose_qparams.tensor` (dynamic activations) into ATen ops that put 0
inside the range, as the op itself does, before Inductor compiles the graph.

Why: torch 2.13's Inductor decomposes `choose_qparams.tensor` with the tensor's own [min, max]
(torch/_inductor/decomposition.py), while the op (torch.ao `determine_qparams`) widens the range to
include 0. For an activation that is all positive (a mean, an average pool, abs) or all negative, the
compiled scale is then `(max - min) / 255` with the zero point clamped to 0, every value above
`max - min` saturates, and the compiled model differs from its own Q/DQ graph: 0.42 relative error on a
linear after `mean((2, 3))`. The ATen ops below compute what the op computes, and Inductor compiles them
as written; its int8 patterns only look at the scale and zero point the dequantize receives, so the same
int8 kernels are chosen. Pinned by tests/passes/test_dynamic_qparams_include_zero.py: when Inductor's
decomposition widens the range itself, the test of the upstream behaviour fails and this pass can go.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .manager import Pass

aten = torch.ops.aten
CHOOSE_QPARAMS = torch.ops.quantized_decomposed.choose_qparams.tensor


class DynamicQparamsIncludeZero(Pass):
    """See the module docstring. `report` lists the rewritten node names."""

    name = "dynamic_qparams_include_zero"

    def __init__(self) -> None:
        self.report: list[str] = []

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = []
        graph = graph_module.graph
        for node in list(graph.find_nodes(op="call_function", target=CHOOSE_QPARAMS)):
            x, quant_min, quant_max, eps, _dtype = node.args
            users = list(node.users)
            if not all(user.target is operator.getitem for user in users):
                continue  # the tuple escapes as a whole: leave it to the op
            with graph.inserting_before(node):
                low_high = graph.call_function(aten.aminmax.default, (x,))
                low = graph.call_function(aten.clamp_max.default,
                                          (graph.call_function(operator.getitem, (low_high, 0)), 0.0))
                high = graph.call_function(aten.clamp_min.default,
                                           (graph.call_function(operator.getitem, (low_high, 1)), 0.0))
                span = graph.call_function(aten.sub.Tensor, (high, low))
                scale = graph.call_function(aten.clamp_min.default, (
                    graph.call_function(aten.div.Tensor, (span, float(quant_max - quant_min))), float(eps)))
                shift = graph.call_function(aten._to_copy.default, (
                    graph.call_function(aten.round.default, (graph.call_function(aten.div.Tensor, (low, scale)),)),),
                    {"dtype": torch.int32})
                zero_point = graph.call_function(aten.clamp.default, (
                    graph.call_function(aten.rsub.Scalar, (shift, quant_min)), quant_min, quant_max))
                outputs = (graph.call_function(aten._to_copy.default, (scale,), {"dtype": torch.float64}),
                           graph.call_function(aten._to_copy.default, (zero_point,), {"dtype": torch.int64}))
            for user in users:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
            self.report.append(node.name)
        return PassResult(graph_module, bool(self.report))

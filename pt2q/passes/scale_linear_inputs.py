"""Multiply the input of groups of linears by a per-channel constant: `linear(x, W)` -> `linear(x * c, W)`.

AWQ scales a group's weights by `s` (input columns) and needs the group's input divided by `s`. When no
producer can absorb `1/s` (its output also feeds a residual, or it is not an affine op), the factor
`c = 1/s` is an explicit `mul` on the last dim, one per distinct input node of the group.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..graph import add_constant
from .manager import Pass

aten = torch.ops.aten


class ScaleLinearInputs(Pass):
    """`factors`: {(linear node names...): factor vector [in]}. `report`: the inserted mul node names."""

    name = "scale_linear_inputs"

    def __init__(self, factors: dict[tuple[str, ...], torch.Tensor]):
        self.factors = factors
        self.report: list[str] = []

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = []
        graph = graph_module.graph
        by_name = {node.name: node for node in graph.nodes}
        order = {node: index for index, node in enumerate(graph.nodes)}
        for names, factor in self.factors.items():
            consumers = [by_name[name] for name in names]
            if any(c.target is not aten.linear.default for c in consumers):
                raise ValueError(f"scale_linear_inputs: {names} are not all linears")
            scaled: dict = {}
            for consumer in consumers:
                x = consumer.args[0]
                if x not in scaled:
                    # Before the first consumer that reads `x` (x is defined before it; an input of another
                    # consumer of the group may be defined only after the group's first consumer).
                    first = min((c for c in consumers if c.args[0] is x), key=order.__getitem__)
                    with graph.inserting_before(first):
                        constant = graph.get_attr(add_constant(graph_module, f"{consumer.name}_input_scale",
                                                               factor.detach().clone().to(torch.float32)))
                        scaled[x] = graph.call_function(aten.mul.Tensor, (x, constant))
                    scaled[x].meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")}
                    scaled[x].meta["nn_module_stack"] = dict(consumer.meta.get("nn_module_stack", {}))
                    self.report.append(scaled[x].name)
                consumer.replace_input_with(x, scaled[x])
        return PassResult(graph_module, bool(self.report))

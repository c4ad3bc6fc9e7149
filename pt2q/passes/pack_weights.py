"""Rewrite `linear(x, W, b)` into `linear(x, pt2q.dequantize_weight(packed, scale, zero_point, table, ...), b)`.

Takes the quantized weights an algorithm produced (`{linear node name: QuantizedWeight}`) and writes each
into the graph as constants (packed codes, scales, zero points or the code table) feeding one
`pt2q.dequantize_weight` node (pt2q/ops.py) that replaces the float weight input. The float weight is
dropped from the module once no node uses it, so the saved archive holds only the packed form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..graph import add_constant, drop_unused_attribute
from ..ops import DEQUANTIZE_WEIGHT
from .manager import Pass


@dataclass
class PackReport:
    """Per rewritten linear: its bits, group size, float bytes and packed bytes."""

    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def float_bytes(self) -> int:
        return sum(layer["float_bytes"] for layer in self.layers.values())

    @property
    def packed_bytes(self) -> int:
        return sum(layer["packed_bytes"] for layer in self.layers.values())

    def summary(self) -> str:
        return (f"pack_weights: {len(self.layers)} weights packed, {self.float_bytes} float bytes -> "
                f"{self.packed_bytes} packed")

    def lines(self) -> list[str]:
        return [f"  {name}: {layer['bits']}-bit {layer['dtype']} {'sym' if layer['sym'] else 'asym'} "
                f"g{layer['group_size']}, {layer['float_bytes']} -> {layer['packed_bytes']} bytes"
                for name, layer in self.layers.items()]


class PackWeights(Pass):
    """See the module docstring."""

    name = "pack_weights"

    def __init__(self, quantized: dict):
        self.quantized = quantized
        self.report = PackReport()

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = PackReport()
        graph = graph_module.graph
        by_name = {node.name: node for node in graph.nodes}
        for node_name, qweight in self.quantized.items():
            linear = by_name.get(node_name)
            if linear is None:
                raise KeyError(f"pack_weights: no node {node_name!r} in the graph")
            weight = linear.args[1]
            hint = f"{weight.target}_q{qweight.fmt.bits}"
            with graph.inserting_before(linear):
                inputs = [graph.get_attr(add_constant(graph_module, f"{hint}_packed", qweight.packed())),
                          graph.get_attr(add_constant(graph_module, f"{hint}_scale", qweight.scale))]
                inputs.append(None if qweight.zero_point is None else
                              graph.get_attr(add_constant(graph_module, f"{hint}_zero_point", qweight.zero_point)))
                table = qweight.fmt.code_table
                inputs.append(None if table is None else
                              graph.get_attr(add_constant(graph_module, f"{hint}_code_table", table)))
                dequantize = graph.call_function(
                    DEQUANTIZE_WEIGHT, (*inputs, qweight.fmt.bits, qweight.fmt.group_size, list(qweight.shape),
                                        qweight.fmt.group_dim))
            if "val" in weight.meta:
                dequantize.meta["val"] = weight.meta["val"]
            dequantize.meta["nn_module_stack"] = dict(linear.meta.get("nn_module_stack", {}))
            dequantize.meta[meta.WEIGHT_FORMAT] = qweight.fmt
            linear.replace_input_with(weight, dequantize)
            if not weight.users:
                target = weight.target
                graph.erase_node(weight)
                drop_unused_attribute(graph_module, target)
            self.report.layers[node_name] = {
                "bits": qweight.fmt.bits, "group_size": qweight.fmt.group_size, "dtype": qweight.fmt.dtype,
                "sym": qweight.fmt.sym, "float_bytes": 4 * torch.Size(qweight.shape).numel(),
                "packed_bytes": qweight.num_bytes}
        return PassResult(graph_module, bool(self.quantized))

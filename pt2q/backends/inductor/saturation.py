"""Which int8 layers of a Q/DQ graph oneDNN would compute wrongly on a CPU without VNNI.

oneDNN's int8 GEMM/conv on such CPUs add u8 x s8 product pairs in saturating int16 (see pt2q.isa). A
layer is at risk when its activation range and weight range allow a pair sum above 2^15 - 1; the ranges
are read from the graph's own dequantize nodes, so this holds for graphs quantized by torchao too.
"""
from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule, Node

from ...isa import CpuIsa, detect, pair_sum_saturates
from ...quantizers import weighted_ops

_qd = torch.ops.quantized_decomposed
# dequantize op -> positions of (quant_min, quant_max) in its arguments
_RANGE_ARGS = {
    _qd.dequantize_per_tensor.default: (3, 4),
    _qd.dequantize_per_tensor.tensor: (3, 4),
    _qd.dequantize_per_channel.default: (4, 5),
}


class Int8SaturationWarning(UserWarning):
    """An int8 model will run on kernels that saturate on this CPU: compiled results differ from its
    Q/DQ graph. Re-quantize on this machine (saturation_guard="auto") to avoid it."""


def _range(node) -> tuple[int, int] | None:
    if not isinstance(node, Node) or node.target not in _RANGE_ARGS:
        return None
    low, high = _RANGE_ARGS[node.target]
    if len(node.args) <= high:
        return None
    return int(node.args[low]), int(node.args[high])


def saturating_layers(graph_module: GraphModule) -> list[str]:
    """Names of the int8 linear/conv nodes whose activation x weight pair sums can leave int16."""
    at_risk = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in weighted_ops() or len(node.args) < 2:
            continue
        activation, weight = _range(node.args[0]), _range(node.args[1])
        if activation is None or weight is None:
            continue  # fp32 activations (weight-only) or fp32 weights: no int8 GEMM
        span = activation[1] - activation[0]  # signed activations are shifted to unsigned by oneDNN
        magnitude = max(abs(weight[0]), abs(weight[1]))
        if pair_sum_saturates(span, magnitude):
            at_risk.append(node.name)
    return at_risk


def warn_if_saturating(graph_module: GraphModule, where: str, isa: CpuIsa | None = None,
                       built_on: str | None = None) -> list[str]:
    """Warn (Int8SaturationWarning) when this CPU's int8 kernels saturate and the graph has layers at
    risk. Returns those layers (empty where nothing saturates)."""
    isa = isa or detect()
    if not isa.int8_saturates or not isinstance(graph_module, GraphModule):
        return []
    layers = saturating_layers(graph_module)
    if layers:
        origin = f" (quantized for {built_on})" if built_on else ""
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        warnings.warn(
            f"{where}: {len(layers)} int8 layer(s){origin} use full-range activations and weights ({shown}); "
            f"this CPU's int8 kernels add product pairs in saturating int16 ({isa.int8_dot_product}, no VNNI), "
            "so compiled results will differ from the Q/DQ graph. Re-quantize here with "
            "saturation_guard='auto' (7-bit weights)", Int8SaturationWarning, stacklevel=3)
    return layers

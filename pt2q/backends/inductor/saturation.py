"""Which int8 layers of a Q/DQ graph oneDNN would compute wrongly on a CPU without VNNI.

oneDNN's int8 GEMM/conv on such CPUs add u8 x s8 product pairs in saturating int16 (see pt2q.isa). A
layer is at risk when its activation range and weight range allow a pair sum above 2^15 - 1; the ranges
are read from the graph's own dequantize nodes, so this holds for graphs quantized by torchao too.

One range is not what the graph says: when an int8 GEMM's output quantize is fused into it (Inductor's
`qlinear`/`qconv` with an int8 output, torch 2.13), the kernel clamps to the dtype's range and ignores
`quant_max`. A narrowed activation range (7-bit activations, torchao's reduce_range) produced that way
holds for inputs inside the calibrated range only, so it counts at the dtype's full span here.
"""
from __future__ import annotations

import warnings

import torch
from torch.fx import GraphModule, Node

from ...isa import CpuIsa, detect, pair_sum_saturates
from ...quantizers import weighted_ops

_qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
# dequantize op -> positions of (quant_min, quant_max) in its arguments
_RANGE_ARGS = {
    _qd.dequantize_per_tensor.default: (3, 4),
    _qd.dequantize_per_tensor.tensor: (3, 4),
    _qd.dequantize_per_channel.default: (4, 5),
}


# Ops Inductor fuses between an int8 GEMM and its output quantize (unary and binary post-ops).
_POST_OPS = frozenset({
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.hardtanh.default, aten.leaky_relu.default, aten.sigmoid.default,
    aten.tanh.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.add.Tensor, aten.add_.Tensor,
})
_DTYPE_SPAN = 255  # uint8 and int8 alike


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


def _is_int8_gemm(node) -> bool:
    return isinstance(node, Node) and node.target in weighted_ops() and len(node.args) > 1 \
        and _range(node.args[0]) is not None and _range(node.args[1]) is not None


def _output_of_fused_int8_gemm(dequantize: Node) -> bool:
    """Whether the static quantize behind `dequantize` reads an int8 GEMM, directly or through one
    post-op: the shape Inductor fuses into the GEMM, clamping to the dtype's range."""
    quantize = dequantize.args[0]
    if not isinstance(quantize, Node) or quantize.target is not _qd.quantize_per_tensor.default:
        return False
    producer = quantize.args[0]
    if _is_int8_gemm(producer):
        return True
    return isinstance(producer, Node) and producer.target in _POST_OPS and \
        any(_is_int8_gemm(arg) for arg in producer.args)


def saturating_layers(graph_module: GraphModule) -> list[str]:
    """Names of the int8 linear/conv nodes whose activation x weight pair sums can leave int16."""
    at_risk = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not _is_int8_gemm(node):
            continue
        activation, weight = _range(node.args[0]), _range(node.args[1])
        span = activation[1] - activation[0]  # signed activations are shifted to unsigned by oneDNN
        if span < _DTYPE_SPAN and _output_of_fused_int8_gemm(node.args[0]):
            span = _DTYPE_SPAN
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
            f"{where}: {len(layers)} int8 layer(s){origin} can multiply full-range activations by full-range "
            f"weights ({shown}); "
            f"this CPU's int8 kernels add product pairs in saturating int16 ({isa.int8_dot_product}, no VNNI), "
            "so compiled results will differ from the Q/DQ graph. Re-quantize here with "
            "saturation_guard='auto' (7-bit weights)", Int8SaturationWarning, stacklevel=3)
    return layers

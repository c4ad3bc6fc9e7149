"""pt2q's quantization parameters of a quantized model, per layer, as plain JSON-ready data.

`extract_quantities(qmodel)` reads a Q/DQ graph that `pt2q.quantize` / `pt2q.convert` returned (torchao's
convert_pt2e form) and gives, per quantized Linear / Conv module (its name as in `named_modules()`):

    {"module_class": "torch.nn.modules.linear.Linear",
     "input_scale": float, "input_zero_point": int,
     "input_dtype": "uint8" | "int8", "input_quant_min": int, "input_quant_max": int,
     "weight_scales": [float] * out_channels, "weight_zero_points": [int] * out_channels,
     "weight_quant_min": int, "weight_quant_max": int,
     "smooth_quant_scaling_factor": [float] * in_channels | None}

Conventions (pt2q's, see pt2q/passes/smooth_quant_apply.py): with SmoothQuant factor `s`, the layer
computes `(x / s) @ (W * s)^T`. `input_scale` / `input_zero_point` quantize `x / s` (what the graph's
quantize node sees) and `weight_scales` quantize `W * s` per output channel. A layer that SmoothQuant left
alone has `None`. (IPEX stores the activation factor as `1 / s` and the weight factor as `s`: the qconf
patcher converts, pt2q/backends/ipex/qconf.py.)

`save_quantities` / `load_quantities` write and read them as JSON, so the quantities can be taken in
pt2q's venv (torch 2.13) and used by the IPEX flow in IPEX's (torch 2.8). Only Linear / Conv layers that
are called as modules are listed: those are the entries IPEX records by module name.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ... import meta
from ...errors import Pt2qError
from ...graph import get_constant, module_stack
from ...quantizers import weighted_ops
from ...jsonfile import write_json_atomic

__all__ = ["QUANTITIES_FORMAT", "QuantitiesError", "extract_quantities", "load_quantities", "save_quantities",
           "validate_quantities"]

QUANTITIES_FORMAT = "pt2q-ipex-quantities/1"

_qd = torch.ops.quantized_decomposed
_INPUT_DEQUANTIZE = (_qd.dequantize_per_tensor.default, _qd.dequantize_per_tensor.tensor)
_WEIGHT_DEQUANTIZE_PER_CHANNEL = _qd.dequantize_per_channel.default
# Module classes whose calls IPEX records as quantized module entries (op_type_is_module = true).
LAYER_CLASSES = frozenset({
    "torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.conv.Conv3d",
})
_DTYPE_NAMES = {torch.uint8: "uint8", torch.int8: "int8"}
REQUIRED_FIELDS = ("input_scale", "input_zero_point", "input_dtype", "input_quant_min", "input_quant_max",
                   "weight_scales", "weight_zero_points", "weight_quant_min", "weight_quant_max",
                   "smooth_quant_scaling_factor")


class QuantitiesError(Pt2qError, ValueError):
    """pt2q's quantities cannot be taken from this model, or a quantities file is unreadable or malformed
    (the message names the layer or field)."""


def _scalar(graph_module: GraphModule, value, what: str) -> float:
    if isinstance(value, Node):
        tensor = get_constant(graph_module, value)
        if tensor is None or tensor.numel() != 1:
            raise QuantitiesError(f"{what}: expected a scalar constant, got node {value.name}")
        return tensor.item()
    return value


def _input_quantization(graph_module: GraphModule, dequantize: Node) -> dict[str, Any]:
    _, scale, zero_point, quant_min, quant_max, dtype = dequantize.args[:6]
    return {"input_scale": float(_scalar(graph_module, scale, f"{dequantize.name} scale")),
            "input_zero_point": int(_scalar(graph_module, zero_point, f"{dequantize.name} zero point")),
            "input_dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
            "input_quant_min": int(quant_min), "input_quant_max": int(quant_max)}


def _weight_quantization(graph_module: GraphModule, layer: str, dequantize: Node) -> dict[str, Any]:
    if dequantize.target is _WEIGHT_DEQUANTIZE_PER_CHANNEL:
        _, scales, zero_points, axis, quant_min, quant_max, _ = dequantize.args[:7]
        scale_tensor, zero_tensor = get_constant(graph_module, scales), get_constant(graph_module, zero_points)
        if scale_tensor is None or zero_tensor is None:
            raise QuantitiesError(f"{layer}: the weight's scales or zero points are not constants "
                                  f"({dequantize.name}); quantities are read from a converted model")
        if int(axis) != 0:
            raise QuantitiesError(f"{layer}: weight quantized along axis {axis}; IPEX takes per-output-channel "
                                  f"weight scales (axis 0)")
        weight_scales = [float(v) for v in scale_tensor.flatten().tolist()]
        weight_zero_points = [int(v) for v in zero_tensor.flatten().tolist()]
    else:  # per-tensor weight: one scale for every channel
        _, scale, zero_point, quant_min, quant_max, _ = dequantize.args[:6]
        weight_scales = [float(_scalar(graph_module, scale, f"{layer} weight scale"))]
        weight_zero_points = [int(_scalar(graph_module, zero_point, f"{layer} weight zero point"))]
    return {"weight_scales": weight_scales, "weight_zero_points": weight_zero_points,
            "weight_quant_min": int(quant_min), "weight_quant_max": int(quant_max)}


def _smooth_quant_factors(graph_module: GraphModule) -> dict[str, list[float]]:
    report = graph_module.meta.get(meta.SMOOTH_QUANT_REPORT)
    factors: dict[str, list[float]] = {}
    for group in getattr(report, "groups", []):
        if not isinstance(group.scale, torch.Tensor):
            continue
        values = [float(v) for v in group.scale.detach().float().flatten().tolist()]
        for consumer in group.consumers:
            factors[consumer] = values
    return factors


def extract_quantities(qmodel: GraphModule) -> dict[str, dict[str, Any]]:
    """{module name: quantities} for every int8 Linear / Conv module of a pt2q-quantized model (see the
    module docstring for the fields and their conventions). Reads the graph; changes nothing."""
    if not isinstance(qmodel, GraphModule) or not qmodel.meta.get(meta.QUANTIZED):
        raise QuantitiesError("extract_quantities needs the model pt2q.quantize (or pt2q.convert) returned; "
                              f"got {type(qmodel).__name__} without pt2q's quantized mark")
    factors = _smooth_quant_factors(qmodel)
    layers: dict[str, dict[str, Any]] = {}
    weighted = weighted_ops()
    for node in qmodel.graph.nodes:
        if node.op != "call_function" or node.target not in weighted or len(node.args) < 2:
            continue
        activation, weight = node.args[0], node.args[1]
        if not (isinstance(activation, Node) and activation.target in _INPUT_DEQUANTIZE):
            continue  # fp32 or weight-only layer: not a static int8 layer
        if not (isinstance(weight, Node) and (weight.target is _WEIGHT_DEQUANTIZE_PER_CHANNEL
                                              or weight.target in _INPUT_DEQUANTIZE)):
            continue
        stack = module_stack(node)
        if not stack or stack[-1][1] not in LAYER_CLASSES:
            continue  # a functional linear/conv: IPEX does not record it by module name
        name, module_class = stack[-1]
        entry = {"module_class": module_class, **_input_quantization(qmodel, activation),
                 **_weight_quantization(qmodel, name, weight),
                 "smooth_quant_scaling_factor": factors.get(name)}
        if name in layers and layers[name] != entry:
            raise QuantitiesError(f"{name} is called more than once with different quantization parameters; "
                                  f"IPEX's qconf matches layers by module name, so each call needs the same")
        layers[name] = entry
    if not layers:
        raise QuantitiesError("the model has no static int8 Linear / Conv module: nothing for IPEX to take "
                              "(quantize with pt2q.StaticQuantConfig)")
    return layers


def _finite_numbers(values, what: str, integer: bool = False) -> None:
    if not isinstance(values, list) or not values:
        raise QuantitiesError(f"{what}: expected a non-empty list of numbers, got {type(values).__name__}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
                not math.isfinite(value):
            raise QuantitiesError(f"{what}: {value!r} is not a finite {'integer' if integer else 'number'}")


def validate_quantities(quantities: dict) -> dict[str, dict[str, Any]]:
    """Check the fields of every layer (types, finiteness, positive scales); returns `quantities`."""
    if not isinstance(quantities, dict) or not quantities:
        raise QuantitiesError("quantities must be a non-empty dict {module name: fields}")
    for name, layer in quantities.items():
        if not isinstance(layer, dict):
            raise QuantitiesError(f"quantities[{name!r}]: expected a dict of fields, got {type(layer).__name__}")
        missing = [field for field in REQUIRED_FIELDS if field not in layer]
        if missing:
            raise QuantitiesError(f"quantities[{name!r}] lacks {', '.join(missing)}")
        _finite_numbers([layer["input_scale"]], f"quantities[{name!r}].input_scale")
        for field in ("input_zero_point", "input_quant_min", "input_quant_max", "weight_quant_min",
                      "weight_quant_max"):
            _finite_numbers([layer[field]], f"quantities[{name!r}].{field}", integer=True)
        _finite_numbers(layer["weight_scales"], f"quantities[{name!r}].weight_scales")
        _finite_numbers(layer["weight_zero_points"], f"quantities[{name!r}].weight_zero_points", integer=True)
        if len(layer["weight_zero_points"]) != len(layer["weight_scales"]):
            raise QuantitiesError(f"quantities[{name!r}]: {len(layer['weight_scales'])} weight scales but "
                                  f"{len(layer['weight_zero_points'])} weight zero points")
        scales = [layer["input_scale"], *layer["weight_scales"]]
        if layer["smooth_quant_scaling_factor"] is not None:
            _finite_numbers(layer["smooth_quant_scaling_factor"],
                            f"quantities[{name!r}].smooth_quant_scaling_factor")
            scales += layer["smooth_quant_scaling_factor"]
        if min(scales) <= 0:
            raise QuantitiesError(f"quantities[{name!r}]: scales and SmoothQuant factors must be positive")
    return quantities


def save_quantities(quantities: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Write `quantities` as JSON (with a format tag), atomically: the file is whole or not there."""
    validate_quantities(quantities)
    return write_json_atomic(path, {"format": QUANTITIES_FORMAT, "layers": quantities})


def load_quantities(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a file `save_quantities` wrote; raises QuantitiesError naming what is wrong with it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise QuantitiesError(f"cannot read pt2q quantities {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise QuantitiesError(f"{path} is not valid JSON (truncated?): {error}; write it again with "
                              f"save_quantities") from error
    if not isinstance(document, dict) or document.get("format") != QUANTITIES_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise QuantitiesError(f"{path}: format {found!r}, expected {QUANTITIES_FORMAT!r} (a file save_quantities "
                              f"wrote)")
    return validate_quantities(document.get("layers"))

"""Text dumps of FX graphs: one node per line, stable across runs (no addresses, no timings, floats rounded).

    name = op target(args) : dtype[shape]  {qparams / observer / SmoothQuant scale}  ann=<rule>

`snapshot(gm, ...)` turns a live graph into a `GraphSnapshot` (plain data: later passes may mutate the graph
in place, the snapshot does not change); `GraphSnapshot.text()` renders it and `unified_diff` compares two.
"""
from __future__ import annotations

import difflib
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .. import meta

qd = torch.ops.quantized_decomposed

_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}
_QSCHEMES = {
    torch.per_tensor_affine: "per_tensor_affine", torch.per_tensor_symmetric: "per_tensor_symmetric",
    torch.per_channel_affine: "per_channel_affine", torch.per_channel_symmetric: "per_channel_symmetric",
}
# get_attr buffers SmoothQuant creates: explicit `<node>_sq_inv_scale`, absorbed `<module>_sq`,
# `<module>_weight_sq`, `<module>_bias_sq` (add_constant appends `_<n>` when a name is taken).
_SQ_CONSTANT = re.compile(r"(_sq|_sq_inv_scale)(_\d+)?$")
SQ_INV_SCALE = re.compile(r"_sq_inv_scale(_\d+)?$")


def _scheme_parts(observer_or_spec) -> list[str]:
    """The qscheme and, per channel, the axis of an observer or a quantization spec."""
    qscheme = getattr(observer_or_spec, "qscheme", None)
    parts = [_QSCHEMES[qscheme]] if qscheme in _QSCHEMES else []
    axis = getattr(observer_or_spec, "ch_axis", None)
    if axis is not None and qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        parts.append(f"axis={axis}")
    return parts


def _ops(names: tuple[str, ...]) -> frozenset:
    found = set()
    for name in names:
        packet = getattr(qd, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            found.add(getattr(packet, overload))
    return frozenset(found)


QUANTIZE_OPS = _ops(("quantize_per_tensor", "quantize_per_channel", "quantize_per_token"))
DEQUANTIZE_OPS = _ops(("dequantize_per_tensor", "dequantize_per_channel", "dequantize_per_token"))
QPARAM_OPS = _ops(("choose_qparams", "choose_qparams_symmetric", "choose_qparams_per_token",
                   "choose_qparams_per_token_asymmetric"))
QDQ_OPS = QUANTIZE_OPS | DEQUANTIZE_OPS | QPARAM_OPS


# -- small formatters ---------------------------------------------------------------------------------
def fmt_float(value: float) -> str:
    """4 significant digits: stable across runs and machines for calibration-derived numbers."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = f"{value:.4g}"
    return "0" if text == "-0" else text


def fmt_dtype(dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fmt_tensor_type(value: torch.Tensor) -> str:
    return f"{fmt_dtype(value.dtype)}{fmt_shape(value.shape)}"


def target_name(node: Node) -> str:
    target = node.target
    if node.op in ("call_module", "get_attr", "placeholder", "output"):
        return str(target)
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    return f"{module}.{name}" if module else name


def short_target(node: Node) -> str:
    """`aten.linear.default` -> `linear`; `quantized_decomposed.quantize_per_tensor.default` ->
    `quantize_per_tensor`; other overloads keep their name (`add.Tensor`)."""
    if node.op != "call_function":
        return node.op
    text = target_name(node)
    parts = text.split(".")
    if isinstance(node.target, torch._ops.OpOverload) and len(parts) >= 3:
        return parts[-2] if parts[-1] == "default" else f"{parts[-2]}.{parts[-1]}"
    return parts[-1]


def fmt_arg(value: Any) -> str:
    if isinstance(value, Node):
        return value.name
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(fmt_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else (f"({inner},)" if len(value) == 1 else f"({inner})")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{fmt_arg(k)}: {fmt_arg(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor({fmt_tensor_type(value)})"
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return type(value).__name__  # never a default repr: it would carry a memory address


def tensor_stats(value: torch.Tensor) -> str:
    value = value.detach().float()
    if value.numel() == 1:
        return fmt_float(value.item())
    return f"n={value.numel()} min={fmt_float(value.min().item())} max={fmt_float(value.max().item())}"


def get_attr_value(gm: GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _constant(gm: GraphModule, arg):
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = get_attr_value(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return arg


# -- qparams ------------------------------------------------------------------------------------------
def _range_text(qmin, qmax) -> str:
    return f"[{fmt_arg(qmin)}, {fmt_arg(qmax)}]"


def qdq_text(gm: GraphModule, node: Node) -> str:
    """Scale / zero point / dtype / range of a quantize, dequantize or choose_qparams node."""
    name = short_target(node)
    args = list(node.args)
    if node.target in QPARAM_OPS:
        dtype = args[-1] if args and isinstance(args[-1], torch.dtype) else node.kwargs.get("dtype")
        return f"dynamic qparams {fmt_dtype(dtype) if dtype is not None else ''}".rstrip()
    if "per_channel" in name and len(args) >= 7:
        scales, zero_points = _constant(gm, args[1]), _constant(gm, args[2])
        axis, qmin, qmax, dtype = args[3:7]
        parts = [f"{fmt_dtype(dtype)} per-channel axis={axis}"]
        if isinstance(scales, torch.Tensor):
            parts.append(f"scale({tensor_stats(scales)})")
        if isinstance(zero_points, torch.Tensor):
            unique = torch.unique(zero_points.detach())
            parts.append(f"zp={fmt_arg(int(unique.item()))}" if unique.numel() == 1
                         else f"zp({tensor_stats(zero_points)})")
        parts.append(f"range={_range_text(qmin, qmax)}")
        return " ".join(parts)
    if len(args) >= 6:
        scale, zero_point, qmin, qmax, dtype = args[1:6]
        scale, zero_point = _constant(gm, scale), _constant(gm, zero_point)
        if isinstance(scale, Node) or isinstance(zero_point, Node):
            return f"{fmt_dtype(dtype)} dynamic range={_range_text(qmin, qmax)}"
        scale = scale.item() if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale
        zero_point = zero_point.item() if isinstance(zero_point, torch.Tensor) and zero_point.numel() == 1 \
            else zero_point
        scale_text = tensor_stats(scale) if isinstance(scale, torch.Tensor) else fmt_arg(scale)
        zp_text = tensor_stats(zero_point) if isinstance(zero_point, torch.Tensor) else fmt_arg(zero_point)
        return f"{fmt_dtype(dtype)} scale={scale_text} zp={zp_text} range={_range_text(qmin, qmax)}"
    return ""


def _is_calibrated(observer) -> bool:
    low = getattr(observer, "min_val", None)
    high = getattr(observer, "max_val", None)
    if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor) or low.numel() == 0:
        return False
    return bool(torch.isfinite(low).all() and torch.isfinite(high).all())


def observer_text(observer: torch.nn.Module, with_qparams: bool = True) -> str:
    """Class, dtype, scheme, observed range and (once calibrated) the qparams it gives."""
    from torchao.quantization.pt2e.observer import ObserverBase

    cls = type(observer).__name__
    if not isinstance(observer, ObserverBase):
        channels = getattr(observer, "min_val", None)
        if isinstance(channels, torch.Tensor):
            return f"{cls} channels={channels.numel()} absmax({tensor_stats(observer.absmax)})" \
                if hasattr(observer, "absmax") else cls
        return cls
    parts = [cls]
    dtype = getattr(observer, "dtype", None)
    if dtype is not None:
        parts.append(fmt_dtype(dtype))
    if getattr(observer, "is_dynamic", False):
        parts.append("dynamic")
        return " ".join(parts)
    parts.extend(_scheme_parts(observer))
    if not _is_calibrated(observer):
        parts.append("(not calibrated)")
        return " ".join(parts)
    low, high = observer.min_val.detach(), observer.max_val.detach()
    if low.numel() == 1:
        parts.append(f"min={fmt_float(low.item())} max={fmt_float(high.item())}")
    else:
        parts.append(f"n={low.numel()} min={fmt_float(low.min().item())} max={fmt_float(high.max().item())}")
    if with_qparams:
        try:
            scale, zero_point = observer.calculate_qparams()
        except Exception as error:  # noqa: BLE001 - a report line, never a crash of the dump
            parts.append(f"-> qparams unavailable ({type(error).__name__})")
        else:
            scale_text = fmt_float(scale.item()) if scale.numel() == 1 else f"({tensor_stats(scale)})"
            zp = torch.unique(zero_point)
            zp_text = str(int(zp.item())) if zp.numel() == 1 else f"({tensor_stats(zero_point)})"
            parts.append(f"-> scale={scale_text} zp={zp_text}")
    return " ".join(parts)


def annotation_text(node: Node) -> str:
    """The quantizer's annotation of `node`: the spec of each quantized input and of the output."""
    annotation = node.meta.get(meta.ANNOTATION)
    if annotation is None:
        return ""
    parts = []
    for arg, spec in getattr(annotation, "input_qspec_map", {}).items():
        parts.append(f"in {getattr(arg, 'name', fmt_arg(arg))}: {spec_text(spec)}")
    output = getattr(annotation, "output_qspec", None)
    if output is not None:
        parts.append(f"out: {spec_text(output)}")
    return "; ".join(parts)


def spec_text(spec) -> str:
    if spec is None:
        return "fp32"
    if hasattr(spec, "edge_or_node"):  # SharedQuantizationSpec
        edge = spec.edge_or_node
        if isinstance(edge, tuple):
            return "shared with " + "->".join(getattr(n, "name", "?") for n in edge)
        return f"shared with {getattr(edge, 'name', '?')}"
    parts = [fmt_dtype(getattr(spec, "dtype", None))]
    parts.extend(_scheme_parts(spec))
    if getattr(spec, "is_dynamic", False):
        parts.append("dynamic")
    ctr = getattr(spec, "observer_or_fake_quant_ctr", None)
    func = getattr(getattr(ctr, "p", None), "func", None)
    if func is not None:
        parts.append(getattr(func, "__name__", type(func).__name__))
    return " ".join(parts)


# -- snapshots ------------------------------------------------------------------------------------------
@dataclass
class NodeInfo:
    name: str
    op: str
    target: str
    short: str
    inputs: list[str]
    type_text: str
    info: str          # the {...} part: qparams, observer, SmoothQuant
    rule: str          # quantizer rule that annotated the node ('' if none)
    annotation: str    # full annotation text (HTML)
    category: str      # io | const | fp32 | int8 | qdq | observer | sq
    module: str
    line: str


@dataclass
class GraphSnapshot:
    index: int
    name: str
    nodes: list[NodeInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # footer lines (SmoothQuant groups, kernels)
    is_graph: bool = True

    @property
    def stem(self) -> str:
        return f"{self.index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.name)}"

    def text(self) -> str:
        header = f"# {self.stem}: {len(self.nodes)} nodes" if self.is_graph else f"# {self.stem}"
        lines = [header, *(n.line for n in self.nodes)]
        if self.notes:
            lines += ["", *self.notes] if self.nodes else self.notes
        return "\n".join(lines) + "\n"

    def node(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)


def _value_types(gm: GraphModule) -> dict[str, tuple]:
    """name -> (dtype, shape) for every tensor-valued node, from export metadata or inferred for the
    nodes passes add without it (observers, quantize/dequantize)."""
    types: dict[str, tuple] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            types[node.name] = (value.dtype, tuple(value.shape))
            continue
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            types[node.name] = tuple((v.dtype, tuple(v.shape)) for v in value)
            continue
        if node.op == "get_attr":
            constant = get_attr_value(gm, node.target)
            if isinstance(constant, torch.Tensor):
                types[node.name] = (constant.dtype, tuple(constant.shape))
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        source_type = types.get(source.name) if source is not None else None
        if not (isinstance(source_type, tuple) and len(source_type) == 2 and isinstance(source_type[0], torch.dtype)):
            continue
        if node.op == "call_module":
            if _is_observer_like(gm, node) is not None:
                types[node.name] = source_type
        elif node.target in QUANTIZE_OPS:
            dtype = next((a for a in reversed(node.args) if isinstance(a, torch.dtype)), None)
            types[node.name] = (dtype or torch.int8, source_type[1])
        elif node.target in DEQUANTIZE_OPS:
            types[node.name] = (node.kwargs.get("out_dtype") or torch.float32, source_type[1])
    return types


def _type_text(entry) -> str:
    if entry is None:
        return ""
    if isinstance(entry[0], torch.dtype):
        return f"{fmt_dtype(entry[0])}{fmt_shape(entry[1])}"
    return "(" + ", ".join(_type_text(e) for e in entry) + ")"


def _module_fqn(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _is_observer_like(gm: GraphModule, node: Node) -> torch.nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return None
    from torchao.quantization.pt2e.observer import ObserverBase

    if isinstance(module, ObserverBase) or type(module).__name__ == "ChannelRecorder":
        return module
    return None


def is_dequantized(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in DEQUANTIZE_OPS


def is_quantized_compute(node: Node) -> bool:
    """A call_function (not itself Q/DQ) reading at least one dequantized value."""
    if node.op != "call_function" or node.target in QDQ_OPS:
        return False
    return any(is_dequantized(arg) for arg in node.all_input_nodes)


def has_int8_weight(node: Node) -> bool:
    """linear/conv-like node whose weight (arg 1) is dequantized from an int8 constant."""
    if len(node.args) < 2 or not is_dequantized(node.args[1]):
        return False
    source = node.args[1].args[0] if node.args[1].args else None
    return isinstance(source, Node) and source.op == "get_attr"


def snapshot(gm: GraphModule, index: int, name: str, *, rules: dict[str, str] | None = None,
             with_qparams: bool = True) -> GraphSnapshot:
    """A plain-data picture of `gm` now: one NodeInfo (and text line) per node."""
    rules = rules or {}
    types = _value_types(gm)
    snap = GraphSnapshot(index, name)
    for node in gm.graph.nodes:
        info, category = "", "fp32"
        observer = _is_observer_like(gm, node)
        if node.op in ("placeholder", "output"):
            category = "io"
        elif node.op == "get_attr":
            category = "const"
            if _SQ_CONSTANT.search(str(node.target)):
                value = get_attr_value(gm, node.target)
                kind = "1/s" if SQ_INV_SCALE.search(str(node.target)) else "scaled"
                info = f"smooth_quant {kind}" + (f" ({tensor_stats(value)})" if SQ_INV_SCALE.search(
                    str(node.target)) and isinstance(value, torch.Tensor) else "")
        elif observer is not None:
            category = "observer"
            info = observer_text(observer, with_qparams=with_qparams)
        elif node.op == "call_function" and node.target in QDQ_OPS:
            category = "qdq"
            info = qdq_text(gm, node)
        elif node.op == "call_function":
            sq_arg = next((a for a in node.args if isinstance(a, Node) and a.op == "get_attr"
                           and SQ_INV_SCALE.search(str(a.target))), None)
            if sq_arg is not None:
                category = "sq"
                value = get_attr_value(gm, sq_arg.target)
                info = "smooth_quant x*(1/s)" + (f" 1/s({tensor_stats(value)})"
                                                if isinstance(value, torch.Tensor) else "")
            elif is_quantized_compute(node):
                category = "int8"
                info = "int8 weight" if has_int8_weight(node) else "dequantized input"
        annotated = meta.ANNOTATION in node.meta
        rule = rules.get(node.name, "annotated" if annotated else "")
        args = [fmt_arg(a) for a in node.args] + [f"{k}={fmt_arg(v)}" for k, v in node.kwargs.items()]
        type_text = _type_text(types.get(node.name))
        if node.op == "placeholder":
            head = f"{node.name} = placeholder"
        elif node.op == "get_attr":
            head = f"{node.name} = get_attr {node.target}"
        elif node.op == "output":
            head = f"output({', '.join(args)})"
        else:
            head = f"{node.name} = {node.op} {target_name(node)}({', '.join(args)})"
        line = head + (f" : {type_text}" if type_text else "") + (f"  {{{info}}}" if info else "") + \
            (f"  ann={rule}" if rule else "")
        snap.nodes.append(NodeInfo(
            name=node.name, op=node.op, target=target_name(node), short=short_target(node),
            inputs=[a.name for a in node.all_input_nodes], type_text=type_text, info=info, rule=rule,
            annotation=annotation_text(node) if annotated else "", category=category,
            module=_module_fqn(node), line=line))
    return snap


def graph_text(gm: GraphModule, name: str = "graph", index: int = 0, **options) -> str:
    """The text dump of one graph (see the module docstring)."""
    return snapshot(gm, index, name, **options).text()


def unified_diff(before: GraphSnapshot, after: GraphSnapshot) -> str:
    """Unified diff of two snapshots' texts, headed by their file names; a note when nothing changed."""
    # Nodes only: headers carry the stage names, notes are per-stage reports.
    old, new = [n.line for n in before.nodes], [n.line for n in after.nodes]
    lines = list(difflib.unified_diff(old, new, f"{before.stem}.txt", f"{after.stem}.txt", lineterm="", n=2))
    if not lines:
        return f"# {before.stem} -> {after.stem}: no change\n"
    return "\n".join(lines) + "\n"

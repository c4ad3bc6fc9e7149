"""Lower pt2q's FP8 Q/DQ graph to Gaudi's ops: `lower(qmodel, device)` runs the pass `LowerToHabana`.

The FP8 quantizer (pt2q/quantizers/fp8.py) writes, per layer:

    q  = pt2q.quantize_fp8(x, s, dtype, full_scale);  x' = pt2q.dequantize_fp8(q, s, float32)
    w' = pt2q.dequantize_fp8(w_fp8, s_w, float32)       (s_w: shape [] or [out, 1])
    y  = aten.linear(x', w', bias)    or   aten.matmul / aten.bmm(a', b')   (both activation pairs)

with `s = pt2q.choose_fp8_scale(x, full_scale)` in the dynamic mode. The lowered graph computes the same
numbers with the ops Gaudi runs (pt2q/backends/habana/ops.py has their HPU signatures):

    q  = getitem(cast_to_fp8_v2(x, 1/s, False, False, dtype, None), 0)   1/s: a constant (static), or
                                                                         aten.reciprocal(s) (dynamic)
    y  = fp8_gemm_v2(q, False, w_fp8, True, None, out_dtype, s, s_w, bias, False, None)      (linear; a
         per-channel s_w becomes the HPU form: [out] with B_scale_shape=[out])
    y  = fp8_gemm_v2(qa, False, qb, False, None, out_dtype, s_a, s_b, None, False, None)    (matmul, bmm)

and a dequantize whose value is also read by something else than a lowered GEMM becomes
`cast_from_fp8(q, s, out_dtype)`. Which node becomes which op is the table `LOWERINGS`. Every
`pt2q.quantize_fp8` / `pt2q.dequantize_fp8` is gone afterwards; `pt2q.choose_fp8_scale` stays (the
one definition of the dynamic scale, an op that runs on any device). A GEMM whose operands are not both
FP8 pairs, or whose scales have a layout fp8_gemm_v2 does not take, stays as it is, with the reason in
`LowerToHabana.report`.

Numerics. The lowered graph equals the Q/DQ graph bit for bit: the cast multiplies by the same
`torch.reciprocal(s)` that pt2q.fp8.quantize computes, saturates at the same full scale and rounds the
same way; the reference GEMM dequantizes both operands as dequantize_fp8 does and runs the same ATen
op (linear / matmul) on them. (A bf16 Q/DQ graph is the exception: its linear runs in bf16, the GEMM
in float32 with one rounding to bf16 at the end.)

Ops. `ops="reference"` emits `torch.ops.pt2q_gaudi2.*` / `pt2q_gaudi3.*` (CPU kernels, fake kernels:
the graph runs, exports and saves anywhere); `ops="hpu"` emits `torch.ops.hpu.*` and needs Habana's
PyTorch bridge (`habana_frameworks.torch`, imported here, only when asked); "auto" (default) takes
"hpu" when the bridge imports and "reference" otherwise. Move an HPU graph to the card with
`lowered.to("hpu")`. The op names are the HPU names either way.

Device. The cast saturates at the device's full scale (E4M3: 240 on Gaudi2, 448 on Gaudi3), so the
graph must have been quantized for a device with the same full scale: `device=None` takes the device
recorded by the quantizer (`meta["pt2q_fp8"]`), another device with a different full scale is refused,
and every quantize node's saturation and every FP8 weight's magnitude are checked against the device.
"""
from __future__ import annotations

import copy
import importlib
import logging
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ... import fp8, meta
from ...errors import BackendUnavailable, ConfigError, DeviceError
from ...graph import add_constant, drop_unused_attribute, get_constant, tensor_meta
from ...ops import CHOOSE_FP8_SCALE, DEQUANTIZE_FP8, QUANTIZE_FP8
from ...passes.manager import Pass, PassManager, PassResult
from . import ops as habana_ops

log = logging.getLogger(__name__)

aten = torch.ops.aten

__all__ = ["LOWERINGS", "OP_SETS", "HabanaLoweringReport", "Lowering", "LowerToHabana", "hpu_unavailable_reason",
           "lower", "lowered_device"]

OP_SETS = ("auto", "hpu", "reference")
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


@dataclass(frozen=True)
class Lowering:
    """One row of the table: the node `target` it rewrites (`pattern` says what it matches), the Gaudi op
    that replaces it, the LowerToHabana method that emits the call, and, for GEMMs, whether B is
    transposed (linear's weight is [out, in]) and where the op takes its bias."""

    pattern: str
    target: torch._ops.OpOverload
    hpu_op: str
    emit: str
    trans_B: bool = False
    bias_arg: int | None = None


# In this order: the GEMMs first take the FP8 operands of their dequantize inputs; the dequantize row
# then erases the dequantize nodes nothing reads any more and lowers the others; the quantize row last
# replaces the quantize nodes, which the GEMMs and casts now read.
LOWERINGS = (
    Lowering("linear(dequantize_fp8(x), dequantize_fp8(w), bias)", aten.linear.default, "fp8_gemm_v2",
             "_lower_gemm", trans_B=True, bias_arg=2),
    Lowering("matmul(dequantize_fp8(a), dequantize_fp8(b))", aten.matmul.default, "fp8_gemm_v2", "_lower_gemm"),
    Lowering("bmm(dequantize_fp8(a), dequantize_fp8(b))", aten.bmm.default, "fp8_gemm_v2", "_lower_gemm"),
    Lowering("dequantize_fp8 read by another op than a lowered GEMM", DEQUANTIZE_FP8, "cast_from_fp8",
             "_lower_dequantize"),
    Lowering("quantize_fp8", QUANTIZE_FP8, "cast_to_fp8_v2", "_lower_quantize"),
)


@dataclass
class HabanaLoweringReport:
    """What LowerToHabana did: per original node name, the Gaudi op that replaced it (`lowered`), and per
    GEMM left as it was, why (`kept`)."""

    device: str
    namespace: str
    lowered: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op_name in self.lowered.values():
            counts[op_name] = counts.get(op_name, 0) + 1
        return counts

    def summary(self) -> str:
        counts = ", ".join(f"{count} {name}" for name, count in sorted(self.counts().items())) or "nothing"
        kept = f"; {len(self.kept)} GEMM(s) kept" if self.kept else ""
        return f"Habana lowering for {self.device} (torch.ops.{self.namespace}): {counts}{kept}"

    def lines(self) -> list[str]:
        return [*(f"{name} -> {op_name}" for name, op_name in self.lowered.items()),
                *(f"{name} kept: {reason}" for name, reason in self.kept.items())]


def _check_device(device) -> str:
    if device not in habana_ops.DEVICES:
        raise DeviceError(f"Habana lowering: device={device!r} is not valid; valid: "
                          f"{', '.join(map(repr, habana_ops.DEVICES))}")
    return device


def _is_dequantize(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is DEQUANTIZE_FP8


def _argument(node: Node, position: int, name: str):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


class LowerToHabana(Pass):
    """Rewrites pt2q's FP8 Q/DQ ops and the linear / matmul / bmm layers they feed into Gaudi's
    cast_to_fp8_v2 / fp8_gemm_v2 / cast_from_fp8, row by row of `LOWERINGS` (see the module docstring),
    calling `torch.ops.<namespace>` ("pt2q_gaudi2" / "pt2q_gaudi3": the CPU reference ops; "hpu": Habana's).
    Raises ConfigError when a quantize node saturates, or an FP8 weight reaches, beyond `device`'s full
    scale (the graph was quantized for another device). `report` is a HabanaLoweringReport."""

    name = "lower_to_habana"

    def __init__(self, device: str, *, namespace: str | None = None):
        self.device = _check_device(device)
        self.namespace = namespace or habana_ops.NAMESPACES[device]
        self.ops = getattr(torch.ops, self.namespace)
        self.report = HabanaLoweringReport(self.device, self.namespace)

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = HabanaLoweringReport(self.device, self.namespace)
        self._constants: dict[tuple, Node] = {}  # (kind, source constant) -> the derived constant's node
        self._fake_mode = torch._guards.detect_fake_mode(
            [node.meta.get("val") for node in graph_module.graph.nodes])
        modified = False
        for row in LOWERINGS:
            for node in list(graph_module.graph.find_nodes(op="call_function", target=row.target)):
                modified |= getattr(self, row.emit)(graph_module, node, row)
        if modified:
            self._drop_unused_constants(graph_module)
        if self.report.kept:
            for name, reason in self.report.kept.items():
                log.info("pt2q habana: %s stays as it is: %s", name, reason)
        return PassResult(graph_module, modified)

    # -- the rows ------------------------------------------------------------------------------------
    def _lower_gemm(self, gm: GraphModule, node: Node, row: Lowering) -> bool:
        a_dequantize, b_dequantize = node.args[0], node.args[1]
        if not (_is_dequantize(a_dequantize) and _is_dequantize(b_dequantize)):
            if _is_dequantize(a_dequantize) or _is_dequantize(b_dequantize):
                self.report.kept[node.name] = "only one operand is an FP8 dequantize; fp8_gemm_v2 takes two"
            return False
        a_fp8, a_scale = a_dequantize.args[0], a_dequantize.args[1]
        b_fp8, b_scale = b_dequantize.args[0], b_dequantize.args[1]
        if self._elements(gm, a_scale) != 1:
            self.report.kept[node.name] = (f"the scale of {a_dequantize.name} is not per tensor; fp8_gemm_v2 is "
                                           "lowered with a per-tensor A_scale_inv")
            return False
        b_scale_shape = None
        b_elements = self._elements(gm, b_scale)
        if b_elements != 1:
            per_channel = self._per_channel_weight_scale(gm, node, row, b_dequantize)
            if per_channel is None:
                return False
            b_scale, b_scale_shape = per_channel
        for dequantize in (a_dequantize, b_dequantize):
            self._check_weight_range(gm, dequantize)
        output = tensor_meta(node)
        out_dtype = output.dtype if output is not None else _argument(a_dequantize, 2, "out_dtype")
        bias = _argument(node, row.bias_arg, "bias") if row.bias_arg is not None else None
        with gm.graph.inserting_before(node):
            gemm = self._call(gm, node, self.ops.fp8_gemm_v2.default,
                              (a_fp8, False, b_fp8, row.trans_B, None, out_dtype, a_scale, b_scale, bias, False,
                               b_scale_shape))
        node.replace_all_uses_with(gemm)
        gm.graph.erase_node(node)
        self.report.lowered[node.name] = row.hpu_op
        return True

    def _lower_dequantize(self, gm: GraphModule, node: Node, row: Lowering) -> bool:
        if not node.users:  # its GEMMs were lowered
            gm.graph.erase_node(node)
            return True
        self._check_weight_range(gm, node)
        fp8_input, scale, out_dtype = node.args[0], node.args[1], _argument(node, 2, "out_dtype")
        with gm.graph.inserting_before(node):
            cast = self._call(gm, node, self.ops.cast_from_fp8.default, (fp8_input, scale, out_dtype, None))
        node.replace_all_uses_with(cast)
        gm.graph.erase_node(node)
        self.report.lowered[node.name] = row.hpu_op
        return True

    def _lower_quantize(self, gm: GraphModule, node: Node, row: Lowering) -> bool:
        source, scale, dtype, saturation = (_argument(node, i, name) for i, name in
                                            enumerate(("input", "scale", "dtype", "saturation")))
        full_scale = fp8.full_scale(dtype, self.device)
        if saturation != full_scale:
            format_name = fp8.format_name(dtype).upper()
            raise ConfigError(
                f"Habana lowering: node {node.name!r} (pt2q.quantize_fp8, {format_name}) saturates at "
                f"{saturation}, but {self.device} saturates at {full_scale}: the model was quantized for another "
                f"device; quantize it again with pt2q.FP8Config(device={self.device!r})")
        if not node.users:
            gm.graph.erase_node(node)
            return True
        with gm.graph.inserting_before(node):
            scale_inverse = self._scale_inverse(gm, node, scale)
            cast = self._call(gm, node, self.ops.cast_to_fp8_v2.default,
                              (source, scale_inverse, False, False, dtype, None))
            fp8_value = self._call(gm, node, operator.getitem, (cast, 0))
        node.replace_all_uses_with(fp8_value)
        gm.graph.erase_node(node)
        self.report.lowered[node.name] = row.hpu_op
        return True

    # -- pieces --------------------------------------------------------------------------------------
    def _elements(self, gm: GraphModule, scale) -> int | None:
        """How many elements the scale node holds (a constant's, or the recorded value's), None if unknown."""
        if isinstance(scale, Node) and scale.target is CHOOSE_FP8_SCALE:
            return 1  # a run-time per-tensor scale, shape []
        value = get_constant(gm, scale)
        value = value if value is not None else tensor_meta(scale)
        return None if value is None else value.numel()

    def _per_channel_weight_scale(self, gm, node: Node, row: Lowering, dequantize: Node):
        """(B_scale_inv node, B_scale_shape) in the HPU form of a per-output-channel weight scale ([N],
        B_scale_shape [N]; one per scale constant, so tied weights share it), or None (recorded in the
        report) when the scale is not one."""
        scale = get_constant(gm, dequantize.args[1])
        weight = get_constant(gm, dequantize.args[0])
        # [out, 1] only: a 1-D [out] scale would broadcast along the weight's input columns in the Q/DQ graph
        if not row.trans_B or scale is None or weight is None or weight.dim() != 2 \
                or tuple(scale.shape) != (weight.shape[0], 1):
            self.report.kept[node.name] = (f"the scale of {dequantize.name} is neither per tensor nor one per "
                                           "output channel of a constant [out, in] weight")
            return None
        channels = weight.shape[0]
        key = ("per_column", dequantize.args[1].target)
        if key not in self._constants:
            self._constants[key] = self._constant(gm, f"{dequantize.args[1].target}_per_column",
                                                  scale.detach().reshape(channels).clone())
        return self._constants[key], [channels]

    def _check_weight_range(self, gm: GraphModule, dequantize: Node) -> None:
        """An FP8 constant beyond the device's full scale was cast for another device (Gaudi3's 448 on a
        Gaudi2): the card would not hold those values."""
        weight = get_constant(gm, dequantize.args[0])
        if weight is None or weight.dtype not in fp8.FP8_DTYPES.values() or weight.numel() == 0:
            return
        full_scale = fp8.full_scale(weight.dtype, self.device)
        largest = weight.detach().to(torch.float32).abs().max().item()
        if largest > full_scale:
            raise ConfigError(
                f"Habana lowering: the FP8 constant {dequantize.args[0].target!r} (read by {dequantize.name!r}) holds "
                f"{largest}, beyond {self.device}'s {fp8.format_name(weight.dtype).upper()} full scale {full_scale}: "
                f"the model was quantized for another device; quantize it again with "
                f"pt2q.FP8Config(device={self.device!r})")

    def _scale_inverse(self, gm: GraphModule, node: Node, scale) -> Node:
        """cast_to_fp8_v2's scale: 1 / the dequantize scale, a constant when the scale is one (one per
        scale constant), else computed in the graph."""
        constant = get_constant(gm, scale)
        if constant is None:
            return self._call(gm, node, aten.reciprocal.default, (scale,))
        key = ("inverse", scale.target)
        if key not in self._constants:
            # the same float32 reciprocal pt2q.fp8.quantize takes: the cast's input bits are the Q/DQ graph's
            inverse = torch.reciprocal(constant.detach().to(torch.float32))
            self._constants[key] = self._constant(gm, f"{scale.target}_inverse", inverse)
        return self._constants[key]

    def _constant(self, gm: GraphModule, name_hint: str, value: torch.Tensor) -> Node:
        """A new constant, read at the top of the graph: every node that shares it comes after it."""
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            node = gm.graph.get_attr(add_constant(gm, name_hint, value))
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(value, static_shapes=True)
        return node

    def _call(self, gm: GraphModule, replaced: Node, target, args: tuple) -> Node:
        """A call_function node for `target`, with the replaced node's source metadata and a fake value."""
        node = gm.graph.call_function(target, args)
        for key in _COPIED_META:
            if key in replaced.meta:
                node.meta[key] = replaced.meta[key]
        if self._fake_mode is not None:
            values = torch.fx.node.map_arg(args, lambda arg: arg.meta.get("val"))
            try:
                with self._fake_mode:
                    node.meta["val"] = target(*values)
            except Exception as error:  # noqa: BLE001 - metadata only: the graph itself is still valid
                log.debug("pt2q habana: no fake value for %s: %s", node.name, error)
        return node

    @staticmethod
    def _drop_unused_constants(gm: GraphModule) -> None:
        for node in list(gm.graph.find_nodes(op="get_attr")):
            if not node.users:
                target = node.target
                gm.graph.erase_node(node)
                drop_unused_attribute(gm, target)


# -- the entry point ---------------------------------------------------------------------------------------
def hpu_unavailable_reason(device: str = "gaudi2") -> str | None:
    """None when Habana's bridge imports and its torch.ops.hpu ops take the arguments of pt2q's
    reference ops (in the same order, so the lowered calls mean the same); else why not."""
    try:
        importlib.import_module("habana_frameworks.torch")
    except Exception as error:  # noqa: BLE001 - any import failure (no package, no driver) means: not here
        return f"habana_frameworks.torch does not import ({type(error).__name__}: {error})"
    hpu = getattr(torch.ops, habana_ops.HPU_NAMESPACE)
    for name in habana_ops.OP_NAMES:
        if not hasattr(hpu, name):
            return f"torch.ops.hpu has no {name} (this Habana release predates it)"
        theirs = [argument.name for argument in getattr(hpu, name).default._schema.arguments]
        ours = [argument.name for argument in habana_ops.reference_op(device, name)._schema.arguments]
        if theirs != ours:
            return (f"torch.ops.hpu.{name} takes ({', '.join(theirs)}), not ({', '.join(ours)}) as pt2q's lowering "
                    "expects")
    return None


def lowered_device(device: str | None, recorded: dict) -> str:
    """The device to lower for: `device`, or the one the quantizer recorded (`recorded`: meta["pt2q_fp8"]),
    after checking the two saturate alike."""
    recorded_device = recorded.get("device")
    if device is None:
        if recorded_device in habana_ops.DEVICES:
            return recorded_device
        found = (f"it was quantized for device={recorded_device!r}" if recorded_device
                 else "the graph does not record the device it was quantized for (meta['pt2q_fp8'])")
        raise ConfigError(f"Habana lowering: {found}; pass lower(..., device='gaudi2' or 'gaudi3'), the card it "
                          "will run on")
    _check_device(device)
    if recorded_device is not None and "dtype" in recorded:
        dtype = fp8.fp8_dtype(recorded["dtype"], "meta['pt2q_fp8']['dtype']")
        quantized_full_scale = recorded.get("full_scale") or fp8.full_scale(dtype, recorded_device)
        full_scale = fp8.full_scale(dtype, device)
        if quantized_full_scale != full_scale:
            format_name = fp8.format_name(dtype).upper()
            raise ConfigError(
                f"Habana lowering: the model was quantized for {recorded_device} ({format_name} full "
                f"scale {quantized_full_scale}), but device={device!r} saturates at {full_scale}; quantize it again "
                f"with pt2q.FP8Config(device={device!r})")
    return device


def _namespace(ops: str, device: str) -> str:
    if ops not in OP_SETS:
        raise ConfigError(f"Habana lowering: ops={ops!r} is not valid; valid: {', '.join(map(repr, OP_SETS))} "
                          "('hpu': Habana's torch.ops.hpu; 'reference': pt2q's CPU ops; 'auto': hpu when available)")
    if ops == "reference":
        return habana_ops.NAMESPACES[device]
    reason = hpu_unavailable_reason(device)
    if reason is None:
        return habana_ops.HPU_NAMESPACE
    if ops == "hpu":
        raise BackendUnavailable(f"Habana lowering: ops='hpu' needs Habana's PyTorch bridge, but {reason}; lower "
                                 "with ops='reference' for pt2q's CPU reference ops "
                                 f"(torch.ops.{habana_ops.NAMESPACES[device]})")
    log.info("pt2q habana: %s; lowering to the CPU reference ops torch.ops.%s", reason, habana_ops.NAMESPACES[device])
    return habana_ops.NAMESPACES[device]


def lower(qmodel: GraphModule, device: str | None = None, *, ops: str = "auto", inplace: bool = False) -> GraphModule:
    """`qmodel` (an FP8 Q/DQ GraphModule from pt2q.quantize / convert with an FP8Config) with its FP8 layers
    rewritten into Gaudi's cast_to_fp8_v2 / fp8_gemm_v2 / cast_from_fp8 (see the module docstring).

    device: "gaudi2" or "gaudi3", the card the graph runs on; None takes the device the model was
        quantized for. A device that saturates differently from that one raises ConfigError.
    ops: "auto" (default: torch.ops.hpu when habana_frameworks.torch imports, else pt2q's reference ops
        torch.ops.pt2q_<device>), "hpu" (BackendUnavailable without the Habana bridge) or "reference".
    inplace: rewrite `qmodel` itself; by default a deep copy is lowered and `qmodel` is left as it was.

    The result runs (on CPU with the reference ops; `.to("hpu")` with Habana's), exports with
    torch.export, and saves with pt2q.save / torch.export.save.
    """
    if not isinstance(qmodel, GraphModule):
        raise ConfigError(f"Habana lowering takes the GraphModule pt2q.quantize / convert returned with an "
                          f"FP8Config; got a {type(qmodel).__name__}")
    if not any(qmodel.graph.find_nodes(op="call_function", target=target) for target in (QUANTIZE_FP8, DEQUANTIZE_FP8)):
        raise ConfigError("Habana lowering: the graph has no pt2q.quantize_fp8 / dequantize_fp8 node; quantize the "
                          "model with pt2q.FP8Config first")
    device = lowered_device(device, qmodel.meta.get(meta.FP8) or {})
    namespace = _namespace(ops, device)
    if inplace:
        graph_module = qmodel
    else:
        with warnings.catch_warnings():
            # deep-copying an exported graph's pytree codegen trips a torch-internal LeafSpec deprecation
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            graph_module = copy.deepcopy(qmodel)
    lowering = LowerToHabana(device, namespace=namespace)
    graph_module, _ = PassManager([lowering])(graph_module)
    log.info("pt2q habana: %s", lowering.report.summary())
    return graph_module

"""Compile XPUQuantizer graphs (signed int8 activations [-128, 127] affine per tensor, int8 weights
symmetric per output channel) with Inductor: on an Intel GPU, or through Inductor's CPU path.

- `compile(qmodel, example_inputs)` is the XPU path. It needs `torch.xpu.is_available()` and raises
  `BackendUnavailable` otherwise (the torch 2.13 CPU build has `torch.xpu`, but never a device). It
  copies the graph onto the XPU (`graph_on_device`: parameters, buffers, constants and the `device=`
  arguments torch.export bakes into factory ops; the caller's model and tensors are not touched) and
  compiles it with the CPU backend's machinery: freezing scoped to its own calls, input copies where
  Inductor's in-place residual sum could write a graph input, int8 kernels counted from the generated
  code. Inductor's quantization patterns prepack int8 weights for "cpu" and "xpu" tensors alike
  (torch/_inductor/fx_passes/quantization.py), so the kernels expected are the same `onednn.qlinear_*` /
  `onednn.qconv_*` ops. Nothing of this path runs on a machine without an Intel GPU: it is not tested
  here beyond its checks and `graph_on_device`.
- `compile_on_cpu(qmodel, example_inputs)` is Inductor's CPU path (`pt2q.backends.inductor.compile`)
  for the same graph: what runs without an Intel GPU, and what the tests measure. It shows that the
  XPU graph lowers to int8 kernels and computes its Q/DQ numbers; it says nothing about XPU speed.

What Inductor's CPU path does with signed int8 activations (torch 2.13; tests/backends/test_xpu.py):
- linear: `onednn.qlinear_pointwise` takes int8 activations, with unary and binary (residual add)
  post-ops and a fused int8 output quantize, and matches the eager Q/DQ graph to fp32 rounding.
- conv1d / conv2d: Inductor's pattern matches and emits `onednn.qconv_pointwise` with an int8 input, but
  ATen's CPU oneDNN convolution refuses it when it runs ("Input tensor should have uint8 (unsigned char)
  or fp8 data type"), so the compiled model fails at its first call. `compile_on_cpu` checks first: it
  raises `BackendUnavailable` naming the convs, or with `uint8_activations=True` it re-encodes every
  static activation as uint8 with the zero point moved by +128 (`activations_as_uint8`): the same scale
  and the same real values, so the same numbers, on the kernels the CPU has. (conv3d stays dequantize +
  float conv: no int8 kernel for it either way.)
- speed: oneDNN's CPU matmul has optimized int8 kernels for uint8 activations only; with int8 ones it
  picks its reference kernel (`ref_int8:any`), thousands of times slower on a real layer. So
  `compile_on_cpu` re-encodes as uint8 by default; `uint8_activations=False` keeps the signed graph.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from ... import meta
from ...capture import normalize_inputs
from ...device import probe_xpu
from ...errors import BackendUnavailable, ConfigError
from ..inductor import CompiledQuantModel
from ..inductor import compile as inductor_compile
from ..inductor.lowering import _compile_and_warm_up, _finish, _with_autocast

log = logging.getLogger(__name__)

_qd = torch.ops.quantized_decomposed
_aten = torch.ops.aten
_QUANTIZE = _qd.quantize_per_tensor.default
_DEQUANTIZE = _qd.dequantize_per_tensor.default
# The convs Inductor lowers to oneDNN's int8 convolution (3-D and 4-D inputs); conv3d stays float.
INT8_CONV_OPS = frozenset({_aten.conv1d.default, _aten.conv2d.default, _aten.conv1d.padding,
                           _aten.conv2d.padding})
UINT8_SHIFT = 128


# -- graph checks and rewrites ---------------------------------------------------------------------
def signed_int8_conv_inputs(graph_module: GraphModule) -> list[str]:
    """Names of the conv nodes that read a static int8 (signed) activation: the ones Inductor's CPU
    path would hand to oneDNN's CPU int8 convolution, which takes uint8 only."""
    names = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in INT8_CONV_OPS or not node.args:
            continue
        activation = node.args[0]
        if isinstance(activation, Node) and activation.target is _DEQUANTIZE and activation.args[-1] == torch.int8:
            names.append(node.name)
    return names


def _copy_graph_module(graph_module: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of the graph, sharing `graph_module`'s tensors (none is written
    through it) and a shallow copy of its meta."""
    with warnings.catch_warnings():
        # deep-copying an exported graph's pytree codegen trips a torch-internal LeafSpec deprecation
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        copied = GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    copied.meta.update(graph_module.meta)
    return copied


def _as_uint8(node: Node) -> None:
    tensor, scale, zero_point, quant_min, quant_max, dtype = node.args
    assert dtype == torch.int8, node.format_node()
    node.args = (tensor, scale, zero_point + UINT8_SHIFT, quant_min + UINT8_SHIFT, quant_max + UINT8_SHIFT,
                 torch.uint8)


def activations_as_uint8(graph_module: GraphModule) -> GraphModule:
    """A copy of `graph_module` in which every static int8 activation is encoded as uint8 instead: each
    quantize_per_tensor to int8 and every dequantize of it get zero point + 128, range [0, 255] and dtype
    uint8. q_u8 = q_s8 + 128 exactly and (q_u8 - (zp + 128)) * scale = (q_s8 - zp) * scale, so every
    value the graph computes is unchanged. Weights (int8 constants) and dynamic activations stay as
    they are. All activations move, not only the convs' inputs: Inductor fuses across them (a conv's
    residual add takes the other int8 tensor as its accumulator, pooling keeps its input's encoding) and
    requires one dtype on both sides. Returns `graph_module` itself when it has no int8 activation."""
    quantizes = [n for n in graph_module.graph.find_nodes(op="call_function", target=_QUANTIZE)
                 if n.args[-1] == torch.int8]
    if not quantizes:
        return graph_module
    shifted = _copy_graph_module(graph_module)
    count = 0
    for quantize in shifted.graph.find_nodes(op="call_function", target=_QUANTIZE):
        if quantize.args[-1] != torch.int8:
            continue
        others = [user for user in quantize.users if user.target is not _DEQUANTIZE]
        if others:
            raise BackendUnavailable(
                f"the int8 activation {quantize.name} is read by {others[0].name} ({others[0].target}), not only "
                "by dequantize nodes, so it cannot be re-encoded as uint8 for the CPU; compile this graph on an "
                "XPU (pt2q.backends.xpu.compile)")
        _as_uint8(quantize)
        for dequantize in list(quantize.users):
            _as_uint8(dequantize)
        count += 1
    shifted.recompile()
    log.info("pt2q xpu (CPU path): %d int8 activation(s) re-encoded as uint8 (zero point + 128)", count)
    return shifted


def graph_on_device(graph_module: GraphModule, device: torch.device | str) -> GraphModule:
    """A copy of `graph_module` whose tensors live on `device`: every tensor a get_attr node reads
    (parameters stay parameters, tied tensors stay tied), every submodule a call_module node runs, and
    every `torch.device` argument of the graph (torch.export bakes `device=cpu` into factory ops such
    as arange). `graph_module` and its tensors are not changed."""
    device = torch.device(device)
    moved = _copy_graph_module(graph_module)
    # Submodules first: GraphModule() shares them with graph_module, and get_attr targets may live in them.
    for node in moved.graph.find_nodes(op="call_module"):
        moved.set_submodule(node.target, copy.deepcopy(graph_module.get_submodule(node.target)).to(device))
    copies: dict[int, torch.Tensor] = {}
    for node in moved.graph.find_nodes(op="get_attr"):
        owner_name, _, leaf = node.target.rpartition(".")
        owner = moved.get_submodule(owner_name) if owner_name else moved
        value = getattr(owner, leaf)
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) not in copies:
            on_device = value.detach().to(device)
            if isinstance(value, torch.nn.Parameter):
                on_device = torch.nn.Parameter(on_device, requires_grad=value.requires_grad)
            copies[id(value)] = on_device
        if leaf in owner._parameters:
            owner._parameters[leaf] = copies[id(value)]
        elif leaf in owner._buffers:
            owner._buffers[leaf] = copies[id(value)]
        else:
            owner.__dict__[leaf] = copies[id(value)]

    def retarget(value):
        return device if isinstance(value, torch.device) and value != device else value

    for node in moved.graph.nodes:
        node.args = map_aggregate(node.args, retarget)
        node.kwargs = map_aggregate(node.kwargs, retarget)
    moved.recompile()
    return moved


def _tensors_to(tree, device: torch.device):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def _check_graph(qmodel, where: str) -> None:
    from ...ops import DEQUANTIZE_WEIGHT

    if not isinstance(qmodel, GraphModule):
        raise TypeError(f"{where} takes the torch.fx.GraphModule that pt2q.quantize / pt2q.convert return; "
                        f"got {type(qmodel).__name__}")
    weight_only = [n.name for n in qmodel.graph.find_nodes(op="call_function", target=DEQUANTIZE_WEIGHT)]
    if weight_only:
        raise BackendUnavailable(
            f"{where}: {len(weight_only)} weight-only layer(s) ({', '.join(weight_only[:3])}) use "
            "pt2q::dequantize_weight, whose unpacking runs on CPU tensors only; compile weight-only models "
            "with pt2q.backends.inductor.compile")


# -- the two entry points ----------------------------------------------------------------------------
def compile(qmodel: GraphModule, example_inputs: Any, *, mixed_bf16: bool | None = None,
            dynamic: bool | None = None, max_autotune: bool = False,
            guard_inputs: bool = True) -> CompiledQuantModel:
    """Compile an XPU-quantized `qmodel` with Inductor for the `xpu` device (an Intel GPU).

    The graph and `example_inputs` are copied to the XPU (the caller's stay where they are) and the
    first call happens here. Call the result with tensors on the XPU, as any model moved to a device;
    its outputs are on the XPU. `mixed_bf16` (default: the config's) runs the non-quantized ops under
    XPU bf16 autocast. Raises BackendUnavailable when no XPU device is present.
    """
    _check_graph(qmodel, "pt2q.backends.xpu.compile")
    xpu = probe_xpu()
    if not xpu.available:
        raise BackendUnavailable(
            f"pt2q.backends.xpu.compile: no XPU device is present (torch.xpu.is_available() is False: "
            f"{xpu.detail}). On this CPU compile with pt2q.backends.inductor.compile (quantize with "
            "StaticQuantConfig(backend='x86') for the CPU's uint8 activations), or run this XPU graph "
            "through Inductor's CPU kernels with pt2q.backends.xpu.compile_on_cpu")
    device = torch.device("xpu")
    args, kwargs = normalize_inputs(example_inputs)
    if mixed_bf16 is None:
        mixed_bf16 = bool(getattr(qmodel.meta.get(meta.CONFIG), "mixed_bf16", False))
    on_device = graph_on_device(qmodel, device)
    args, kwargs = _tensors_to((args, kwargs), device)
    options = {"freezing": True, "max_autotune": max_autotune}
    target = _with_autocast(on_device, torch.bfloat16, device.type) if mixed_bf16 else on_device
    compiled, sources, warm, before = _compile_and_warm_up(target, args, kwargs, options, dynamic=dynamic)
    return _finish(compiled, on_device, sources, guard_inputs, options,
                   {**options, "device": "xpu", "mixed_bf16": mixed_bf16, "dynamic": dynamic}, warm, before)


def compile_on_cpu(qmodel: GraphModule, example_inputs: Any, *, uint8_activations: bool = True,
                   **inductor_options) -> CompiledQuantModel:
    """Run an XPU-quantized `qmodel` through Inductor's CPU path (`pt2q.backends.inductor.compile`, which
    `inductor_options` go to): the CPU's oneDNN int8 kernels, not an XPU's.

    By default (`uint8_activations=True`) every static activation is first re-encoded as uint8 with zero
    point + 128 (`activations_as_uint8`: the same scale and real values, so the same numbers; on a CPU
    whose int8 kernels saturate, the compile warns about those layers). The CPU's oneDNN has fast int8
    kernels for uint8 activations only: a signed int8 linear runs its reference kernel (`ref_int8:any`;
    one 4096x384 @ 384x384 linear took 14.4 s against 2.6 ms for uint8 on the AVX-512 VNNI dev machine,
    which is `brg_matmul:avx512_core_vnni`), and its int8 conv refuses signed input. `uint8_activations=False`
    compiles the signed graph as it is: linears then run (slowly) and a graph with int8 convs raises
    BackendUnavailable naming them (instead of failing inside the compiled model). The result's `options`
    record "device": "cpu", "uint8_activations" and "signed_conv_inputs" (the convs that need the
    re-encoding).
    """
    _check_graph(qmodel, "pt2q.backends.xpu.compile_on_cpu")
    if not isinstance(uint8_activations, bool):
        raise ConfigError(f"uint8_activations={uint8_activations!r} must be a bool (True or False)")
    convs = signed_int8_conv_inputs(qmodel)
    if convs and not uint8_activations:
        shown = ", ".join(convs[:5]) + (f" and {len(convs) - 5} more" if len(convs) > 5 else "")
        raise BackendUnavailable(
            f"pt2q.backends.xpu.compile_on_cpu: {len(convs)} conv(s) ({shown}) read signed int8 activations, "
            "which the CPU's oneDNN int8 convolution does not take (ATen: 'Input tensor should have uint8 "
            "(unsigned char) or fp8 data type'; the compiled model would fail at its first call). Pass "
            "uint8_activations=True to re-encode the activations as uint8 with zero point + 128 (the same "
            "values, so the same results), or compile on an XPU with pt2q.backends.xpu.compile")
    graph = activations_as_uint8(qmodel) if uint8_activations else qmodel
    compiled = inductor_compile(graph, example_inputs, **inductor_options)
    compiled.options.update(device="cpu", uint8_activations=uint8_activations, signed_conv_inputs=convs)
    return compiled

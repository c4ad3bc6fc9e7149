"""Compile a Q/DQ GraphModule with Inductor into int8 oneDNN kernels, safely.

- Freezing is switched on around each call of the compiled function only: without it Inductor
  keeps Q/DQ graphs as fp32 GEMMs. Dynamo reads the flag while tracing (to keep weights as constants),
  so `torch.compile(options=...)`, which reaches Inductor only, is not enough; a scoped
  `config.patch` around the call also covers recompiles for new shapes. Nothing global stays changed.
- The caller's tensors are never written. Inductor can lower `linear(x) + residual` into an in-place
  `sum` post-op that writes into `residual`; when that residual is a graph input, the caller's tensor
  is overwritten (measured on torch 2.13: +0.23 relative drift per call). Inputs that can reach an add
  are cloned before each call, outside the compiled region where Inductor cannot remove the copy; the
  warm-up call double-checks that no other input is written.
- The int8 kernels Inductor produced are counted from the generated code (`int8_kernels`).
- Weight-only layers (`pt2q.dequantize_weight -> linear`) are first rewritten into weight-only kernels
  (pt2q's fused GEMV kernels for one row, ATen's int8/int4 kernels otherwise; a table by ISA) on a copy
  of the graph (`weight_only.LowerWeightOnly`; the caller's model is
  untouched); what each layer got is `weight_only_kernels` (layer -> kernel name or "fallback: reason").
- Attention (`aten.scaled_dot_product_attention`) of a quantized graph can run pt2q's fused bf16
  attention kernel where the CPU has AVX512-BF16 (`attention="auto"` / `"bf16"`, opt-in;
  attention.LowerAttention, same copy); what each attention got is `attention_kernels`.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import re
import warnings
from typing import Any
from unittest import mock

import torch
import torch._inductor.config as inductor_config
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from ... import meta
from ...capture import normalize_inputs
from ...graph import VIEW_OPS, is_float_tensor
from ...isa import detect
from .attention import ATTENTION_CHOICES, AttentionReport, LowerAttention, has_attention
from .saturation import warn_if_saturating
from .weight_only import LowerWeightOnly, WeightOnlyReport

log = logging.getLogger(__name__)

# oneDNN int8 ops as they appear in Inductor's generated Python wrapper (qlinear_pointwise, qconv...).
_INT8_KERNEL = re.compile(r"torch\.ops\.onednn\.(q\w+)\.(\w+)")

_ADD_OPS = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.sub.Tensor})


def inputs_reaching_add(graph_module: GraphModule) -> list[str]:
    """Float graph inputs that flow, through views only, into an add: where an in-place sum may land."""
    at_risk = []
    for placeholder in graph_module.graph.find_nodes(op="placeholder"):
        if not is_float_tensor(placeholder):
            continue
        frontier, seen = [placeholder], set()
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.target in _ADD_OPS:
                    at_risk.append(placeholder.name)
                    frontier.clear()
                    break
                if user.target in VIEW_OPS:
                    frontier.append(user)
    return at_risk


def _clone_tensors(tree):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), tree)


def _clone_float_tensors(tree):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_floating_point() else t, tree)


class CompiledQuantModel:
    """The callable `compile` returns. Attributes: `int8_kernels` (kernel name -> count),
    `guarded_inputs` (graph inputs cloned before each call), `options`, `weight_only_kernels`
    (weight-only linear -> kernel name or "fallback: reason"), `weight_only_report` and
    `attention_kernels` (attention node -> "pt2q::attention_bf16" or "aten: reason")."""

    def __init__(self, compiled, config_patch: dict, guarded_inputs: list[str], int8_kernels: dict[str, int],
                 options: dict, weight_only_report: WeightOnlyReport | None = None,
                 attention_report: AttentionReport | None = None):
        self._compiled = compiled
        self._config_patch = config_patch
        self.guarded_inputs = guarded_inputs
        self.int8_kernels = int8_kernels
        self.options = options
        self.weight_only_report = weight_only_report if weight_only_report is not None else WeightOnlyReport()
        self.weight_only_kernels = self.weight_only_report.kernels()
        self.attention_report = attention_report if attention_report is not None else AttentionReport()
        self.attention_kernels = dict(self.attention_report.nodes)

    @property
    def num_int8_kernels(self) -> int:
        return sum(self.int8_kernels.values())

    def __call__(self, *args, **kwargs):
        if self.guarded_inputs:
            args, kwargs = _clone_float_tensors((args, kwargs))
        # Inference only: with grad enabled Dynamo would recompile a training graph without freezing.
        with torch.no_grad(), inductor_config.patch(self._config_patch):
            return self._compiled(*args, **kwargs)


def _with_autocast(module: torch.nn.Module, dtype: torch.dtype, device_type: str = "cpu"):
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return module(*args, **kwargs)
    return run


@contextlib.contextmanager
def _collect_generated_code():
    """Collect the Python wrapper code Inductor generates in this block (to count int8 kernels).
    Unlike torch._inductor.utils.run_and_get_code, it does not reset Dynamo (which would drop every
    other compiled function of the process)."""
    from torch._inductor.graph import GraphLowering  # private; pinned by tests/backends

    sources: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", sources.append):
        yield sources


def _count_int8_kernels(sources: list[str]) -> dict[str, int]:
    kernels = collections.Counter()
    for source in sources:
        for match in _INT8_KERNEL.finditer(source):
            kernels[f"{match.group(1)}.{match.group(2)}"] += 1
    return dict(kernels)


def _written_inputs(after, before) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(pytree.tree_leaves(after), pytree.tree_leaves(before)))
            if isinstance(a, torch.Tensor) and not torch.equal(a, b)]


def _lower(qmodel, *, dynamic_activations: bool, activation_dtype, flat: bool = False,
           attention: bool = False):
    """(graph to compile, WeightOnlyReport, AttentionReport): `qmodel`'s graph with its weight-only layers
    rewritten into kernels, its dynamic int8 qparams computed as the op does (DynamicQparamsIncludeZero:
    Inductor's own decomposition leaves 0 out of the range) and, with `attention`, its attention lowered
    to pt2q's kernel, on a new GraphModule sharing `qmodel`'s tensors (`qmodel` itself is not changed).
    Graphs with none of these come back as they are, unless `flat` asks for the flat-tuple codegen."""
    from ...ops import DEQUANTIZE_WEIGHT
    from ...passes.dynamic_qparams_include_zero import CHOOSE_QPARAMS, DynamicQparamsIncludeZero
    from ...passes.manager import PassManager

    lower = LowerWeightOnly(activation_dtype=activation_dtype, dynamic_activations=dynamic_activations)
    has_weight_only = isinstance(qmodel, GraphModule) and any(
        qmodel.graph.find_nodes(op="call_function", target=DEQUANTIZE_WEIGHT))
    has_dynamic = isinstance(qmodel, GraphModule) and any(
        qmodel.graph.find_nodes(op="call_function", target=CHOOSE_QPARAMS))
    lower_attention = LowerAttention()
    attention = attention and isinstance(qmodel, GraphModule) and has_attention(qmodel)
    if not (has_weight_only or has_dynamic or flat or attention):
        return qmodel, lower.report, lower_attention.report
    # The copy shares qmodel's tensors; the pass only adds constants to it and drops unused ones from it.
    with warnings.catch_warnings():
        # deep-copying an exported graph's pytree codegen trips a torch-internal LeafSpec deprecation
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        lowered = GraphModule(qmodel, copy.deepcopy(qmodel.graph))
    if flat:
        lowered.graph._codegen = torch.fx.graph.CodeGen()  # positional tensors in, tuple out (what Dynamo uses)
        lowered.recompile()
    if has_dynamic:
        lowered, _ = PassManager([DynamicQparamsIncludeZero()])(lowered)
    if has_weight_only:
        lowered, _ = PassManager([lower])(lowered)
    if attention:
        lowered, _ = PassManager([lower_attention])(lowered)
    return lowered, lower.report, lower_attention.report


def is_quantized(graph_module) -> bool:
    """Whether the graph holds quantized ops (Q/DQ of torchao / PT2E, or pt2q's packed weights)."""
    if not isinstance(graph_module, GraphModule):
        return False
    return any(node.op == "call_function" and getattr(node.target, "namespace", None) in
               ("quantized_decomposed", "pt2q", "torchao") for node in graph_module.graph.nodes)


def _use_attention_kernel(choice: str, qmodel) -> bool:
    """`attention` of compile(): "auto" -> pt2q's bf16 kernel for quantized graphs on a CPU with
    AVX512-BF16, and only if it builds (else ATen's, logged); "bf16" -> the kernel, or an error saying why
    not; "aten" -> ATen's SDPA."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: use one of {ATTENTION_CHOICES}")
    if choice == "aten":
        return False
    isa = detect()
    if choice == "bf16":
        if not isa.avx512_bf16:
            raise ValueError("attention='bf16' needs a CPU with AVX512-BF16 (this one: "
                             f"{isa.describe()}); use attention='aten'")
        return True
    if not (isa.avx512_bf16 and is_quantized(qmodel)):
        return False
    from .kernels import KernelsUnavailable, load

    try:
        load()
    except KernelsUnavailable as error:
        log.info("pt2q inductor: ATen's attention (%s)", error)
        return False
    return True


def _finish(compiled, qmodel, sources, guard_inputs, config_patch, options, warm, before,
            weight_only: WeightOnlyReport | None = None,
            attention: AttentionReport | None = None) -> CompiledQuantModel:
    guarded = inputs_reaching_add(qmodel) if (guard_inputs and isinstance(qmodel, GraphModule)) else []
    written = _written_inputs(warm, before)
    if written and guard_inputs and not guarded:
        log.warning("pt2q: the compiled graph writes into input(s) %s; they will be copied before each call",
                    written)
        guarded = [f"input_{i}" for i in written]
    kernels = _count_int8_kernels(sources)
    log.info("pt2q inductor: int8 kernels %s; guarded inputs %s", kernels or "none", guarded or "none")
    if attention is not None and attention.nodes:
        log.info("pt2q inductor: %s", attention.summary())
    return CompiledQuantModel(compiled, config_patch, guarded, kernels, options, weight_only, attention)


def _compile_and_warm_up(target, args: tuple, kwargs: dict, options: dict, *, dynamic: bool | None):
    """torch.compile `target` and make the first call under `options` (freezing) on copies of the inputs,
    whatever device they are on. Returns (compiled, generated sources, the inputs it was called with, a
    copy of them taken before the call)."""
    compiled = torch.compile(target, dynamic=dynamic)
    warm = _clone_tensors((args, kwargs))
    before = _clone_tensors(warm)
    with torch.no_grad(), inductor_config.patch(options), warnings.catch_warnings(), \
            _collect_generated_code() as sources:
        # Inductor's int8 lowering copy-constructs zero points with torch.tensor(): harmless, noisy.
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        compiled(*warm[0], **warm[1])
    return compiled, sources, warm, before


def compile(qmodel: GraphModule, example_inputs: Any, *, mixed_bf16: bool | None = None,
            dynamic: bool | None = None, max_autotune: bool = False,
            guard_inputs: bool = True, dynamic_activations: bool = False,
            weight_only_activation_dtype: torch.dtype = torch.bfloat16,
            attention: str = "aten") -> CompiledQuantModel:
    """Compile `qmodel` (from `pt2q.quantize`/`convert`, or any PT2E Q/DQ model) with Inductor.

    The first call happens here, on copies of `example_inputs`, so the returned callable is ready.
    `mixed_bf16` (default: the config's) runs non-quantized ops in bfloat16 via autocast.
    `guard_inputs=False` skips the input copies: only when you own the inputs and accept that Inductor
    may write into them.
    Weight-only layers run ATen's int8 / int4 kernels where one fits (else dequantize + linear; see
    `weight_only_kernels`). `weight_only_activation_dtype`: the dtype those kernels compute in; bfloat16
    (default) is the fast path and costs bf16 rounding of the layer's input and output (~2e-3 relative
    per layer); torch.float32 is exact but the kernels' fp32 paths are scalar loops, slower than the fp32
    linear they replace (batch 1, 5632x2048 on 2 cores: int8 4.8 ms / int4 10 ms in fp32 vs 0.30 / 0.36 ms
    in bf16, fp32 F.linear 2.1 ms). `dynamic_activations`: int8 dynamic activations for 4-bit weights
    when torchao's da8w4 CPU kernel is available (not in the pinned torchao: the int4 kernel is used and
    the reason logged). `attention`: "aten" (default: ATen's SDPA), "auto" (pt2q's fused bf16 attention
    kernel for a quantized graph on a CPU with AVX512-BF16, ATen's otherwise) or "bf16" (the kernel; an
    error without AVX512-BF16); see attention.py and `attention_kernels`. Not the default: on int8
    MiniLM it is 1.20x faster end to end at one thread and batch 8, but slower at two threads and batch
    32 (121.9 vs 106.8 ms, tools/bench_static.py), where ATen's SDPA parallelises better.
    """
    args, kwargs = normalize_inputs(example_inputs)
    if mixed_bf16 is None:
        mixed_bf16 = bool(getattr(qmodel.meta.get(meta.CONFIG), "mixed_bf16", False)) \
            if isinstance(qmodel, GraphModule) else False
    if mixed_bf16 and not detect().native_bf16:
        warnings.warn("mixed_bf16=True on a CPU without native bf16 (no AVX512-BF16 or AMX-BF16): bf16 ops "
                      "are emulated and usually slower than fp32 here", UserWarning, stacklevel=2)
    warn_if_saturating(qmodel, "pt2q.backends.inductor.compile")
    options = {"freezing": True, "max_autotune": max_autotune}
    lowered, weight_only, attention_report = _lower(
        qmodel, dynamic_activations=dynamic_activations, activation_dtype=weight_only_activation_dtype,
        attention=_use_attention_kernel(attention, qmodel))
    target = _with_autocast(lowered, torch.bfloat16) if mixed_bf16 else lowered
    compiled, sources, warm, before = _compile_and_warm_up(target, args, kwargs, options, dynamic=dynamic)
    return _finish(compiled, lowered, sources, guard_inputs, options,
                   {**options, "mixed_bf16": mixed_bf16, "dynamic": dynamic,
                    "dynamic_activations": dynamic_activations, "attention": attention,
                    "weight_only_activation_dtype": weight_only.activation_dtype}, warm, before, weight_only,
                   attention_report)


def compile_graph(qmodel: GraphModule, flat_inputs: tuple, *, guard_inputs: bool = True,
                  dynamic_activations: bool = False,
                  weight_only_activation_dtype: torch.dtype = torch.bfloat16,
                  attention: str = "aten") -> CompiledQuantModel:
    """Lower `qmodel` with Inductor's `compile_fx`, without Dynamo: for callers that already run inside
    a Dynamo compile (the `pt2q` torch.compile backend). Takes and returns flat tuples. The weight-only
    and attention options are `compile`'s."""
    from torch._inductor.compile_fx import compile_fx

    warn_if_saturating(qmodel, "pt2q.backends.inductor.compile_graph")
    flat, weight_only, attention_report = _lower(
        qmodel, dynamic_activations=dynamic_activations, activation_dtype=weight_only_activation_dtype, flat=True,
        attention=_use_attention_kernel(attention, qmodel))
    options = {"freezing": True}
    warm = _clone_tensors(tuple(flat_inputs))
    before = _clone_tensors(warm)
    with torch.no_grad(), inductor_config.patch(options), warnings.catch_warnings(), \
            _collect_generated_code() as sources:
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        compiled = compile_fx(flat, list(warm))
        compiled(*warm)
    return _finish(compiled, qmodel, sources, guard_inputs, options, dict(options), warm, before, weight_only,
                   attention_report)

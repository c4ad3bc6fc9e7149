"""Numeric report: fp32 vs quantized graph, node by node, on the same inputs.

The fp32 reference is an observed graph of the pipeline with its observers bypassed: it has the
quantized graph's node names and conv-bn is already folded. Without SmoothQuant it is the graph right
after `prepare_pt2e`. With SmoothQuant, per-node rows compare against the smoothed fp32 graph (right after
`smooth_quant_apply`): a producer that absorbs 1/s has its output rescaled, so only the smoothed graph
has the same values node for node. The model outputs are always compared against the unsmoothed fp32
graph, and a `smooth_quant check` row compares the smoothed fp32 outputs with it (SmoothQuant is exact
in fp32: this SQNR should be very high).

Each graph runs once, with a probe after the nodes of interest; the quantized run compares against the
stored fp32 values as it goes.

SQNR (dB) = 10 log10(sum(ref^2) / sum((ref - q)^2)); rows are sorted worst (lowest SQNR) first.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from ..ops import DEQUANTIZE_FP8, DEQUANTIZE_WEIGHT
from .text import _is_observer_like, has_int8_weight, is_quantized_compute, short_target

# pt2q's own dequantize ops: weight-only packed weights (RTN / GPTQ / AWQ ...) and FP8 values. A node
# reading one of them is quantized compute too, beside the int8 Q/DQ form `is_quantized_compute` knows.
_PT2Q_DEQUANTIZE_OPS = frozenset({DEQUANTIZE_WEIGHT, DEQUANTIZE_FP8})


def is_compared(node: Node) -> bool:
    """A node the report compares: int8 quantized compute, or an op reading a value one of pt2q's own
    dequantize ops produced (a weight-only linear, an FP8 GEMM)."""
    if is_quantized_compute(node):
        return True
    return node.op == "call_function" and node.target not in _PT2Q_DEQUANTIZE_OPS and any(
        arg.op == "call_function" and arg.target in _PT2Q_DEQUANTIZE_OPS for arg in node.all_input_nodes)


@dataclass
class NumericRow:
    node: str
    op: str
    module: str
    sqnr_db: float
    max_abs_err: float
    ref_abs_max: float
    int8_weight: bool

    def as_dict(self) -> dict:
        row = asdict(self)
        for key in ("sqnr_db", "max_abs_err", "ref_abs_max"):  # JSON has no inf/nan
            if not math.isfinite(row[key]):
                row[key] = str(row[key])
        return row


class _Probe(torch.nn.Module):
    """`probe(value, name)`: hands graph values to a callback; inserted after the nodes of interest."""

    _is_impure = True

    def __init__(self, callback: Callable[[str, Any], None]):
        super().__init__()
        self.callback = callback

    def forward(self, value, name: str):
        self.callback(name, value)


def structural_copy(gm: GraphModule) -> GraphModule:
    """Own graph and module tree, same tensors and (call_module) submodules: cheap, and unaffected by
    later in-place graph rewrites of `gm`."""
    copied = GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def bypass_observers(gm: GraphModule) -> GraphModule:
    """In place: observers and channel recorders removed, their inputs wired to their users (fp32)."""
    for node in list(gm.graph.nodes):
        if _is_observer_like(gm, node) is not None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _with_probes(gm: GraphModule, names: set[str], callback) -> GraphModule:
    probed = structural_copy(gm)
    probe_name = "_pt2q_debug_probe"
    probed.add_module(probe_name, _Probe(callback))
    for node in list(probed.graph.nodes):
        if node.name in names:
            with probed.graph.inserting_after(node):
                probed.graph.call_module(probe_name, (node,), {"name": node.name})
    probed.recompile()
    return probed


def _module_fqn(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)  # ratio of L2 norms: 20 log10 = 10 log10 of the energies


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """10 log10(sum(ref^2) / sum((ref - actual)^2)); inf when equal."""
    reference, actual = reference.detach().float(), actual.detach().float()
    return _sqnr(torch.linalg.vector_norm(reference).item(), torch.linalg.vector_norm(reference - actual).item())


def _compare(reference: torch.Tensor, actual: torch.Tensor) -> tuple[float, float, float]:
    reference, actual = reference.detach().float(), actual.detach().float()
    if reference.numel() == 0:
        return math.inf, 0.0, 0.0
    error = reference - actual
    return (_sqnr(torch.linalg.vector_norm(reference).item(), torch.linalg.vector_norm(error).item()),
            torch.linalg.vector_norm(error, ord=math.inf).item(),
            torch.linalg.vector_norm(reference, ord=math.inf).item())


def _sort_key(row: NumericRow):
    return (math.isnan(row.sqnr_db), row.sqnr_db, row.node)


def compare_graphs(reference: GraphModule, quantized: GraphModule, args: tuple, kwargs: dict, *,
                   unsmoothed: GraphModule | None = None) -> tuple[list[NumericRow], list[NumericRow]]:
    """(per-node rows worst first, model-output rows). `reference` is an fp32 graph with the quantized
    graph's node names (observers are bypassed on a copy); `unsmoothed`, when given, is the fp32 graph
    before SmoothQuant, the reference for the model outputs. No module is changed."""
    reference = bypass_observers(structural_copy(reference))
    ref_names = {n.name for n in reference.graph.nodes}
    targets = {n.name: n for n in quantized.graph.nodes if is_compared(n) and n.name in ref_names}
    stored: dict[str, torch.Tensor] = {}

    def keep(name, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            stored[name] = value.detach().clone()

    rows: list[NumericRow] = []

    def check(name, value):
        ref = stored.pop(name, None)
        if ref is None or not isinstance(value, torch.Tensor) or value.shape != ref.shape:
            return
        node = targets[name]
        sqnr, max_err, ref_max = _compare(ref, value)
        rows.append(NumericRow(name, short_target(node), _module_fqn(node), sqnr, max_err, ref_max,
                               has_int8_weight(node)))

    with torch.no_grad():
        ref_out = _with_probes(reference, set(targets), keep)(*copy_inputs(args), **copy_inputs(kwargs))
        q_out = _with_probes(quantized, set(targets), check)(*copy_inputs(args), **copy_inputs(kwargs))
        outputs = []
        if unsmoothed is not None:
            fp32_out = bypass_observers(structural_copy(unsmoothed))(*copy_inputs(args), **copy_inputs(kwargs))
            outputs += _output_rows(fp32_out, q_out, "output")
            outputs += _output_rows(fp32_out, ref_out, "smooth_quant check", "smoothed fp32 vs fp32")
        else:
            outputs += _output_rows(ref_out, q_out, "output")
    rows.sort(key=_sort_key)
    return rows, outputs


def compare_compiled(fp32: GraphModule, quantized: GraphModule, compiled, args: tuple,
                     kwargs: dict) -> list[NumericRow]:
    """Model-output rows for the compiled int8 model: against fp32, and against its own Q/DQ graph (on
    CPUs whose int8 kernels saturate the two can differ; see pt2q.isa)."""
    with torch.no_grad():
        fp32_out = bypass_observers(structural_copy(fp32))(*copy_inputs(args), **copy_inputs(kwargs))
        q_out = quantized(*copy_inputs(args), **copy_inputs(kwargs))
        compiled_out = compiled(*copy_inputs(args), **copy_inputs(kwargs))
    return (_output_rows(fp32_out, compiled_out, "compiled", "compiled vs fp32")
            + _output_rows(q_out, compiled_out, "compiled", "compiled vs Q/DQ graph"))


def _output_rows(reference, actual, op: str, describe: str = "") -> list[NumericRow]:
    rows = []
    ref_leaves, got_leaves = pytree.tree_leaves(reference), pytree.tree_leaves(actual)
    for index, (ref, got) in enumerate(zip(ref_leaves, got_leaves)):
        if isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.is_floating_point() \
                and ref.shape == got.shape:
            sqnr, max_err, ref_max = _compare(ref, got)
            label = f"output[{index}] {describe}" if describe else f"output[{index}]"
            rows.append(NumericRow(label, op, "", sqnr, max_err, ref_max, False))
    return rows


def copy_inputs(tree):
    """Graphs may write into their inputs (in-place ops): each run gets its own copies."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), tree)


def _fmt(value: float, spec: str) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def numeric_text(rows: list[NumericRow], outputs: list[NumericRow]) -> list[str]:
    lines = ["# numeric report: fp32 vs quantized on the example inputs, worst SQNR first",
             f"{'sqnr_db':>8}  {'max_abs_err':>11}  {'ref_abs_max':>11}  node  (op, module)"]
    for row in rows:
        where = ", ".join(x for x in (row.op, row.module) if x)
        lines.append(f"{_fmt(row.sqnr_db, '8.2f'):>8}  {_fmt(row.max_abs_err, '11.4g'):>11}  "
                     f"{_fmt(row.ref_abs_max, '11.4g'):>11}  {row.node}  ({where})")
    if not rows:
        lines.append("(no quantized node)")
    for row in outputs:
        lines.append(f"# {row.node}: SQNR {_fmt(row.sqnr_db, '.2f')} dB, max abs err "
                     f"{_fmt(row.max_abs_err, '.4g')} (fp32 abs max {_fmt(row.ref_abs_max, '.4g')})")
    return lines

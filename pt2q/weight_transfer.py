"""Carry the packed weights of a weight-only quantized graph into another capture of the same model.

A model is often captured more than once: the graph GPTQ / AWQ calibrated (say, full windows of text)
and a graph for another use of the same weights (say, one-token decoding with a KV cache as inputs).
Quantizing the second capture again would give other weights (round to nearest, or another calibration);
`transfer_quantized_weights` instead writes the first graph's result into the second:

    decoder = transfer_quantized_weights(qmodel, capture(wrapper, (), decode_inputs), prefix="lm.")

- The layers are matched by module name (the innermost module of each weighted node's `nn_module_stack`,
  as `model.named_modules()` names it): every `linear(x, pt2q.dequantize_weight(...))` of `source` (or conv)
  must find the same op of the same module in `target`, with a float constant weight of the same shape.
  `prefix` is what the target's names start with that the source's do not (a wrapper's attribute).
- Each matched weight input becomes a `pt2q.dequantize_weight` node on copies of the source's packed codes,
  scales, zero points and code table (the new graph owns them), with the source's bits, group size, shape
  and group dim; the float weight is dropped once nothing reads it. Layers the source left float (the LM
  head) stay float in the target.
- Checks: a source layer without a match, an ambiguous one (a module whose calls carry different packed
  weights), or a shape mismatch raises `WeightTransferError` naming the layers; afterwards every
  transferred weight is dequantized in both graphs and compared with `torch.equal`.

`target` is not changed: the result is a new GraphModule with its own graph and module tree (it shares the
target's other tensors, which nothing here writes).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from . import meta
from .capture import fresh_copy
from .errors import WeightTransferError
from .graph import add_constant, drop_unused_attribute, get_constant, module_fqn
from .ops import DEQUANTIZE_WEIGHT
from .weight_only import WEIGHTED_OPS

__all__ = ["TransferReport", "WeightTransferError", "dequantized_weight", "quantized_layers",
           "transfer_quantized_weights"]


@dataclass
class QuantizedLayer:
    """One packed weight of a graph: the `dequantize_weight` node and the weighted nodes it feeds."""

    module: str
    dequantize: Node
    users: list[Node]

    @property
    def op(self):
        return self.users[0].target


@dataclass
class TransferReport:
    """module name -> the target nodes that received its packed weight; target layers left float."""

    layers: dict[str, list[str]] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)

    def summary(self) -> str:
        nodes = sum(len(names) for names in self.layers.values())
        return (f"weight_transfer: {len(self.layers)} quantized layers into {nodes} nodes, "
                f"{len(self.kept_float)} float weighted nodes left float")

    def lines(self) -> list[str]:
        return [f"  {module}: {', '.join(names)}" for module, names in self.layers.items()]


def _constants(gm: GraphModule, dequantize: Node) -> list[torch.Tensor | None]:
    """The packed codes, scales, zero points and code table behind a dequantize node (None where absent)."""
    values = []
    for arg in dequantize.args[:4]:
        value = get_constant(gm, arg) if isinstance(arg, Node) else None
        if isinstance(arg, Node) and value is None:
            raise WeightTransferError(f"{dequantize.name}: input {arg.name} is not a graph constant")
        values.append(value)
    return values


def dequantized_weight(gm: GraphModule, dequantize: Node) -> torch.Tensor:
    """The float weight a `pt2q.dequantize_weight` node of `gm` computes."""
    return DEQUANTIZE_WEIGHT(*_constants(gm, dequantize), *dequantize.args[4:])


def _same_constants(gm: GraphModule, a: Node, b: Node) -> bool:
    if tuple(a.args[4:]) != tuple(b.args[4:]):
        return False
    return all((x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and torch.equal(x, y))
               for x, y in zip(_constants(gm, a), _constants(gm, b)))


def quantized_layers(gm: GraphModule) -> dict[str, QuantizedLayer]:
    """module name -> its packed weight in `gm`: every `dequantize_weight` feeding a weighted op's weight.
    A module called several times (one dequantize per call, or one shared) must carry one packed weight."""
    layers: dict[str, QuantizedLayer] = {}
    for dequantize in gm.graph.find_nodes(op="call_function", target=DEQUANTIZE_WEIGHT):
        users = [user for user in dequantize.users
                 if user.target in WEIGHTED_OPS and len(user.args) > 1 and user.args[1] is dequantize]
        if not users:
            continue
        for module in sorted({module_fqn(user) or user.name for user in users}):
            mine = [user for user in users if (module_fqn(user) or user.name) == module]
            known = layers.get(module)
            if known is None:
                layers[module] = QuantizedLayer(module, dequantize, mine)
                continue
            if known.dequantize is not dequantize and not _same_constants(gm, known.dequantize, dequantize):
                raise WeightTransferError(f"module {module!r} is called with two different packed weights "
                                          f"({known.dequantize.name}, {dequantize.name}): which one to carry over "
                                          "is ambiguous")
            known.users.extend(mine)
    return layers


def _float_weighted_nodes(gm: GraphModule, prefix: str) -> dict[str, list[Node]]:
    """(source-side) module name -> the weighted nodes of `gm` whose weight is a float constant."""
    found: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHTED_OPS or len(node.args) < 2:
            continue
        weight = get_constant(gm, node.args[1])
        if weight is None or not weight.dtype.is_floating_point:
            continue
        name = module_fqn(node) or node.name
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        found.setdefault(name, []).append(node)
    return found


def _drop_if_unused(gm: GraphModule, weight: Node) -> None:
    """Erase a get_attr node nothing reads, and the tensor behind it once no get_attr refers to it."""
    if weight.users:
        return
    target = weight.target
    gm.graph.erase_node(weight)
    drop_unused_attribute(gm, target)


def _write(gm: GraphModule, source: GraphModule, layer: QuantizedLayer, nodes: list[Node]) -> None:
    """Give every node of `nodes` (in graph order) the packed weight of `layer`: one dequantize node
    before the first of them, on copies of the source's constants."""
    graph = gm.graph
    first = nodes[0]
    hint = f"{layer.module}_q{layer.dequantize.args[4]}"
    names = ("packed", "scale", "zero_point", "code_table")
    with graph.inserting_before(first):
        inputs = [None if value is None else
                  graph.get_attr(add_constant(gm, f"{hint}_{suffix}", value.detach().clone()))
                  for suffix, value in zip(names, _constants(source, layer.dequantize))]
        dequantize = graph.call_function(DEQUANTIZE_WEIGHT, (*inputs, *layer.dequantize.args[4:]))
    if "val" in first.args[1].meta:  # the target's own fake tensor of the (same-shaped) float weight
        dequantize.meta["val"] = first.args[1].meta["val"]
    if meta.WEIGHT_FORMAT in layer.dequantize.meta:
        dequantize.meta[meta.WEIGHT_FORMAT] = layer.dequantize.meta[meta.WEIGHT_FORMAT]
    dequantize.meta["nn_module_stack"] = dict(first.meta.get("nn_module_stack", {}))
    for node in nodes:
        weight = node.args[1]
        node.replace_input_with(weight, dequantize)
        _drop_if_unused(gm, weight)


def transfer_quantized_weights(source: GraphModule, target: GraphModule, *, prefix: str = "",
                               verify: bool = True) -> GraphModule:
    """`target` with the packed weights of `source` (see the module docstring). The returned graph's
    `meta` carries `source`'s quantization config; `meta[pt2q.meta.WEIGHT_TRANSFER_REPORT]` (a TransferReport) says what went where."""
    from .passes.fold_constant_weights import FoldConstantWeights
    from .passes.manager import PassManager
    from .passes.matmul_to_linear import MatmulToLinear

    layers = quantized_layers(source)
    if not layers:
        raise WeightTransferError("the source graph has no pt2q.dequantize_weight layer: quantize it with a "
                                  "weight-only config (RTNConfig, HQQConfig, GPTQConfig, AWQConfig) first")
    with warnings.catch_warnings():
        # deep-copying an exported graph's pytree codegen trips a torch-internal LeafSpec deprecation
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        result = fresh_copy(target)
    # As weight_only.plan does before quantizing: computed weights folded, Conv1D-style addmm / mm become
    # linear, so they match.
    fold = [FoldConstantWeights()] if FoldConstantWeights.applies(result) else []
    result, _ = PassManager([*fold, MatmulToLinear()])(result)
    candidates = _float_weighted_nodes(result, prefix)

    missing, mismatched = [], []
    for module, layer in layers.items():
        nodes = [node for node in candidates.get(module, []) if node.target == layer.op]
        if not nodes:
            missing.append(module)
            continue
        shape = list(layer.dequantize.args[6])
        wrong = [f"{node.name} {list(get_constant(result, node.args[1]).shape)}" for node in nodes
                 if list(get_constant(result, node.args[1]).shape) != shape]
        if wrong:
            mismatched.append(f"{module} (quantized {shape}, target {', '.join(wrong)})")
    if missing or mismatched:
        shown = sorted(candidates)[:6]
        problems = []
        if missing:
            where = f"named {prefix!r} + their name in the target" if prefix else "of the same name in the target"
            problems.append(f"{len(missing)} quantized layer(s) have no float layer {where}: "
                            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (target float layers"
                            f"{', prefix removed' if prefix else ''}: {', '.join(shown) or 'none'}"
                            f"{' ...' if len(candidates) > 6 else ''})")
        if mismatched:
            problems.append(f"shapes differ: {'; '.join(mismatched[:8])}")
        raise WeightTransferError("transfer_quantized_weights: " + "; ".join(problems))

    report = TransferReport()
    for module, layer in layers.items():
        nodes = [node for node in candidates[module] if node.target == layer.op]
        _write(result, source, layer, nodes)
        report.layers[module] = [node.name for node in nodes]
    report.kept_float = sorted(node.name for module, nodes in candidates.items() if module not in layers
                               for node in nodes)
    result.graph.lint()
    result.recompile()

    if verify:
        transferred = quantized_layers(result)
        for module, layer in layers.items():
            mine = transferred.get(prefix + module)
            if mine is None or not torch.equal(dequantized_weight(source, layer.dequantize),
                                               dequantized_weight(result, mine.dequantize)):
                raise WeightTransferError(f"transfer_quantized_weights: {module!r} dequantizes differently in "
                                          "the target after the transfer")
    for key in (meta.CONFIG, meta.QUANTIZED):
        if key in source.meta:
            result.meta[key] = source.meta[key]
    result.meta[meta.WEIGHT_TRANSFER_REPORT] = report
    return result

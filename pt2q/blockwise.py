"""Run a captured graph one transformer block at a time over all calibration samples.

Sequential algorithms (GPTQ, AWQ) quantize block k on the outputs of the *quantized* blocks before it, and
must not hold every block's activations at once. The graph is cut into segments in program order: runs of
nodes inside one block (found from module names: `layers.N`, `layer.N`, `h.N`, `blocks.N`, `block.N`) and
the runs between them (embeddings, masks, rotary tables, the head). Every segment runs over all samples,
one sample at a time; a value stays alive only while a later segment still reads it, so what is held at
any moment is one block's inputs per sample (plus shared inputs such as the mask), flat in depth.

For a block, the caller's `on_block(block)` gets a `Block`: `block.run(...)` executes it over the samples
as often as the algorithm needs, with input recorders on chosen linears and weight overrides (the
dequantized weights of layers already quantized). When `on_block` returns, the block runs a last time with
`block.weights` to produce the inputs of what follows. Nodes after the last block never run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from .calibration import _check_finite_inputs
from .capture import normalize_inputs
from .errors import CalibrationError
from .graph import module_stack

BLOCK_NAME = re.compile(r"(?:^|.*\.)(?:layers|layer|h|blocks|block)\.\d+")

aten = torch.ops.aten


def block_of(node: Node) -> str | None:
    """The outermost enclosing module whose name ends in a numbered block (`model.layers.3`), or None."""
    for fqn, _ in module_stack(node):
        if BLOCK_NAME.fullmatch(fqn):
            return fqn
    return None


@dataclass
class Segment:
    block: str | None           # the block's module name; None for the nodes between blocks
    nodes: list[Node]


def segments(graph_module: GraphModule) -> list[Segment]:
    """Contiguous runs of computing nodes (placeholders, constants and the output excluded) by block."""
    result: list[Segment] = []
    seen: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or _is_guard(node):
            continue
        block = block_of(node)
        if result and result[-1].block == block:
            result[-1].nodes.append(node)
            continue
        if block is not None and block in seen:
            raise CalibrationError(
                f"block {block!r} is not contiguous in the captured graph (node {node.name!r} comes back to it "
                "after another block): blockwise calibration needs each block's nodes in one run")
        if block is not None:
            seen.add(block)
        result.append(Segment(block, [node]))
    return result


def _is_guard(node: Node) -> bool:
    return node.op == "call_module" and node.target == "_guards_fn"


def _fetch(graph_module: GraphModule, target: str):
    value = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value


@dataclass
class Block:
    """One block of the graph and the samples' inputs to it. `weights` maps linear node names to the float
    weights to use instead of the graph's (the dequantized weights of layers quantized so far);
    `input_scales` maps linear node names to a per-channel factor applied to their input (AWQ's explicit
    scales, written into the graph as a `mul` later)."""

    name: str
    index: int
    segment: Segment
    runner: "SequentialRunner"
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> factor on its input

    @property
    def linears(self) -> list[Node]:
        return [n for n in self.segment.nodes if n.op == "call_function" and n.target is aten.linear.default]

    def run(self, record: dict[str, Callable[[torch.Tensor], None]] | None = None, *,
            stop_after: Node | None = None, outputs: bool = False) -> None:
        """Run the block over every sample. `record[linear node name](x)` sees each input of that linear;
        `stop_after` ends each sample's run at that node (later nodes are not needed)."""
        self.runner._run_segment(self.segment, record or {}, self.weights, stop_after, outputs, self.input_scales)


class SequentialRunner:
    """See the module docstring. `batches`: calibration batches (tuples of positional inputs or dicts of
    keyword inputs) for `graph_module`, a pt2q capture."""

    def __init__(self, graph_module: GraphModule, batches: Iterable, *, progress: bool = True,
                 desc: str = "pt2q blockwise"):
        self.gm = graph_module
        self.progress, self.desc = progress, desc
        self.segments = segments(graph_module)
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.env: dict[Node, list] = {node: [] for node in placeholders}
        for index, batch in enumerate(batches):
            try:
                args, kwargs = normalize_inputs(batch)
            except TypeError as error:
                raise CalibrationError(f"calibration batch {index}: {error}") from error
            _check_finite_inputs(args, kwargs, index)
            flat = self._flatten(args, kwargs, index)
            if len(flat) != len(placeholders):
                raise CalibrationError(f"calibration batch {index} has {len(flat)} tensors, the captured graph "
                                       f"takes {len(placeholders)}")
            for node, value in zip(placeholders, flat):
                self.env[node].append(value)
        self.samples = len(self.env[placeholders[0]]) if placeholders else 0
        if self.samples == 0:
            raise CalibrationError("calib_data is empty: blockwise calibration needs at least one batch")
        self._last_reader = self._last_readers()

    def _flatten(self, args, kwargs, index) -> list:
        from torch.fx._pytree import tree_flatten_spec

        spec = getattr(self.gm, "_in_spec", None)
        if spec is None:
            return [*args, *kwargs.values()]
        try:
            return list(tree_flatten_spec((args, kwargs), spec))
        except Exception as error:  # noqa: BLE001 - re-raised with the batch named
            raise CalibrationError(f"calibration batch {index} does not match the captured inputs: {error}") from error

    def _last_readers(self) -> dict[Node, int]:
        """For every value: the index of the last segment that reads it."""
        where = {node: index for index, segment in enumerate(self.segments) for node in segment.nodes}
        last: dict[Node, int] = {}
        for node in self.gm.graph.nodes:
            readers = [where[user] for user in node.users if user in where]
            if readers:
                last[node] = max(readers)
        return last

    def blocks(self) -> list[str]:
        return [s.block for s in self.segments if s.block is not None]

    def run(self, on_block: Callable[[Block], None], after_block: Callable[[Block], None] | None = None) -> None:
        """Run every segment up to the last block; call `on_block` for each block before its final run and
        `after_block` after it (the block never runs again: its layers may be rewritten then)."""
        last_block = max((i for i, s in enumerate(self.segments) if s.block is not None), default=-1)
        if last_block < 0:
            raise CalibrationError("blockwise calibration found no transformer blocks (modules named layers.N, "
                                   "layer.N, h.N, blocks.N or block.N) in this model")
        bar = tqdm(total=len(self.blocks()), desc=self.desc, unit="block", disable=not self.progress)
        try:
            block_index = 0
            for index, segment in enumerate(self.segments[:last_block + 1]):
                if segment.block is None:
                    self._run_segment(segment, {}, {}, None, outputs=True)
                else:
                    bar.set_postfix_str(segment.block)
                    block = Block(segment.block, block_index, segment, self)
                    with torch.no_grad():
                        on_block(block)
                    self._run_segment(segment, {}, block.weights, None, outputs=True,
                                      input_scales=block.input_scales)
                    if after_block is not None:
                        after_block(block)
                    block_index += 1
                    bar.update(1)
                self._free(index)
        finally:
            bar.close()

    def _free(self, finished: int) -> None:
        for node in [n for n in self.env if self._last_reader.get(n, -1) <= finished]:
            del self.env[node]

    def _run_segment(self, segment: Segment, record: dict, weights: dict, stop_after: Node | None,
                     outputs: bool, input_scales: dict | None = None) -> None:
        input_scales = input_scales or {}
        members = set(segment.nodes)
        kept = [n for n in segment.nodes if any(u not in members for u in n.users)] if outputs else []
        for node in kept:
            self.env[node] = []
        last_use = {}
        for position, node in enumerate(segment.nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = position
        with torch.no_grad():
            for sample in range(self.samples):
                local: dict[Node, object] = {}

                def lookup(arg: Node):
                    if arg in local:
                        return local[arg]
                    if arg.op == "get_attr":
                        return _fetch(self.gm, arg.target)
                    return self.env[arg][sample]

                for position, node in enumerate(segment.nodes):
                    args = map_arg(node.args, lookup)
                    kwargs = map_arg(node.kwargs, lookup)
                    if node.name in input_scales:
                        args = (args[0] * input_scales[node.name], *args[1:])
                    if node.name in weights:
                        args = (args[0], weights[node.name], *args[2:])
                    if node.name in record:
                        record[node.name](args[0])
                    local[node] = self._execute(node, args, kwargs)
                    if node is stop_after:
                        break
                    for arg in node.all_input_nodes:
                        if last_use.get(arg) == position and arg in local and arg not in kept:
                            del local[arg]
                for node in kept:
                    self.env[node].append(local[node])

    def _execute(self, node: Node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            if _is_guard(node):
                return None
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise CalibrationError(f"blockwise calibration cannot run node {node.name!r} ({node.op})")

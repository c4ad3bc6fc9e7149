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

`block.record(...)` is the run for algorithms that quantize a block stage by stage (GPTQ): it computes only
what the recorded linears' inputs need, and keeps, per sample, the values computed before the first
recorded linear (a checkpoint, at most `checkpoint_ratio` times the bytes of the block's inputs). The next
`record` and the block's last run start from there instead of from the block's inputs, as long as no
weight override or input scale before that point changed (checked): each stage then computes only what
follows the previous stage's layers, so a block costs about one run instead of one per stage.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from .calibration import check_finite_inputs
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


@dataclass
class _Checkpoint:
    """Values of a block's nodes before `position` (index into its segment's nodes), per sample, and the
    weight overrides and input scales they were computed with."""

    position: int
    values: list[dict[Node, object]]
    overrides: dict[str, tuple]


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


def merge_blocks(parts: list[Segment], per_unit: int) -> list[Segment]:
    """Consecutive block segments joined `per_unit` at a time into one (named "first+...+last"), so an
    algorithm treats them as one block (AutoRound's n_blocks). A run of blocks is never joined across
    the nodes between two blocks."""
    if per_unit <= 1:
        return parts
    merged: list[Segment] = []
    count = 0
    for part in parts:
        if part.block is not None and merged and merged[-1].block is not None and count < per_unit:
            last = merged[-1]
            merged[-1] = Segment(f"{last.block}+{part.block}", last.nodes + part.nodes)
            count += 1
            continue
        merged.append(Segment(part.block, list(part.nodes)))
        count = 1
    return merged


def _bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


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
    checkpoint: "_Checkpoint | None" = field(default=None, repr=False)   # left by the last record()

    @property
    def linears(self) -> list[Node]:
        return [n for n in self.segment.nodes if n.op == "call_function" and n.target is aten.linear.default]

    def run(self, record: dict[str, Callable[[torch.Tensor], None]] | None = None, *,
            stop_after: Node | None = None, outputs: bool = False) -> None:
        """Run the block over every sample. `record[linear node name](x)` sees each input of that linear;
        `stop_after` ends each sample's run at that node (later nodes are not needed). Every node runs from
        the block's inputs, and the checkpoint of `record` is dropped (the caller may edit the graph's
        tensors in place after this, which no checkpoint could detect)."""
        self.checkpoint = None
        self.runner._run_segment(self.segment, record or {}, self.weights, stop_after, outputs, self.input_scales)

    def record(self, record: dict[str, Callable[[torch.Tensor], None]]) -> None:
        """Show `record[linear node name]` each input of that linear, over every sample, computing only the
        nodes those inputs need (the recorded linears themselves do not run). Starts from the checkpoint of
        the previous `record` when it is still valid, and leaves one before the first recorded linear (see
        the module docstring). The caller must change the block only through `weights` / `input_scales`
        between `record` calls (both are checked); in-place edits of the graph's tensors call for `run`."""
        self.checkpoint = self.runner._run_segment(
            self.segment, record, self.weights, None, False, self.input_scales, resume=self.checkpoint,
            save=True, only_needed=True) or self.checkpoint


    @functools.cached_property
    def outputs(self) -> list[Node]:
        """The block's nodes read after it (its outputs), in graph order."""
        members = set(self.segment.nodes)
        return [n for n in self.segment.nodes if any(u not in members for u in n.users)]

    @functools.cached_property
    def input_nodes(self) -> list[Node]:
        """The nodes from outside the block that its nodes read (constants excluded), in graph order."""
        members = set(self.segment.nodes)
        needed = {a for n in self.segment.nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        return [n for n in self.runner.gm.graph.nodes if n in needed]

    def inputs(self, sample: int) -> dict[Node, object]:
        """The values of `input_nodes` for one sample (called every training step: the nodes are found once)."""
        return {node: self.runner.env[node][sample] for node in self.input_nodes}

    def forward(self, inputs: dict[Node, object], weights: dict[str, torch.Tensor] | None = None,
                input_scales: dict[str, torch.Tensor] | None = None) -> dict[Node, object]:
        """The block's outputs (`outputs`) for one sample's `inputs` (see `inputs`), computed under the
        caller's autograd mode: with grad enabled, gradients flow into `weights` (linear node name -> the
        weight to use) and `input_scales` (linear node name -> a factor on its input) - what trained
        algorithms (AutoRound, TEQ) differentiate. The graph's own tensors are read, never changed."""
        weights, input_scales = weights or {}, input_scales or {}
        members = set(self.segment.nodes)
        last_use: dict[Node, int] = {}
        for index, node in enumerate(self.segment.nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = index
        outputs = set(self.outputs)
        local: dict[Node, object] = {}

        def lookup(arg: Node):
            if arg in local:
                return local[arg]
            if arg.op == "get_attr":  # detached: no gradient ever goes into the graph's own parameters
                value = _fetch(self.runner.gm, arg.target)
                return value.detach() if isinstance(value, torch.Tensor) else value
            return inputs[arg]

        for index, node in enumerate(self.segment.nodes):
            args = map_arg(node.args, lookup)
            if node.name in input_scales:
                args = (args[0] * input_scales[node.name], *args[1:])
            if node.name in weights:
                args = (args[0], weights[node.name], *args[2:])
            local[node] = self.runner._execute(node, args, map_arg(node.kwargs, lookup))
            for arg in node.all_input_nodes:
                if arg in members and last_use.get(arg) == index and arg not in outputs:
                    del local[arg]
        return {node: local[node] for node in self.outputs}


class SequentialRunner:
    """See the module docstring. `batches`: calibration batches (tuples of positional inputs or dicts of
    keyword inputs) for `graph_module`, a pt2q capture."""

    def __init__(self, graph_module: GraphModule, batches: Iterable, *, progress: bool = True,
                 desc: str = "pt2q blockwise", checkpoint_ratio: float = 1.0, blocks_per_unit: int = 1):
        self.gm = graph_module
        self.checkpoint_ratio = checkpoint_ratio
        self.progress, self.desc = progress, desc
        self.segments = merge_blocks(segments(graph_module), blocks_per_unit)
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.env: dict[Node, list] = {node: [] for node in placeholders}
        for index, batch in enumerate(batches):
            try:
                args, kwargs = normalize_inputs(batch)
            except TypeError as error:
                raise CalibrationError(f"calibration batch {index}: {error}") from error
            check_finite_inputs(args, kwargs, index)
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
                    checkpoint, block.checkpoint = block.checkpoint, None
                    self._run_segment(segment, {}, block.weights, None, outputs=True,
                                      input_scales=block.input_scales, resume=checkpoint)
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
                     outputs: bool, input_scales: dict | None = None, *, resume: _Checkpoint | None = None,
                     save: bool = False, only_needed: bool = False) -> _Checkpoint | None:
        """Run `segment` over every sample (see Block.run / Block.record). `only_needed`: compute only the
        recorded linears' inputs. `resume`: start from that checkpoint when it is still valid (a saving run
        leaves it intact, any other consumes it). `save`: return a checkpoint before the first recorded
        node, or None (nothing recorded, or over budget)."""
        input_scales = input_scales or {}
        nodes = segment.nodes
        position = {node: index for index, node in enumerate(nodes)}
        members = set(nodes)
        escaping = {n for n in nodes if any(u not in members for u in n.users)}
        kept = [n for n in nodes if n in escaping] if outputs else []
        for node in kept:
            self.env[node] = []
        if stop_after is not None:
            nodes = nodes[:position[stop_after] + 1]

        def overrides(before: int) -> dict[str, tuple]:
            return {n.name: (weights.get(n.name), input_scales.get(n.name)) for n in segment.nodes[:before]
                    if n.name in weights or n.name in input_scales}

        if resume is not None:
            now = overrides(resume.position)
            if now.keys() != resume.overrides.keys() or any(
                    a is not b for name in now for a, b in zip(now[name], resume.overrides[name])):
                resume = None  # an override before the checkpoint changed: start from the block's inputs
        available = set(resume.values[0]) if resume is not None else set()
        # What to compute: every node (up to stop_after), or only the ancestors of the recorded inputs; a
        # resumed run takes what the checkpoint holds and computes the rest from the checkpoint's position.
        if only_needed:
            goals = [n.args[0] for n in nodes if n.name in record and isinstance(n.args[0], Node)]
        else:
            goals = nodes[resume.position if resume is not None else 0:] + kept
        needed: set[Node] = set()
        stack = [n for n in goals if n in members and n not in available]
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(a for a in node.all_input_nodes if a in members and a not in available)
        save_at = min((position[n] for n in nodes if n.name in record), default=None) if save else None
        # Values computed before the checkpoint and read after it stay alive until it is taken.
        later = set() if save_at is None else \
            {a for n in segment.nodes[save_at:] for a in n.all_input_nodes if a in members} | escaping
        last_use: dict[Node, int] = {}
        for index, node in enumerate(nodes):
            if node in needed or node.name in record:
                for arg in node.all_input_nodes:
                    last_use[arg] = max(index, save_at) if save_at is not None and arg in later else index
        inputs = {a for n in segment.nodes for a in n.all_input_nodes if a not in members and a in self.env}
        saved: list[dict] | None = []
        budget = used = 0.0
        with torch.no_grad():
            for sample in range(self.samples):
                if resume is None:
                    local: dict[Node, object] = {}
                elif save:
                    local = dict(resume.values[sample])
                else:
                    local, resume.values[sample] = resume.values[sample], {}

                def lookup(arg: Node):
                    if arg in local:
                        return local[arg]
                    if arg.op == "get_attr":
                        return _fetch(self.gm, arg.target)
                    return self.env[arg][sample]

                for index, node in enumerate(nodes):
                    if index == save_at and saved is not None:
                        snapshot = {n: v for n, v in local.items() if n in later}
                        budget += self.checkpoint_ratio * _bytes(self.env[a][sample] for a in inputs)
                        used += _bytes(snapshot.values())
                        if used <= budget:
                            saved.append(snapshot)
                        else:
                            saved = None
                    compute = node in needed
                    if not compute and node.name not in record:
                        continue
                    args = map_arg(node.args, lookup)
                    if node.name in input_scales:
                        args = (args[0] * input_scales[node.name], *args[1:])
                    if node.name in record:
                        record[node.name](args[0])
                    if not compute:
                        continue
                    if node.name in weights:
                        args = (args[0], weights[node.name], *args[2:])
                    local[node] = self._execute(node, args, map_arg(node.kwargs, lookup))
                    for arg in node.all_input_nodes:
                        if last_use.get(arg) == index and arg in local and arg not in kept:
                            del local[arg]
                for node in kept:
                    self.env[node].append(local[node])
        if save_at is None or saved is None:
            return None
        return _Checkpoint(save_at, saved, overrides(save_at))

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

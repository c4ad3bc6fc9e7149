"""Weight-only quantization of a captured graph: plan -> calibrate -> apply, for every algorithm.

- `plan(graph_module, config)` finds the linears to quantize (constant 2-D weights; `set_local` rules; an
  LM head / tied embedding stays float unless a rule names it) and checks each layer's format against its
  shape. Nothing in the graph changes yet.
- `calibrate(graph_module, plan, calib_data)` runs the sequential algorithms (GPTQ, AWQ) block by block on
  the captured graph (pt2q.blockwise): each block sees the quantized outputs of the blocks before it, and
  its layers' recorders (GPTQ's Hessians, AWQ's activation statistics) live only while it is processed.
- `apply(graph_module, plan)` quantizes what is left with round-to-nearest and writes every weight in its
  packed graph form (passes/pack_weights.py). Returns a `WeightOnlyReport`.

Each algorithm is one module of `pt2q.algorithms`; what it does to one block is a function in
`BLOCK_ALGORITHMS` below.
"""
from __future__ import annotations

import collections
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from .algorithms.rtn import QuantizedWeight, WeightFormat, rtn_quantize
from .errors import CalibrationError, ConfigError
from .graph import class_path, get_constant, module_fqn, module_stack

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Linears kept float unless a set_local rule names them: the output head of a language model.
LM_HEAD_NAMES = re.compile(r"(?:^|.*\.)(?:lm_head|embed_out)")
# The weighted ops whose weight (argument 1) is quantized: linear, and convs (groups along in * kernel).
WEIGHTED_OPS = frozenset({aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})


@dataclass
class Layer:
    """One linear (or conv) to quantize: its node, module name, weight constant and the config it gets."""

    node: str
    module: str
    weight: str
    config: object
    fmt: WeightFormat
    shape: tuple[int, ...]


@dataclass
class WeightOnlyPlan:
    config: object
    layers: dict[str, Layer]
    kept_float: dict[str, str]                        # node name -> why it stays float
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    calibrated: bool = False
    calibration_seconds: float = 0.0
    state: dict = field(default_factory=dict)        # algorithm findings (AWQ's groups and scales)
    packed: dict[str, dict] = field(default_factory=dict)  # node name -> PackWeights' report entry


@dataclass
class WeightOnlyReport:
    """Per quantized layer: algorithm, bits, group size; the layers kept float and why; byte counts."""

    layers: dict[str, dict]
    kept_float: dict[str, str]
    float_bytes: int
    packed_bytes: int
    calibration_seconds: float
    findings: dict = field(default_factory=dict)   # per algorithm: what it measured (AutoRound's block losses)

    def summary(self) -> str:
        ratio = self.float_bytes / max(self.packed_bytes, 1)
        return (f"weight-only: {len(self.layers)} linears quantized ({self.float_bytes / 2**20:.1f} MiB float -> "
                f"{self.packed_bytes / 2**20:.1f} MiB packed, {ratio:.1f}x), {len(self.kept_float)} kept float")


def _rule_config(config, node: Node):
    """(matched, config) for `node` from config.local_rules: name rules beat class rules, later beat earlier."""
    stack = module_stack(node)
    found, matched = None, False
    for target, local in config.local_rules:
        if isinstance(target, str) and any(re.fullmatch(target, fqn) for fqn, _ in stack):
            found, matched = local, True
    if matched:
        return True, found
    classes = {cls for _, cls in stack}
    for target, local in config.local_rules:
        if isinstance(target, type) and class_path(target) in classes:
            found, matched = local, True
    return matched, found


def _tied_to_embedding(gm: GraphModule) -> set[int]:
    """ids of tensors an embedding lookup reads: a linear sharing one is a tied LM head."""
    tied = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            table = get_constant(gm, node.args[0])
            if table is not None:
                tied.add(id(table))
    return tied


def plan(graph_module: GraphModule, config) -> WeightOnlyPlan:
    """Find the layers `config` quantizes in `graph_module` (see the module docstring)."""
    from .passes.manager import PassManager
    from .passes.fold_constant_weights import FoldConstantWeights
    from .passes.matmul_to_linear import MatmulToLinear

    config.validate()
    for _, local in config.local_rules:
        if local is not None:
            local.validate()
    fold = [FoldConstantWeights()] if FoldConstantWeights.applies(graph_module) else []
    PassManager([*fold, MatmulToLinear()])(graph_module)
    tied = _tied_to_embedding(graph_module)
    layers, kept = {}, {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHTED_OPS:
            continue
        weight = get_constant(graph_module, node.args[1])
        fqn = module_fqn(node) or node.name
        if weight is None or not weight.dtype.is_floating_point:
            kept[node.name] = "weight is not a constant float tensor"
            continue
        if weight.dim() != 2 and config.group_dim == 0:
            kept[node.name] = "group_dim=0 applies to 2-D (linear) weights only"
            continue
        matched, local = _rule_config(config, node)
        if matched and local is None:
            kept[node.name] = "set_local(..., None)"
            continue
        if not matched and (LM_HEAD_NAMES.fullmatch(fqn) or id(weight) in tied):
            kept[node.name] = "LM head / tied embedding (name it in set_local to quantize it)"
            continue
        layer_config = local if matched else config
        fmt = layer_config.weight_format()
        columns = weight[0].numel() if fmt.group_dim == 1 else weight.shape[0]
        if fmt.group_size != -1 and fmt.group_size > columns:
            raise ConfigError(f"{type(layer_config).__name__}.group_size={fmt.group_size} is larger than layer "
                              f"{fqn!r}'s {columns} {'input' if fmt.group_dim == 1 else 'output'} channels: use a "
                              f"group size <= {columns}, -1 (per channel), or set_local({fqn!r}, ...) for this layer")
        if layer_config.sequential and node.target is not aten.linear.default:
            layer_config = _rtn_fallback(layer_config)  # the block algorithms treat linears; convs get RTN
        layers[node.name] = Layer(node.name, fqn, node.args[1].target, layer_config, fmt, tuple(weight.shape))
    if not layers:
        log.warning("weight-only: no linear of this model is quantized (%d kept float)", len(kept))
    return WeightOnlyPlan(config, layers, kept)


def sequential_configs(config) -> list:
    """The configs among `config` and its set_local rules that calibrate block by block (GPTQ, AWQ)."""
    return [c for c in (config, *(local for _, local in config.local_rules)) if c is not None and c.sequential]


def _sequential_layers(plan_: WeightOnlyPlan) -> list[Layer]:
    return [layer for layer in plan_.layers.values() if layer.config.sequential]


def _rtn_fallback(config):
    from .config import RTNConfig

    return RTNConfig(bits=config.bits, group_size=config.group_size, sym=config.sym, dtype=config.dtype,
                     group_dim=config.group_dim)


def _rtn(layer: Layer, weight: torch.Tensor) -> QuantizedWeight:
    config = layer.config
    return rtn_quantize(weight, layer.fmt, quantile=getattr(config, "quantile", 1.0),
                        mse_clip=getattr(config, "mse_clip", False))


# Calibration-free algorithms: config.algorithm -> how one layer's weight is quantized. A layer of a
# sequential algorithm that no block holds (outside every block) falls back to round to nearest.
def _hqq(layer: Layer, weight: torch.Tensor) -> QuantizedWeight:
    from .algorithms.hqq import hqq_quantize

    config = layer.config
    return hqq_quantize(weight, layer.fmt, iters=config.iters, lp_norm=config.lp_norm, beta=config.beta,
                        kappa=config.kappa, early_stop=config.early_stop, fit_scale=config.fit_scale)


LAYER_ALGORITHMS = {"rtn": _rtn, "hqq": _hqq}


def _quantize_layer(layer: Layer, weight: torch.Tensor) -> QuantizedWeight:
    return LAYER_ALGORITHMS.get(layer.config.algorithm, _rtn)(layer, weight)


# -- sequential algorithms, one block at a time ------------------------------------------------------------
def _stages(block, layers: dict[str, Layer]) -> list[list[Node]]:
    """The block's target linears grouped by shared input (q/k/v; gate/up), in graph order."""
    stages: dict[Node, list[Node]] = {}
    for linear in block.linears:
        if linear.name in layers:
            stages.setdefault(linear.args[0], []).append(linear)
    return list(stages.values())


def _gptq_block(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    from .algorithms.gptq import HessianRecorder, gptq_quantize

    stages = _stages(block, layers)
    if not all(layer.config.true_sequential for layer in layers.values()):
        stages = [[linear for stage in stages for linear in stage]] if stages else []
    for stage in stages:
        # One Hessian per distinct input (q/k/v read the same tensor): recorded at the first linear reading it.
        source = {linear.name: (linear.args[0], id(block.input_scales.get(linear.name))) for linear in stage}
        first = {}
        for linear in stage:
            first.setdefault(source[linear.name], linear.name)
        recorders = {key: HessianRecorder() for key in first}
        # Only what these inputs need runs, from where the previous stage's inputs were (blockwise.Block.record).
        block.record({name: recorders[key] for key, name in first.items()})
        for linear in stage:
            layer = layers[linear.name]
            weight = get_constant(gm, linear.args[1])
            hessian, count = recorders[source[linear.name]].hessian()
            if count == 0:
                raise CalibrationError(f"GPTQ: layer {layer.module!r} saw no input during calibration")
            qweight = gptq_quantize(weight, hessian, layer.fmt, block_size=layer.config.block_size,
                                    percdamp=layer.config.percdamp, act_order=layer.config.act_order,
                                    static_groups=layer.config.static_groups, mse_clip=layer.config.mse_clip)
            plan_.quantized[linear.name] = qweight
            block.weights[linear.name] = qweight.dequantize()


def _layerwise_block(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    """A calibration-free algorithm's layers inside a block calibrated for another one (set_local): quantized
    before the block's last run, so the blocks after it see their quantized outputs."""
    for linear in block.linears:
        if linear.name in layers:
            qweight = _quantize_layer(layers[linear.name], get_constant(gm, linear.args[1]))
            plan_.quantized[linear.name] = qweight
            block.weights[linear.name] = qweight.dequantize()


def _attr_references(gm: GraphModule) -> collections.Counter:
    """How many get_attr nodes refer to each tensor (by id)."""
    return collections.Counter(id(get_constant(gm, n)) for n in gm.graph.nodes if n.op == "get_attr")


def _single_use_constant(gm: GraphModule, node, references: collections.Counter) -> torch.Tensor | None:
    """The tensor behind get_attr `node` when that node is its only reference (`references`:
    _attr_references) with one user, else None (scaling a shared tensor in place would change another
    layer too)."""
    value = get_constant(gm, node)
    if value is None or len(node.users) != 1:
        return None
    return value if references[id(value)] == 1 else None


def _scaled_tensors(gm: GraphModule, group, references: collections.Counter
                    ) -> tuple[list[tuple[torch.Tensor, str]], str]:
    """[(tensor, how)] to scale in place for an AWQ scale on `group` (how: "div" a vector, "div_rows", or
    "mul_cols"), or ([], why not)."""
    from .passes.smooth_quant_groups import Absorb

    if not group.absorbed:
        return [], group.reason or "no producer absorbs the scale"
    producer, absorber = group.producer, group.absorber
    edits: list[tuple[torch.Tensor, str]] = []
    if absorber.how is Absorb.AFFINE_ARGS:
        for position, index in enumerate(absorber.scaled_args):
            arg = producer.args[index] if index < len(producer.args) else None
            if arg is None:
                if position == 0:
                    return [], f"{producer.name} has no affine weight to absorb the scale"
                continue
            edits.append((_single_use_constant(gm, arg, references), "div"))
    elif absorber.how in (Absorb.OUTPUT_ROWS, Absorb.LINEAR_OPERAND):
        target = group.absorb_target if absorber.how is Absorb.LINEAR_OPERAND else producer
        edits.append((_single_use_constant(gm, target.args[1], references), "div_rows"))
        if len(target.args) > 2 and target.args[2] is not None:
            edits.append((_single_use_constant(gm, target.args[2], references), "div"))
    elif absorber.how is Absorb.CONSTANT_OPERAND:
        constants = [_single_use_constant(gm, a, references) for a in producer.args[:2]]
        constants = [c for c in constants if c is not None and c.numel() == group.channels]
        if not constants:
            return [], f"{producer.name}: the per-channel operand is not a plain constant"
        edits.append((constants[0], "div"))
    for consumer in group.consumers:
        edits.append((_single_use_constant(gm, consumer.args[1], references), "mul_cols"))
    if any(tensor is None for tensor, _ in edits):
        return [], "a tensor to scale is shared with another layer"
    return edits, ""


def _apply_scales(edits: list[tuple[torch.Tensor, str]], scales: torch.Tensor) -> None:
    for tensor, how in edits:
        s = scales.to(tensor.dtype)
        if how == "div":
            tensor.data.div_(s.reshape(tensor.shape))
        elif how == "div_rows":
            tensor.data.div_(s.reshape(-1, *([1] * (tensor.dim() - 1))))
        else:
            tensor.data.mul_(s)


def _absorb_groups(gm: GraphModule, plan_: WeightOnlyPlan) -> dict[frozenset, object]:
    """The SmoothQuant absorb groups of the graph (passes/smooth_quant_groups.py) by the node names of their
    consumers. Found once per plan, at the first block, before any block's layers are packed (AWQ and TEQ
    both place their scales with them)."""
    if "absorb_groups" not in plan_.state:
        plan_.state["absorb_groups"] = _awq_groups(gm)
    return {frozenset(c.name for c in g.consumers): g for g in plan_.state["absorb_groups"]}


def _group_of(groups: dict[frozenset, object], stage: list[Node]):
    """The absorb group whose consumers include all of `stage` (linears sharing an input), or None."""
    names = {linear.name for linear in stage}
    return next((g for consumers, g in groups.items() if names <= consumers), None)


def _scale_placement(gm: GraphModule, group, block, references: collections.Counter
                     ) -> tuple[list[tuple[torch.Tensor, str]], list[torch.Tensor | None], str]:
    """Where a per-channel scale on `group` goes: (the tensors to fold it into, see _scaled_tensors - empty
    when it needs an explicit input factor; the consumers' weight tensors, None for one shared with another
    layer; why it is not folded)."""
    edits, note = _scaled_tensors(gm, group, references)
    # A producer outside this block already ran: its outputs are stored, so the scale cannot go there.
    if edits and not ({group.producer, group.absorb_target} - {None}) <= set(block.segment.nodes):
        edits, note = [], "the producer is outside this block"
    return edits, [_single_use_constant(gm, c.args[1], references) for c in group.consumers], note


def _place_scales(group, edits: list[tuple[torch.Tensor, str]], consumer_weights: list[torch.Tensor],
                  scales: torch.Tensor, block, plan_: WeightOnlyPlan) -> None:
    """Apply `scales` on `group` in place (exact in fp32): folded into `edits` when there are any, else the
    consumers' input columns times `scales` and their inputs times `1/scales` - in `block.input_scales` for
    the block's remaining runs, and in the graph as a `mul` at apply (passes/scale_linear_inputs.py)."""
    if edits:
        _apply_scales(edits, scales)
        return
    _apply_scales([(w, "mul_cols") for w in consumer_weights], scales)
    for consumer in group.consumers:
        block.input_scales[consumer.name] = 1 / scales
    plan_.state.setdefault("awq_input_scales", {})[tuple(c.name for c in group.consumers)] = 1 / scales


def _teq_block(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    """TEQ (pt2q.algorithms.teq): the block's scales trained and placed (_teq_scales), then every TEQ layer
    of the block rounded to nearest."""
    _teq_scales(gm, block, layers, plan_)
    for linear in block.linears:
        if linear.name in layers:
            qweight = rtn_quantize(get_constant(gm, linear.args[1]), layers[linear.name].fmt)
            plan_.quantized[linear.name] = qweight
            block.weights[linear.name] = qweight.dequantize()


def _teq_scales(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    """A scale per input channel for each absorb group of the block's TEQ layers (`layers`), all trained
    together on the block's output MSE - the block with weights Q(W s) and inputs x / s against the block
    with its float weights, both on the same (quantized-stream) inputs - then placed like AWQ's scales
    (_place_scales: folded, or explicit input factors). While training, every scale acts as an input factor
    `1/s`, which equals folding it into the producer (a norm's weight, a previous linear's rows: row
    scaling commutes with round to nearest when groups lie along the input dimension). The training
    settings are those of the block's first TEQ layer's config; `plan_.state["teq"][block name]` records
    the groups, scales and losses."""
    from .algorithms.teq import fake_quantize, train_scales

    start = time.perf_counter()
    linears = [linear for linear in block.linears if linear.name in layers]
    config = layers[linears[0].name].config
    groups, references = _absorb_groups(gm, plan_), _attr_references(gm)
    trainable: list[tuple] = []     # (group, edits, consumer weights)
    for stage in _stages(block, layers):
        group = _group_of(groups, stage)
        modules = [layers[linear.name].module for linear in stage]
        if group is None:
            log.debug("teq %s: no absorb group found, round to nearest", modules)
            continue
        if any(group is g for g, _, _ in trainable):
            continue
        edits, consumer_weights, note = _scale_placement(gm, group, block, references)
        # A consumer already quantized by another algorithm cannot take a scale on its float weight any more.
        if any(w is None for w in consumer_weights) or any(
                c.name not in layers and c.name in block.weights for c in group.consumers):
            log.debug("teq %s: %s, round to nearest", modules, "a consumer's weight is shared or already quantized")
            continue
        trainable.append((group, edits, consumer_weights))
        log.debug("teq %s: trained scale, %s", modules, "folded" if edits else f"explicit mul ({note})")
    scaled = {c.name for group, _, _ in trainable for c in group.consumers}
    fixed = {linear.name: rtn_quantize(get_constant(gm, linear.args[1]), layers[linear.name].fmt).dequantize()
             for linear in linears if linear.name not in scaled}

    samples, outputs = block.runner.samples, block.outputs
    with torch.no_grad():   # the targets: the block with its float weights (and anything placed before TEQ)
        targets = [block.forward(block.inputs(i), dict(block.weights), dict(block.input_scales))
                   for i in range(samples)]
    compared = [n for n in outputs if isinstance(targets[0][n], torch.Tensor) and targets[0][n].is_floating_point()]
    if not compared:
        raise CalibrationError(f"TEQ: block {block.name!r} has no float output to train its scales on")

    def loss_with(scales: list[torch.Tensor]):
        weights, input_scales = {**block.weights, **fixed}, dict(block.input_scales)
        for (group, _, consumer_weights), s in zip(trainable, scales):
            for consumer, weight in zip(group.consumers, consumer_weights):
                weight = weight.detach() * s
                weights[consumer.name] = (fake_quantize(weight, layers[consumer.name].fmt)
                                          if consumer.name in layers else weight)
                input_scales[consumer.name] = input_scales[consumer.name] / s if consumer.name in input_scales \
                    else 1 / s

        def loss_of(sample: int) -> torch.Tensor:
            result = block.forward(block.inputs(sample), weights, input_scales)
            return sum(torch.nn.functional.mse_loss(result[n], targets[sample][n]) for n in compared)
        return loss_of

    info = {"layers": [layers[linear.name].module for linear in linears],
            "groups": [[module_fqn(c) or c.name for c in group.consumers] for group, _, _ in trainable]}
    if trainable:
        channels = [consumer_weights[0].shape[1] for _, _, consumer_weights in trainable]
        result = train_scales(channels, loss_with, samples, steps=config.steps, lr=config.lr, seed=config.seed,
                              progress=block.runner.progress, desc=f"pt2q teq {block.name}")
        if result.kept:
            for (group, edits, consumer_weights), scales in zip(trainable, result.scales):
                _place_scales(group, edits, consumer_weights, scales, block, plan_)
        info.update(rtn_loss=result.rtn_loss, trained_loss=result.trained_loss, kept=result.kept,
                    folded=[bool(edits) for _, edits, _ in trainable], scales=result.scales, steps=result.steps)
        log.info("teq %s: block output MSE %.4g (RTN) -> %.4g with the trained scales (%d steps, %d groups)%s",
                 block.name, result.rtn_loss, result.trained_loss, result.steps, len(trainable),
                 "" if result.kept else ": not lower, the block keeps s = 1 (RTN)")
    info["seconds"] = time.perf_counter() - start
    plan_.state.setdefault("teq", {})[block.name] = info


def _awq_block(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    """Scales stage by stage on the float block (each stage's input recorded with the scales so far),
    then per-layer clip search, then quantization."""
    from .algorithms.awq import InputStatistics, awq_quantize, search_clip, search_scale

    groups = _absorb_groups(gm, plan_)
    samples = block.runner.samples
    inputs: dict[str, torch.Tensor] = {}
    for stage in _stages(block, layers):
        sampler = InputStatistics(samples)
        block.run({stage[0].name: sampler}, stop_after=stage[0])
        x = sampler.sample
        first = layers[stage[0].name]
        group = _group_of(groups, stage)
        note = "no absorb group found for these layers"
        if first.config.auto_scale and group is not None:
            edits, consumer_weights, note = _scale_placement(gm, group, block, _attr_references(gm))
            if all(w is not None for w in consumer_weights):
                scales, ratio, error, plain = search_scale(x, consumer_weights, first.fmt, x_mean=sampler.mean)
                if ratio is not None:
                    _place_scales(group, edits, consumer_weights, scales, block, plan_)
                    x = x / scales
                note = (f"r={ratio} ({'folded' if edits else 'explicit mul'})" if ratio is not None
                        else "s=1 (RTN was best)")
                plan_.state.setdefault("awq_scales", {})[stage[0].name] = {
                    "layers": [layers[l.name].module for l in stage], "ratio": ratio,
                    "error": error, "rtn_error": plain, "how": note}
        log.debug("awq %s: %s", [layers[l.name].module for l in stage], note)
        for linear in stage:
            inputs[linear.name] = x
    for linear in block.linears:
        if linear.name not in layers:
            continue
        layer = layers[linear.name]
        weight = get_constant(gm, linear.args[1])
        clip = search_clip(inputs[linear.name][:1024], weight, layer.fmt) if layer.config.auto_clip else None
        qweight = awq_quantize(weight, layer.fmt, clip)
        plan_.quantized[linear.name] = qweight
        block.weights[linear.name] = qweight.dequantize()


def _autoround_block(gm: GraphModule, block, layers: dict[str, Layer], plan_: WeightOnlyPlan) -> None:
    """Train the rounding of the block's AutoRound layers on its output error against the float block
    (pt2q.algorithms.autoround). The float model's stream of block inputs is kept beside the quantized one
    (`plan_.state["autoround_float"]`: the previous block's output nodes and their float values per sample),
    so every block's targets are the float model's own outputs. The block's training settings are those
    of its first AutoRound layer's config."""
    from .algorithms.autoround import RoundingParameters, SampleStore, tune

    linears = {linear.name: linear for linear in block.linears if linear.name in layers}
    config = layers[next(iter(linears))].config
    samples, outputs = block.runner.samples, block.outputs
    previous_nodes, previous = plan_.state.get("autoround_float", ((), None))

    def float_inputs(sample: int) -> dict:
        inputs = block.inputs(sample)
        if previous is not None:
            values = dict(zip(previous_nodes, previous[sample]))
            inputs = {node: values.get(node, value) for node, value in inputs.items()}
        return inputs

    # The float block on the float stream: the targets, and (use_quant_input=False) the inputs to train on.
    targets = SampleStore(on_disk=config.low_mem)
    float_block_inputs = None if config.use_quant_input else SampleStore(on_disk=config.low_mem)
    input_nodes = block.input_nodes
    with torch.no_grad():
        for sample in range(samples):
            inputs = float_inputs(sample)
            result = block.forward(inputs)
            targets.append(tuple(result[node] for node in outputs))
            if float_block_inputs is not None:
                float_block_inputs.append(tuple(inputs[node] for node in input_nodes))
    if previous is not None:
        previous.close()
    compared = [i for i, value in enumerate(targets[0]) if isinstance(value, torch.Tensor) and value.is_floating_point()]
    if not compared:
        raise CalibrationError(f"AutoRound: block {block.name!r} has no float output to compare against the float model")

    token_masks = plan_.state.get("autoround_token_mask")

    def output_error(actual: torch.Tensor, expected: torch.Tensor, sample: int) -> torch.Tensor:
        """Mean squared error, over the positions the batch's attention_mask keeps when the output is laid
        out [batch, positions, ...] (padding is not what the model is for; the field masks it too)."""
        squared = (actual.float() - expected.float()).pow(2)
        mask = None if token_masks is None else token_masks[sample]
        if mask is None or squared.dim() < 2 or tuple(squared.shape[:2]) != tuple(mask.shape):
            return squared.mean()
        weight = mask.to(squared.dtype).reshape(*mask.shape, *([1] * (squared.dim() - 2)))
        per_position = squared[0, 0].numel()
        return (squared * weight).sum() / (weight.sum() * per_position).clamp(min=1)

    def loss_of(indices: list[int], weights: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for sample in indices:
            inputs = (block.inputs(sample) if float_block_inputs is None
                      else dict(zip(input_nodes, float_block_inputs[sample])))
            # bf16 autocast for training only: the losses measured without gradients are fp32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp and torch.is_grad_enabled()):
                result = block.forward(inputs, {**block.weights, **weights}, block.input_scales)
            expected = targets[sample]
            total = total + sum(output_error(result[outputs[i]], expected[i], sample) for i in compared)
        return total / len(indices)

    parameters = {name: RoundingParameters(get_constant(gm, linear.args[1]), layers[name].fmt,
                                           config.enable_minmax_tuning) for name, linear in linears.items()}
    # On the quantized stream, the block's last run (pt2q.blockwise) computes its outputs with the final
    # weights on the very inputs trained on: the final loss is measured there, not by another pass.
    final_from_last_run = float_block_inputs is None
    try:
        with torch.enable_grad():
            result = tune(parameters, loss_of, samples, config.tune_settings(), progress=block.runner.progress,
                          desc=f"autoround {block.name}", measure_final=not final_from_last_run)
    except FloatingPointError as error:
        targets.close()
        raise CalibrationError(f"AutoRound: block {block.name!r}: {error}; lower AutoRoundConfig.lr or check the "
                               "calibration data") from error
    finally:
        if float_block_inputs is not None:
            float_block_inputs.close()
    for name, parameter in parameters.items():
        qweight = parameter.quantized()
        plan_.quantized[name] = qweight
        block.weights[name] = qweight.dequantize()
    plan_.state["autoround_float"] = (outputs, targets)   # the next block's float inputs
    finding = plan_.state.setdefault("autoround", {})[block.name] = {
        "layers": [layers[name].module for name in linears], "initial_loss": result.initial_loss,
        "final_loss": result.final_loss, "best_iteration": result.best_iteration, "iterations": result.iterations,
        "seconds": result.seconds}

    def log_losses() -> None:
        log.info("autoround %s: block loss %.4g -> %.4g (best at step %d of %d, %.1f s)", block.name,
                 result.initial_loss, finding["final_loss"], result.best_iteration, result.iterations, result.seconds)

    def record_final_loss(finished) -> None:
        """After the block's last run: its outputs (in the runner's values) against the float targets."""
        with torch.no_grad():
            total = sum(float(sum(output_error(finished.runner.env[outputs[i]][sample], targets[sample][i], sample)
                                  for i in compared)) for sample in range(samples))
        finding["final_loss"] = total / samples
        log_losses()

    if final_from_last_run:
        plan_.state["autoround_after_block"] = record_final_loss
    else:
        log_losses()


def _awq_groups(gm: GraphModule) -> list:
    from .passes.smooth_quant_groups import SmoothQuantGroups

    analysis = SmoothQuantGroups()
    analysis.call(gm)
    return [group for group in analysis.report if not group.skipped]


BLOCK_ALGORITHMS = {"gptq": _gptq_block, "awq": _awq_block, "autoround": _autoround_block, "teq": _teq_block}


def _block_algorithm(algorithm: str):
    return BLOCK_ALGORITHMS.get(algorithm, _layerwise_block)


def _cut_sequences(graph_module: GraphModule, batches: list, seqlen: int) -> list:
    """The batches with every 2-D tensor input (token ids, masks) cut to `seqlen` positions (AutoRound's
    seqlen). Refused for a capture whose sequence length is static: its graph would not run shorter inputs."""
    from .capture import normalize_inputs

    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    static = [n.name for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 2
              and isinstance(n.meta["val"].shape[1], int) and n.meta["val"].shape[1] != seqlen]
    cut = []
    for index, batch in enumerate(batches):
        args, kwargs = normalize_inputs(batch)

        def shorten(value):
            return value[:, :seqlen] if isinstance(value, torch.Tensor) and value.dim() == 2 else value

        longer = any(isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] > seqlen for v in (*args, *kwargs.values()))
        if longer and static:
            raise ConfigError(f"AutoRoundConfig.seqlen={seqlen}: calibration batch {index} is longer, but the model was "
                              f"captured with a static sequence length (input {static[0]!r}): capture it with "
                              "dynamic_shapes='batch_seq', or set seqlen=None and cut the calibration data yourself")
        args, kwargs = tuple(shorten(a) for a in args), {k: shorten(v) for k, v in kwargs.items()}
        cut.append(kwargs if not args else (args if not kwargs else (args, kwargs)))
    return cut


def _sequence_is_dynamic(graph_module: GraphModule, name: str) -> bool:
    """Whether placeholder `name` was captured [batch, seq] with a symbolic seq (dynamic_shapes="batch_seq")."""
    node = next((n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == name), None)
    value = None if node is None else node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 2 and isinstance(value.shape[1], torch.SymInt)


def _trim_padding(graph_module: GraphModule, batches: list) -> tuple[list, float]:
    """The batches with their trailing padding cut off: every [batch, seq] input of a batch (ids, token
    types, the mask) keeps the positions up to its longest row's last unmasked one (at least 2: a dynamic
    dimension of torch.export starts at 2). Returns them and the share of positions kept.

    For AutoRound this changes no loss: its loss leaves padded positions out, and a padded position is
    masked as a key, so it never reaches a real one (right padding; left padding is left as it is). What
    it saves is the compute on padding, most of a batch of short sentences padded to a fixed length.
    Done only where it can run: a capture with a dynamic sequence dimension and a keyword `attention_mask`;
    a batch holding any other tensor with a dimension of the sequence's length is left whole."""
    from .capture import normalize_inputs

    if not _sequence_is_dynamic(graph_module, "attention_mask"):
        return batches, 1.0
    trimmed, kept, total = [], 0, 0
    for batch in batches:
        args, kwargs = normalize_inputs(batch)
        mask = kwargs.get("attention_mask")
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            trimmed.append(batch)
            continue
        seq = mask.shape[1]
        laid_out = [t for t in tensors if t.dim() == 2 and t.shape == mask.shape]
        elsewhere = any(seq in t.shape for t in tensors if not any(t is u for u in laid_out))
        used = (mask != 0).any(0).nonzero()
        length = min(seq, max(2, int(used.max()) + 1 if used.numel() else 0))
        total += mask.numel()
        if elsewhere or length == seq:
            kept += mask.numel()
            trimmed.append(batch)
            continue
        kept += mask.shape[0] * length

        def cut(value):
            return value[:, :length] if any(value is t for t in laid_out) else value

        args, kwargs = tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
        trimmed.append(kwargs if not args else (args, kwargs))
    return trimmed, (kept / total if total else 1.0)


def calibrate(graph_module: GraphModule, plan_: WeightOnlyPlan, calib_data: Iterable, *,
              progress: bool = True) -> int:
    """Run the plan's sequential algorithm block by block (a no-op for RTN). Layers outside every block
    are left to `apply` (round to nearest). Returns the number of batches used (at most n_samples)."""
    from .blockwise import SequentialRunner
    import itertools

    config = plan_.config
    # A set_local rule can ask for GPTQ / AWQ under a global RTNConfig: those layers need the blocks run too.
    sequential = _sequential_layers(plan_)
    if not config.sequential and not sequential:
        plan_.calibrated = True
        return 0
    if plan_.calibrated:
        raise CalibrationError("this model was already calibrated block by block (its weights are quantized and "
                               "AWQ's scales folded in); call pt2q.prepare() again to calibrate anew")
    start = time.perf_counter()
    configs = [config] if config.sequential else [layer.config for layer in sequential]
    limits = [c.n_samples for c in configs]
    n_samples = None if None in limits else max(limits)  # AutoRound's None: every batch given
    batches = list(itertools.islice(iter(calib_data), n_samples))
    for c in configs:
        if c.algorithm == "autoround" and c.n_samples is not None and c.n_samples > len(batches):
            raise CalibrationError(f"AutoRoundConfig.n_samples={c.n_samples} but calib_data has {len(batches)} batches: "
                                   f"pass more calibration data or set n_samples <= {len(batches)} (None: all)")
    seqlen = next((c.seqlen for c in configs if getattr(c, "seqlen", None) is not None), None)
    if seqlen is not None:
        batches = _cut_sequences(graph_module, batches, seqlen)
    if all(c.algorithm == "autoround" for c in configs):
        # exact for AutoRound only (see _trim_padding): GPTQ's and AWQ's statistics include every position
        batches, share = _trim_padding(graph_module, batches)
        plan_.state["autoround_positions_kept"] = share
        if share < 1.0:
            log.info("autoround: trailing padding cut from the calibration batches: %.1f%% of positions kept",
                     100 * share)
        elif not _sequence_is_dynamic(graph_module, "attention_mask"):
            from .capture import normalize_inputs

            masks = [m for m in (normalize_inputs(b)[1].get("attention_mask") for b in batches)
                     if isinstance(m, torch.Tensor) and m.dim() == 2]
            padding = sum(int((m == 0).sum()) for m in masks) / max(sum(m.numel() for m in masks), 1)
            if padding > 0.1:
                log.info("autoround: %.0f%% of the calibration positions are padding; capture with "
                         "dynamic_shapes='batch_seq' to skip their compute", 100 * padding)
    blocks_per_unit = max(getattr(c, "n_blocks", 1) for c in configs)
    runner = SequentialRunner(graph_module, batches, progress=progress, desc=f"pt2q {config.algorithm}",
                              blocks_per_unit=blocks_per_unit)

    def on_block(block) -> None:
        members = {linear.name for linear in block.linears}
        by_algorithm: dict[str, dict[str, Layer]] = {}
        for name in members & set(plan_.layers):
            by_algorithm.setdefault(plan_.layers[name].config.algorithm, {})[name] = plan_.layers[name]
        for algorithm, layers in by_algorithm.items():
            _block_algorithm(algorithm)(graph_module, block, layers, plan_)
        log.info("%s: block %s: %d layers quantized", config.algorithm, block.name,
                 sum(len(layers) for layers in by_algorithm.values()))

    def after_block(block) -> None:
        finish = plan_.state.pop("autoround_after_block", None)
        if finish is not None:
            finish(block)
        # The block never runs again: its layers take their packed form now, so their float weights go
        # and the memory a model needs while it is quantized does not grow with its depth.
        _pack(graph_module, plan_, [linear.name for linear in block.linears if linear.name in plan_.quantized])

    if any(c.algorithm == "autoround" for c in configs):
        # AutoRound leaves padded positions out of its loss: each batch's attention_mask, read here
        # because the runner frees inputs once nothing reads them.
        mask = next((n for n in runner.env if n.op == "placeholder" and n.name == "attention_mask"), None)
        if mask is not None and all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in runner.env[mask]):
            plan_.state["autoround_token_mask"] = list(runner.env[mask])
    try:
        runner.run(on_block, after_block)
    finally:
        plan_.state.pop("autoround_token_mask", None)
        _, float_stream = plan_.state.pop("autoround_float", (None, None))
        if float_stream is not None:
            float_stream.close()
    graph_module.graph.lint()
    graph_module.recompile()  # the blocks packed so far: the prepared model stays callable
    plan_.calibrated = True
    plan_.calibration_seconds = time.perf_counter() - start
    return len(batches)


def apply(graph_module: GraphModule, plan_: WeightOnlyPlan) -> WeightOnlyReport:
    """Quantize the layers not quantized yet (round to nearest) and write all of them in packed form."""
    from .passes.manager import PassManager
    from .passes.pack_weights import PackWeights

    if (plan_.config.sequential or _sequential_layers(plan_)) and not plan_.calibrated:
        name = type(plan_.config if plan_.config.sequential else _sequential_layers(plan_)[0].config).__name__
        raise CalibrationError(f"{name} needs calibration data: run pt2q.calibrate(prepared, "
                               "calib_data) before convert(), or pass calib_data to pt2q.quantize()")
    by_name = {node.name: node for node in graph_module.graph.nodes}
    for name, layer in plan_.layers.items():
        if name not in plan_.quantized and name not in plan_.packed:
            plan_.quantized[name] = _quantize_layer(layer, get_constant(graph_module, by_name[name].args[1]))
    # The layers left (RTN, or outside every block) are packed here, through the pass manager, so the dump
    # tool sees this step; the blocks packed during calibration are in the graph already.
    pack = PackWeights({name: plan_.quantized.pop(name) for name in list(plan_.quantized)})
    passes = [pack]
    if plan_.state.get("awq_input_scales"):
        from .passes.scale_linear_inputs import ScaleLinearInputs

        passes.append(ScaleLinearInputs(plan_.state["awq_input_scales"]))
    PassManager(passes)(graph_module)
    plan_.packed.update(pack.report.layers)
    layers = {name: {**info, "module": plan_.layers[name].module, "algorithm": plan_.layers[name].config.algorithm}
              for name, info in plan_.packed.items()}
    findings = {key: plan_.state[key] for key in REPORTED_FINDINGS if key in plan_.state}
    return WeightOnlyReport(layers, dict(plan_.kept_float), sum(i["float_bytes"] for i in layers.values()),
                            sum(i["packed_bytes"] for i in layers.values()), plan_.calibration_seconds, findings)


# plan.state entries that go into the report (the others hold graph objects for the algorithms' own use).
REPORTED_FINDINGS = ("autoround", "autoround_positions_kept", "awq_scales", "teq")


def _pack(graph_module: GraphModule, plan_: WeightOnlyPlan, names: list[str]) -> None:
    """Write the quantized weights of `names` into the graph (passes/pack_weights.py); the plan keeps only
    their report entries. The caller recompiles the graph once everything is packed."""
    from .passes.pack_weights import PackWeights

    if not names:
        return
    pack = PackWeights({name: plan_.quantized.pop(name) for name in names})
    pack.call(graph_module)
    plan_.packed.update(pack.report.layers)

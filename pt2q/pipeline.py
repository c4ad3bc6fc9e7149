"""The quantization pipeline, declared once: the algorithms a config runs and the stages they make.

`build(config)` turns a config into a `Pipeline`: a list of algorithms that all follow one protocol,

    plan(graph_module) -> graph_module      insert what the algorithm records (observers, channel
                                            recorders) or choose the layers it takes; nothing quantized yet
    calibrate(graph_module, batches)        sequential algorithms only (GPTQ, AWQ: block by block); the
                                            others record during the one shared pass over the data
    apply(graph_module) -> graph_module     compute and write the result; `report` says what it did

which become three kinds of stage, in order:

    prepare:    <algorithm>.plan, for each algorithm
    calibrate:  one stage: the shared pass over the data (when an algorithm records in it), then each
                sequential algorithm's own block-by-block run
    convert:    <algorithm>.apply, for each algorithm

    config                                   algorithms
    StaticQuantConfig / DynamicQuantConfig   [SmoothQuant when config.smooth_quant], Int8Observers
    RTNConfig / GPTQConfig / AWQConfig       WeightOnly
    SmoothQuantConfig (pt2q.smooth_quant())  SmoothQuant
    FP8Config                                FP8Observers (from_measurement: the file, not data, sets them)

Every stage is a pass run by the one `PassManager` (passes/manager.py); a stage runs the graph passes
of its algorithm through a nested manager. So `pt2q.quantize` / `prepare` / `calibrate` / `convert`,
the torch.compile backend, `pt2q.smooth_quant()` and the dump tool all run this pipeline, and the dump
tool only observes it (`observe_passes`). An algorithm keeps its state in the GraphModule's meta
(pt2q.meta), so a prepared model carries what convert needs; the pipeline itself rides along under
`meta.PIPELINE` until convert.
"""
from __future__ import annotations

import collections
import itertools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from . import meta
from .calibration import check_batches_iterable, fake_quantizers, observers, run_calibration, sized
from .capture import EXAMPLE_INPUTS_KEY, capture, fresh_copy, normalize_inputs
from .config import CONFIG_KINDS, DynamicQuantConfig, SmoothQuantConfig, StaticQuantConfig
from .errors import CalibrationError, ConfigError, NotPreparedError
from .graph import own_tensors
from .passes.manager import Pass, PassManager

log = logging.getLogger(__name__)

__all__ = ["Algorithm", "FP8Observers", "Int8Observers", "Pipeline", "SmoothQuant", "WeightOnly", "build", "calibrate",
           "convert", "count_quantized_layers", "prepare", "quantize", "quantized_layer_nodes",
           "split_calibration_data"]


class Algorithm(Protocol):
    """plan -> [calibrate] -> apply; see the module docstring."""

    name: str
    sequential: bool          # calibrates with its own block-by-block run, not in the shared pass
    records_in_shared_pass: bool
    report: Any

    def plan(self, graph_module: GraphModule) -> GraphModule: ...

    # sequential algorithms only: `calibrate(graph_module, batches, progress) -> batches used`, their
    # own run over the data

    def apply(self, graph_module: GraphModule) -> GraphModule: ...


# -- the algorithms -------------------------------------------------------------------------------------
class SmoothQuant:
    """SmoothQuant scale absorption (pt2q/smooth_quant.py): channel recorders at plan, one shared
    calibration pass, scales folded at apply. `ranges_from_quantizer`: the error estimates of its
    auto-alpha search use the int8 ranges the quantizer recorded (meta.INT8_NUMERICS)."""

    name = "smooth_quant"
    sequential = False
    records_in_shared_pass = True

    def __init__(self, config: SmoothQuantConfig, ranges_from_quantizer: bool = False):
        self.config, self.ranges_from_quantizer = config, ranges_from_quantizer
        self.report = None

    def plan(self, graph_module: GraphModule) -> GraphModule:
        from .smooth_quant import insert

        graph_module.meta[meta.SMOOTH_QUANT_PLAN] = insert(graph_module, self.config)
        return graph_module

    def apply(self, graph_module: GraphModule) -> GraphModule:
        plan = graph_module.meta[meta.SMOOTH_QUANT_PLAN]
        ranges = {}
        if self.ranges_from_quantizer:
            numerics = graph_module.meta.get(meta.INT8_NUMERICS, {})
            ranges = {"activation_range": tuple(numerics.get("activation_range", (0, 255))),
                      "weight_range": tuple(numerics.get("weight_range", (-128, 127)))}
        self.report = plan.apply(graph_module, **ranges)
        # Dropped only once applied: a failed apply (e.g. NaN at a group input) can be retried.
        graph_module.meta.pop(meta.SMOOTH_QUANT_PLAN)
        graph_module.meta[meta.SMOOTH_QUANT_REPORT] = self.report
        log.info("%s", self.report.summary())
        return graph_module


class Int8Observers:
    """int8 static / dynamic quantization through torchao: our quantizer annotates and torchao inserts
    observers (plan), calibration runs them, convert_pt2e writes Q/DQ pairs (apply)."""

    name = "int8"
    sequential = False
    records_in_shared_pass = True

    def __init__(self, config, qat: bool = False):
        self.config = config
        self.qat = qat
        # QAT: calibration sets the fake quants' starting ranges in a run of its own (pt2q.qat)
        self.records_in_shared_pass = not qat
        self.calibrates_itself = qat
        self.report = None

    def calibrate(self, graph_module: GraphModule, batches, progress: bool) -> int:
        from .qat import calibrate_fake_quant_ranges
        from .quantizers.base import ACTIVATION_OBSERVERS

        observer = ACTIVATION_OBSERVERS[getattr(self.config, "activation_observer", "minmax")]
        return calibrate_fake_quant_ranges(graph_module, batches, observer, progress=progress)

    def plan(self, graph_module: GraphModule) -> GraphModule:
        from .passes.torchao_prepare import TorchaoPrepare

        quantizer = self.config.to_quantizer(qat=self.qat)
        prepared, _ = PassManager([TorchaoPrepare(quantizer, qat=self.qat)])(graph_module)
        prepared.meta[meta.INT8_NUMERICS] = int8_numerics(self.config, quantizer)
        return prepared

    def apply(self, graph_module: GraphModule) -> GraphModule:
        from .passes.torchao_convert import TorchaoConvert

        if not observers(graph_module):  # prepared by pt2q, but the config keeps every layer in fp32
            log.warning("convert(): the config quantizes no layer of this model; it stays in fp32")
        check_observers(graph_module)
        if is_training_graph(graph_module):
            from torchao.quantization.pt2e import move_exported_model_to_eval

            move_exported_model_to_eval(graph_module)  # dropout off, batch norm on running statistics
        quantized, _ = PassManager([TorchaoConvert()])(graph_module)
        return quantized


class FP8Observers:
    """FP8 through torchao: the FP8 quantizer annotates, torchao inserts FP8Observers (plan), calibration
    runs them — or, with `from_measurement`, the measurement file sets them and no data runs — and
    convert_pt2e lets each observer write its FP8 Q/DQ ops (apply)."""

    name = "fp8"
    sequential = False

    def __init__(self, config):
        self.config = config
        # From a measurement file, nothing is calibrated: running data would move the file's ranges.
        self.records_in_shared_pass = config.from_measurement is None
        self.report = None

    def plan(self, graph_module: GraphModule) -> GraphModule:
        from .passes.torchao_prepare import TorchaoPrepare

        prepared, _ = PassManager([TorchaoPrepare(self.config.to_quantizer())])(graph_module)
        prepared.meta[meta.FP8] = fp8_record(self.config)
        if self.config.from_measurement is not None:
            from .measurement import load_into

            load_into(prepared, self.config.from_measurement)
            prepared.meta[meta.FP8_MEASUREMENT] = str(self.config.from_measurement)
        return prepared

    def apply(self, graph_module: GraphModule) -> GraphModule:
        from .passes.torchao_convert import TorchaoConvert
        from .quantizers.fp8 import fp8_observers

        if not fp8_observers(graph_module):
            log.warning("convert(): the FP8 config quantizes no layer of this model; it stays in float")
        quantized, _ = PassManager([TorchaoConvert()])(graph_module)
        return quantized


def fp8_record(config) -> dict:
    """What an FP8 model was quantized for (meta.FP8): the Habana lowering checks its device against it."""
    from .fp8 import format_name, full_scale

    return {"dtype": format_name(config.torch_dtype), "device": config.device, "scale_method": config.scale_method,
            "activation": config.activation, "weight_granularity": config.weight_granularity,
            "full_scale": full_scale(config.torch_dtype, config.device)}


class WeightOnly:
    """Weight-only RTN / GPTQ / AWQ (pt2q/weight_only.py): the plan picks the layers, GPTQ and AWQ
    calibrate block by block, apply packs every weight."""

    name = "weight_only"
    records_in_shared_pass = False

    def __init__(self, config):
        from .weight_only import sequential_configs

        self.config = config
        self.sequential = bool(sequential_configs(config))
        self.report = None

    def plan(self, graph_module: GraphModule) -> GraphModule:
        from . import weight_only

        graph_module.meta[meta.WEIGHT_ONLY_PLAN] = weight_only.plan(graph_module, self.config)
        return graph_module

    def calibrate(self, graph_module: GraphModule, batches: list, progress: bool) -> int:
        from . import weight_only

        return weight_only.calibrate(graph_module, graph_module.meta[meta.WEIGHT_ONLY_PLAN], batches, progress=progress)

    def apply(self, graph_module: GraphModule) -> GraphModule:
        from . import weight_only

        self.report = weight_only.apply(graph_module, graph_module.meta[meta.WEIGHT_ONLY_PLAN])
        log.info("%s", self.report.summary())
        del graph_module.meta[meta.WEIGHT_ONLY_PLAN]
        graph_module.meta[meta.WEIGHT_ONLY_REPORT] = self.report
        return graph_module


# -- the stages: each one pass of the pipeline ----------------------------------------------------------
def _keep_meta(before: GraphModule, after: GraphModule) -> GraphModule:
    """A stage that returns a new GraphModule (torchao's prepare / convert) keeps pt2q's meta."""
    if after is not before:
        after.meta.update({key: value for key, value in before.meta.items() if key not in after.meta})
    return after


class PlanStage(Pass):
    groups_passes = True  # its algorithm's graph passes run (and are observed) inside it

    def __init__(self, algorithm: Algorithm):
        self.algorithm, self.name = algorithm, f"{algorithm.name}.plan"

    @property
    def report(self):
        return self.algorithm.report

    def call(self, graph_module: GraphModule) -> PassResult:
        return PassResult(_keep_meta(graph_module, self.algorithm.plan(graph_module)), True)


class CalibrateStage(Pass):
    """The shared pass over the data for the algorithms that record in it, then each sequential one's
    own run. `batches` is consumed once by the shared pass (a generator is fine)."""

    name = "calibrate"

    def __init__(self, algorithms: Sequence[Algorithm], batches: Iterable, progress: bool, desc: str):
        self.algorithms, self.batches, self.progress, self.desc = list(algorithms), batches, progress, desc
        self.report = None
        self.batch_count = 0

    def call(self, graph_module: GraphModule) -> PassResult:
        batches = self.batches
        sequential = [a for a in self.algorithms if a.sequential]
        own_runs = sequential + [a for a in self.algorithms if getattr(a, "calibrates_itself", False)]
        if sequential:
            batches = list(batches)  # several runs over the data: GPTQ / AWQ take it block by block
        if any(a.records_in_shared_pass for a in self.algorithms):
            self.batch_count = run_calibration(graph_module, batches, progress=self.progress, desc=self.desc)
        for algorithm in own_runs:
            self.batch_count = max(self.batch_count, algorithm.calibrate(graph_module, batches, self.progress))
        # The shared pass changes observer state, not the graph; a sequential algorithm's packing
        # rewrites the graph, and the manager then checks and recompiles it.
        return PassResult(graph_module, bool(sequential))


class ApplyStage(Pass):
    groups_passes = True

    def __init__(self, algorithm: Algorithm):
        self.algorithm, self.name = algorithm, f"{algorithm.name}.apply"

    @property
    def report(self):
        return self.algorithm.report

    def call(self, graph_module: GraphModule) -> PassResult:
        return PassResult(_keep_meta(graph_module, self.algorithm.apply(graph_module)), True)


@dataclass
class Pipeline:
    """The algorithms of one config, and the stages they run as (see the module docstring)."""

    config: Any
    algorithms: list = field(default_factory=list)

    def prepare_stages(self) -> list:
        return [PlanStage(algorithm) for algorithm in self.algorithms]

    def calibrate_stage(self, batches: Iterable, progress: bool = True, desc: str = "pt2q calibrate") -> CalibrateStage:
        return CalibrateStage(self.algorithms, batches, progress, desc)

    def convert_stages(self) -> list:
        return [ApplyStage(algorithm) for algorithm in self.algorithms]

    def stage_names(self) -> list[str]:
        return [s.name for s in (*self.prepare_stages(), self.calibrate_stage(()), *self.convert_stages())]

    @property
    def sequential(self) -> list:
        return [a for a in self.algorithms if a.sequential]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.sequential) or bool(getattr(self.config, "needs_calibration", True))


def build(config) -> Pipeline:
    """The pipeline `config` runs (the table in the module docstring)."""
    if isinstance(config, SmoothQuantConfig):
        return Pipeline(config, [SmoothQuant(config)])
    if not isinstance(config, tuple(CONFIG_KINDS.values())):
        names = [cls.__name__ for cls in CONFIG_KINDS.values()]
        raise ConfigError(f"config must be a {', '.join(names[:-1])} or {names[-1]}, got {type(config).__name__}")
    if getattr(config, "family", None) == "weight_only":
        return Pipeline(config, [WeightOnly(config)])
    if getattr(config, "family", None) == "fp8":
        return Pipeline(config, [FP8Observers(config)])
    algorithms = []
    if getattr(config, "smooth_quant", None) is not None:
        algorithms.append(SmoothQuant(config.smooth_quant, ranges_from_quantizer=True))
    algorithms.append(Int8Observers(config))
    return Pipeline(config, algorithms)


# -- running it ---------------------------------------------------------------------------------------------
def capture_for(model: torch.nn.Module, example_inputs: Any = None, dynamic_shapes: Any = None,
                caller: str = "prepare()", training: bool = False) -> GraphModule:
    """A capture of `model` that owns its tensors (a pt2q capture is copied, not captured again;
    `training`: the training graph, for QAT)."""
    if isinstance(model, GraphModule) and EXAMPLE_INPUTS_KEY in model.meta and not training:
        graph_module = fresh_copy(model)
    else:
        if example_inputs is None:
            raise ConfigError(f"{caller} needs example_inputs (a tuple of positional inputs or a dict of "
                              "keyword inputs) to capture the model")
        args, kwargs = normalize_inputs(example_inputs)
        graph_module = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes, training=training)
    # The capture shares the user's tensors; the quantized model must not (editing either would move
    # the other, and a buffer the model updates in forward would be advanced by both).
    own_tensors(graph_module)
    return graph_module


def prepare(model: torch.nn.Module, config, example_inputs: Any = None, *, dynamic_shapes: Any = None,
            caller: str = "prepare()") -> GraphModule:
    """Capture `model` and run the pipeline's prepare stages."""
    pipeline = build(config)
    graph_module = capture_for(model, example_inputs, dynamic_shapes, caller)
    if not isinstance(config, SmoothQuantConfig):
        warn_unmatched_name_rules(config, graph_module)
    prepared, _ = PassManager(pipeline.prepare_stages())(graph_module)
    prepared.meta[meta.PIPELINE] = pipeline
    prepared.meta[meta.CONFIG] = config
    prepared.meta[meta.PREPARED] = True
    return prepared


QAT_CONFIGS = (StaticQuantConfig, DynamicQuantConfig)


def prepare_qat(model: torch.nn.Module, config, example_inputs: Any = None, *, dynamic_shapes: Any = None,
                caller: str = "prepare_qat()") -> GraphModule:
    """Capture the training graph of `model` and insert fake quantization (torchao's prepare_qat_pt2e with
    our quantizer's QAT schemes; conv-bn pairs are simulated as folded and folded at convert)."""
    if type(config) not in QAT_CONFIGS:
        raise ConfigError(f"{caller} takes a StaticQuantConfig or DynamicQuantConfig, got "
                          f"{type(config).__name__}; weight-only and FP8 configs are post-training only")
    if getattr(config, "smooth_quant", None) is not None:
        raise ConfigError(f"{caller}: {type(config).__name__}.smooth_quant is not supported with QAT (training "
                          "adapts the weights to the activation ranges itself); set smooth_quant=None")
    if isinstance(model, GraphModule) and EXAMPLE_INPUTS_KEY in model.meta:
        raise ConfigError(f"{caller} takes the nn.Module itself: a pt2q capture is an inference graph, and "
                          "QAT needs the training graph (batch norm on batch statistics, dropout)")
    if isinstance(model, torch.nn.Module) and not model.training:
        warnings.warn(f"{caller}: the model is in eval mode; its copy is captured in train mode for QAT "
                      "(batch norm on batch statistics, dropout on). Your model itself is unchanged.",
                      UserWarning, stacklevel=3)
    algorithm = Int8Observers(config, qat=True)
    pipeline = Pipeline(config, [algorithm])
    graph_module = capture_for(model, example_inputs, dynamic_shapes, caller, training=True)
    warn_unmatched_name_rules(config, graph_module)
    prepared, _ = PassManager(pipeline.prepare_stages())(graph_module)
    if config.is_static and getattr(config, "qat_ranges", "ema") == "learnable":
        _initialise_learnable_ranges(prepared, graph_module.meta[EXAMPLE_INPUTS_KEY])
    prepared.meta[meta.PIPELINE] = pipeline
    prepared.meta[meta.CONFIG] = config
    prepared.meta[meta.PREPARED] = True
    prepared.meta[meta.QAT] = True
    return prepared


def _initialise_learnable_ranges(prepared: GraphModule, example_inputs) -> None:
    """LearnableFakeQuantize creates its scale and zero point on its first forward: run the example
    inputs once (in eval mode, so batch norm statistics do not move) so that they exist as parameters
    when the user builds the optimizer, then turn range learning on."""
    from torchao.quantization.pt2e import (
        enable_range_learning, move_exported_model_to_eval, move_exported_model_to_train,
    )

    args, kwargs = example_inputs
    move_exported_model_to_eval(prepared)
    try:
        with torch.no_grad():
            prepared(*args, **kwargs)
    finally:
        move_exported_model_to_train(prepared)
    prepared.apply(enable_range_learning)


def check_not_converted(model, caller: str) -> None:
    if isinstance(model, GraphModule) and model.meta.get(meta.CONVERTED):
        raise NotPreparedError(f"{caller}: this prepared model was already converted by pt2q.convert(), which "
                               "consumes it (torchao converts in place); use the model convert() returned, "
                               "or call pt2q.prepare() again")


def _pipeline_of(prepared, caller: str) -> Pipeline:
    check_not_converted(prepared, caller)
    pipeline = prepared.meta.get(meta.PIPELINE) if isinstance(prepared, GraphModule) else None
    if pipeline is None or not prepared.meta.get(meta.PREPARED):
        raise NotPreparedError(f"{caller} takes the model returned by pt2q.prepare()")
    return pipeline


def calibrate(prepared: GraphModule, calib_data: Iterable, *, progress: bool = True,
              desc: str = "pt2q calibrate") -> int:
    """Run the pipeline's calibration stage; returns the number of batches used."""
    pipeline = _pipeline_of(prepared, "calibrate()")
    stage = pipeline.calibrate_stage(calib_data, progress, desc)
    PassManager([stage])(prepared)
    return stage.batch_count


def convert(prepared: GraphModule, *, require_full_coverage: bool = False) -> GraphModule:
    """Run the pipeline's convert stages. The prepared model is consumed (torchao converts in place).
    The converted model's `meta["pt2q_report"]` lists the weighted ops left float and why (pt2q.coverage);
    `require_full_coverage` raises CoverageError for one the config did not ask to keep float."""
    check_not_converted(prepared, "convert()")
    if isinstance(prepared, GraphModule) and meta.PIPELINE not in prepared.meta and observers(prepared):
        # prepared by torchao's prepare_pt2e with our quantizer (or any): convert as torchao does
        pipeline = Pipeline(None, [Int8Observers(None)])
    else:
        pipeline = _pipeline_of(prepared, "convert()")
    converted, _ = PassManager(pipeline.convert_stages())(prepared)  # ApplyStage carries pt2q's meta over
    prepared.meta.pop(meta.PIPELINE, None)
    prepared.meta.pop(meta.PREPARED, None)
    if converted is not prepared:
        prepared.meta[meta.CONVERTED] = True
    for key in (meta.PIPELINE, meta.PREPARED, meta.CONVERTED):
        converted.meta.pop(key, None)
    if not isinstance(pipeline.config, SmoothQuantConfig):
        converted.meta[meta.QUANTIZED] = True
        from .coverage import check_coverage, coverage_report

        report = converted.meta[meta.COVERAGE] = coverage_report(converted, pipeline.config)
        check_coverage(report, require_full=require_full_coverage)
    return converted


def quantize(model: torch.nn.Module, config, calib_data: Iterable | None = None, *, example_inputs: Any = None,
             dynamic_shapes: Any = None, progress: bool = True, caller: str = "quantize()",
             desc: str = "pt2q calibrate", require_full_coverage: bool = False) -> GraphModule:
    """prepare, calibrate and convert: the whole pipeline."""
    calib_data, example_inputs = split_calibration_data(config, calib_data, example_inputs, caller)
    prepared = prepare(model, config, example_inputs, dynamic_shapes=dynamic_shapes, caller=caller)
    calibrate(prepared, calib_data, progress=progress, desc=desc)
    return convert(prepared, require_full_coverage=require_full_coverage)


def split_calibration_data(config, calib_data: Iterable | None, example_inputs: Any,
                           caller: str = "quantize()") -> tuple[Iterable, Any]:
    """(batches to calibrate with, example inputs): the first batch is peeked (it is the default
    example) and the rest stays lazy. Configs that need no calibration still run the example once, so
    weight observers record the weights' ranges."""
    pipeline = build(config)
    if calib_data is not None and getattr(config, "from_measurement", None) is not None:
        raise ConfigError(f"{caller}: {type(config).__name__}(from_measurement=...) quantizes from the measurement "
                          "file alone; do not pass calib_data (give example_inputs to capture the model)")
    if calib_data is not None:
        check_batches_iterable(calib_data)
        iterator = iter(calib_data)
        first = next(iterator, None)
        if first is None:
            raise CalibrationError("calib_data is empty: give at least one batch")
        total = sized(calib_data)
        calib_data = itertools.chain([first], iterator)
        if total is not None:
            calib_data = _WithLength(calib_data, total)
        example_inputs = first if example_inputs is None else example_inputs
    elif pipeline.needs_calibration:
        if pipeline.sequential:
            from .weight_only import sequential_configs

            names = " and ".join(sorted({type(c).__name__ for c in sequential_configs(config)}))
            raise CalibrationError(f"{names} needs calib_data (an iterable of input batches): it "
                                   "calibrates block by block; RTNConfig quantizes without calibration")
        if isinstance(config, SmoothQuantConfig):
            raise CalibrationError("calib_data is empty: SmoothQuant needs at least one batch")
        raise CalibrationError("static quantization needs calib_data (an iterable of input batches); "
                               "use DynamicQuantConfig to quantize without calibration")
    if example_inputs is None:
        raise ConfigError(f"{caller} needs example_inputs when calib_data is not given")
    return (calib_data if calib_data is not None else [example_inputs]), example_inputs


class _WithLength:
    """An iterable with a known length (so the progress bar shows a total)."""

    def __init__(self, iterable, length):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        return self.length


# -- checks and records shared by the stages --------------------------------------------------------------
def warn_unmatched_name_rules(config, graph_module: GraphModule) -> None:
    """A set_local regex that matches no module is almost always a typo: say so, with close names."""
    import difflib
    import re
    import warnings

    from .graph import module_stack

    names = sorted({fqn for node in graph_module.graph.nodes for fqn, _ in module_stack(node) if fqn})
    for target, _ in config.local_rules:
        if isinstance(target, str) and not any(re.fullmatch(target, name) for name in names):
            close = difflib.get_close_matches(target, names, n=3, cutoff=0.5)
            hint = f"; close module names: {', '.join(close)}" if close else \
                f"; module names look like: {', '.join(names[:5])}"
            warnings.warn(f"set_local({target!r}) matches no module of this model (the regex must match a whole "
                          f"name, as in named_modules()){hint}", UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The warnings.warn stacklevel of the first frame outside pt2q: the user's call, however deep in
    the pipeline the warning is raised."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def int8_numerics(config, quantizer) -> dict:
    """What the saturation guard resolved to on which ISA, the guard each quantized op got (counted),
    and the integer ranges of the global scheme (SmoothQuant's error estimates use them)."""
    from .isa import detect as detect_isa

    schemes = [quantizer.global_scheme, *(s for _, s in quantizer.module_name_rules),
               *(s for _, s in quantizer.op_type_rules)]
    numerics = {"saturation_guard": getattr(config, "saturation_guard", "off"),
                "resolved": sorted({s.saturation_guard for s in schemes if s is not None}),
                "applied": dict(collections.Counter(quantizer.applied_guards.values())),
                "built_on": detect_isa().describe()}
    scheme = quantizer.global_scheme
    if scheme is not None:
        if scheme.activation is not None:
            numerics["activation_range"] = [scheme.activation.quant_min, scheme.activation.quant_max]
        numerics["weight_range"] = [scheme.weight.quant_min, scheme.weight.quant_max]
    return numerics


def check_observers(prepared: GraphModule) -> None:
    """Every observer saw finite data, and every fake quantization (QAT) holds a finite scale and zero
    point; name the observed node otherwise."""
    observed_node = {n.target: n.args[0] for n in prepared.graph.nodes if n.op == "call_module"}

    def where(name: str) -> str:
        owner = name.rsplit(".activation_post_process", 1)[0]  # a fake quant's inner observer
        source = observed_node.get(owner)
        return f"{owner} (observing node {source.name!r})" if source is not None else owner

    for name, observer in observers(prepared).items():
        low, high = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
        if low is None or high is None or getattr(observer, "is_dynamic", False):
            continue
        if low.numel() and (torch.isinf(low).all() and torch.isinf(high).all()) and low.min() > 0:
            raise CalibrationError(f"observer {where(name)} was never observed: run calibration (or training) "
                                   "data through the prepared model before convert()")
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise CalibrationError(f"observer {where(name)} holds NaN/Inf ranges; check the model's numerics "
                                   "on the calibration (or training) data, or keep that layer in fp32 with "
                                   "set_local(..., None)")
    for name, fake_quant in fake_quantizers(prepared).items():
        for attribute in ("scale", "zero_point"):
            value = getattr(fake_quant, attribute, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(f"fake quantization {where(name)} has a non-finite {attribute} (training "
                                       "diverged?); train with a lower learning rate, or keep that layer in "
                                       "fp32 with set_local(..., None)")


def is_training_graph(graph_module: GraphModule) -> bool:
    """A QAT graph: captured in train mode (what torchao's move_exported_model_to_eval rewrites)."""
    return bool(graph_module.meta.get(meta.QAT)) or bool(fake_quantizers(graph_module))


def quantized_layer_nodes(qmodel: GraphModule) -> list[torch.fx.Node]:
    """The weighted layers (linear/conv nodes) whose weight is dequantized in the graph (int8 Q/DQ, FP8,
    or pt2q's packed weight-only form), in graph order."""
    from .ops import DEQUANTIZE_FP8, DEQUANTIZE_WEIGHT
    from .quantizers import weighted_ops

    dequant_ops = {torch.ops.quantized_decomposed.dequantize_per_channel.default,
                   torch.ops.quantized_decomposed.dequantize_per_tensor.default, DEQUANTIZE_WEIGHT, DEQUANTIZE_FP8}
    return [node for node in qmodel.graph.nodes
            if node.target in weighted_ops() and len(node.args) > 1
            and getattr(node.args[1], "target", None) in dequant_ops]


def count_quantized_layers(qmodel: GraphModule) -> int:
    """Number of weighted layers (linear/conv) whose weight is dequantized in the graph (int8 Q/DQ, FP8,
    or pt2q's packed weight-only form)."""
    return len(quantized_layer_nodes(qmodel))

"""prepare / calibrate / convert / quantize / save / load.

    prepared = pt2q.prepare(model, pt2q.StaticQuantConfig(), example_inputs)   # observed GraphModule
    pt2q.calibrate(prepared, calib_data)                                       # or call it yourself
    qmodel = pt2q.convert(prepared)                                            # Q/DQ GraphModule

or all at once: `pt2q.quantize(model, config, calib_data, example_inputs=...)`. The user's model is
never modified; `prepare` works on a capture of it.
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from . import meta
from .calibration import check_batches_iterable, observers, run_calibration, sized
from .capture import EXAMPLE_INPUTS_KEY, capture, fresh_copy, normalize_inputs
from .config import CONFIG_KINDS, AWQConfig, DynamicQuantConfig, GPTQConfig, RTNConfig, StaticQuantConfig, config_class
from .errors import CalibrationError, ConfigError, NotPreparedError, Pt2qError
from .graph import own_tensors
from .isa import detect as detect_isa
from .passes.manager import PassManager
from .passes.torchao_convert import TorchaoConvert
from .passes.torchao_prepare import TorchaoPrepare
from .quantizers import QUANTIZERS

log = logging.getLogger(__name__)

# The meta keys under their historical names here (pt2q.meta is their one home).
CONFIG_KEY = meta.CONFIG
PREPARED_KEY = meta.PREPARED
QUANTIZED_KEY = meta.QUANTIZED
CONVERTED_KEY = meta.CONVERTED
SMOOTH_QUANT_PLAN_KEY = meta.SMOOTH_QUANT_PLAN
SMOOTH_QUANT_REPORT_KEY = meta.SMOOTH_QUANT_REPORT
INT8_NUMERICS_KEY = meta.INT8_NUMERICS
_SAVE_FORMAT = 1

Config = StaticQuantConfig | DynamicQuantConfig | RTNConfig | GPTQConfig | AWQConfig
WEIGHT_ONLY_PLAN_KEY = meta.WEIGHT_ONLY_PLAN
WEIGHT_ONLY_REPORT_KEY = meta.WEIGHT_ONLY_REPORT


def _is_weight_only(config) -> bool:
    return getattr(config, "family", None) == "weight_only"


def _weight_only_sequential(config) -> list:
    """The GPTQ / AWQ configs of a weight-only config, its set_local rules included ([] otherwise)."""
    if not _is_weight_only(config):
        return []
    from .weight_only import sequential_configs

    return sequential_configs(config)


def prepare(model: torch.nn.Module, config: Config, example_inputs: Any = None, *,
            dynamic_shapes: Any = None) -> GraphModule:
    """Capture `model` (unless it is already a pt2q capture) and insert observers per `config`."""
    if not isinstance(config, tuple(CONFIG_KINDS.values())):
        names = [cls.__name__ for cls in CONFIG_KINDS.values()]
        raise ConfigError(f"config must be a {', '.join(names[:-1])} or {names[-1]}, got {type(config).__name__}")
    if isinstance(model, GraphModule) and EXAMPLE_INPUTS_KEY in model.meta:
        graph_module = fresh_copy(model)
    else:
        if example_inputs is None:
            raise ConfigError("prepare() needs example_inputs (a tuple of positional inputs or a dict of "
                              "keyword inputs) to capture the model")
        args, kwargs = normalize_inputs(example_inputs)
        graph_module = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    # The capture shares the user's tensors; the quantized model must not (editing either would move
    # the other, and a buffer the model updates in forward would be advanced by both).
    own_tensors(graph_module)
    _warn_unmatched_name_rules(config, graph_module)
    if _is_weight_only(config):
        from . import weight_only

        graph_module.meta[WEIGHT_ONLY_PLAN_KEY] = weight_only.plan(graph_module, config)
        graph_module.meta[CONFIG_KEY] = config
        graph_module.meta[PREPARED_KEY] = True
        return graph_module
    smooth_quant_plan = None
    if getattr(config, "smooth_quant", None) is not None:
        from .smooth_quant import insert as insert_smooth_quant

        smooth_quant_plan = insert_smooth_quant(graph_module, config.smooth_quant)
    quantizer = config.to_quantizer()
    prepared, _ = PassManager([TorchaoPrepare(quantizer)])(graph_module)
    prepared.meta[INT8_NUMERICS_KEY] = _int8_numerics(config, quantizer)
    prepared.meta[SMOOTH_QUANT_PLAN_KEY] = smooth_quant_plan
    prepared.meta[CONFIG_KEY] = config
    prepared.meta[PREPARED_KEY] = True
    return prepared


def _warn_unmatched_name_rules(config: Config, graph_module: GraphModule) -> None:
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
                          f"name, as in named_modules()){hint}", UserWarning, stacklevel=3)


def _int8_numerics(config: Config, quantizer) -> dict:
    """What the saturation guard resolved to on which ISA, the guard each quantized op got (counted),
    and the integer ranges of the global scheme (SmoothQuant's error estimates use them)."""
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


def calibrate(prepared: GraphModule, calib_data: Iterable, *, progress: bool = True) -> int:
    """Run every batch of `calib_data` (tuples of positional inputs or dicts of keyword inputs) through
    the observed model. Returns the number of batches. Raises CalibrationError on bad data."""
    _check_not_converted(prepared, "calibrate()")
    if not prepared.meta.get(PREPARED_KEY):
        raise NotPreparedError("calibrate() takes the model returned by pt2q.prepare()")
    plan = prepared.meta.get(WEIGHT_ONLY_PLAN_KEY)
    if plan is not None:
        from . import weight_only

        batches = list(calib_data)
        weight_only.calibrate(prepared, plan, batches, progress=progress)
        return min(len(batches), getattr(plan.config, "n_samples", len(batches)))
    return run_calibration(prepared, calib_data, progress=progress)


def _check_observers(prepared: GraphModule) -> None:
    """Every observer saw finite data; name the observed node otherwise."""
    observed_node = {n.target: n.args[0] for n in prepared.graph.nodes if n.op == "call_module"}
    for name, observer in observers(prepared).items():
        low, high = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
        if low is None or high is None or getattr(observer, "is_dynamic", False):
            continue
        source = observed_node.get(name)
        where = f"the output of node {source.name!r}" if source is not None else f"observer {name}"
        if low.numel() and (torch.isinf(low).all() and torch.isinf(high).all()) and low.min() > 0:
            raise CalibrationError(f"{where} was never observed: run calibration data through the prepared "
                                   "model before convert()")
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise CalibrationError(f"{where} produced NaN/Inf during calibration; check the model's numerics "
                                   "on the calibration data, or keep that layer in fp32 with set_local(..., None)")


def _check_not_converted(model, caller: str) -> None:
    if isinstance(model, GraphModule) and model.meta.get(CONVERTED_KEY):
        raise NotPreparedError(f"{caller}: this prepared model was already converted by pt2q.convert(), which "
                               "consumes it (torchao converts in place); use the model convert() returned, "
                               "or call pt2q.prepare() again")


def convert(prepared: GraphModule) -> GraphModule:
    """Turn a calibrated observed model into a Q/DQ GraphModule (torchao's `convert_pt2e`). This consumes
    `prepared`: calibrating or converting it again raises NotPreparedError."""
    _check_not_converted(prepared, "convert()")
    if isinstance(prepared, GraphModule) and prepared.meta.get(WEIGHT_ONLY_PLAN_KEY) is not None:
        return _convert_weight_only(prepared)
    if not isinstance(prepared, GraphModule) or not (observers(prepared) or prepared.meta.get(PREPARED_KEY)):
        raise NotPreparedError(
            f"convert() takes a model returned by pt2q.prepare() (or torchao prepare_pt2e) and calibrated; "
            f"got a {type(prepared).__name__} with no observers")
    if not observers(prepared):  # prepared by pt2q, but the config keeps every layer in fp32
        log.warning("convert(): the config quantizes no layer of this model; it stays in fp32")
    plan = prepared.meta.get(SMOOTH_QUANT_PLAN_KEY)
    if plan is not None:
        info = torch.iinfo(QUANTIZERS[prepared.meta[CONFIG_KEY].backend].activation_dtype)
        numerics = prepared.meta.get(INT8_NUMERICS_KEY, {})
        report = plan.apply(prepared, activation_range=tuple(numerics.get("activation_range", (info.min, info.max))),
                            weight_range=tuple(numerics.get("weight_range", (-128, 127))))
        # Dropped only once applied: a failed apply (e.g. NaN at a group input) can be retried.
        prepared.meta.pop(SMOOTH_QUANT_PLAN_KEY)
        prepared.meta[SMOOTH_QUANT_REPORT_KEY] = report
        log.info("%s", report.summary())
    _check_observers(prepared)
    kept = dict(prepared.meta)
    quantized, _ = PassManager([TorchaoConvert()])(prepared)
    prepared.meta.pop(PREPARED_KEY, None)
    prepared.meta[CONVERTED_KEY] = True
    quantized.meta.update(kept)
    quantized.meta.pop(PREPARED_KEY, None)
    quantized.meta.pop(CONVERTED_KEY, None)
    quantized.meta[QUANTIZED_KEY] = True
    return quantized


def _convert_weight_only(prepared: GraphModule) -> GraphModule:
    """Weight-only convert: pack every planned layer in place (the prepared graph becomes the quantized one)."""
    from . import weight_only

    plan = prepared.meta[WEIGHT_ONLY_PLAN_KEY]
    report = weight_only.apply(prepared, plan)
    log.info("%s", report.summary())
    del prepared.meta[WEIGHT_ONLY_PLAN_KEY]
    prepared.meta.pop(PREPARED_KEY, None)
    prepared.meta[WEIGHT_ONLY_REPORT_KEY] = report
    prepared.meta[QUANTIZED_KEY] = True
    return prepared


def quantize(model: torch.nn.Module, config: Config, calib_data: Iterable | None = None, *,
             example_inputs: Any = None, dynamic_shapes: Any = None, progress: bool = True) -> GraphModule:
    """prepare + calibrate + convert in one call.

    `calib_data`: an iterable of batches, each a tuple of positional inputs or a dict of keyword inputs.
    Required for static quantization; optional for dynamic. `example_inputs` defaults to the first batch.
    With `PT2Q_DUMP_DIR` set, every pass is also dumped (text, diffs, numeric report, HTML): pt2q.debug.
    """
    if os.environ.get("PT2Q_DUMP_DIR"):
        from .debug.pipeline import dump_quantize
        return dump_quantize(model, config, calib_data, example_inputs=example_inputs,
                             dynamic_shapes=dynamic_shapes, progress=progress)
    calib_data, example_inputs = split_calibration_data(config, calib_data, example_inputs)
    prepared = prepare(model, config, example_inputs, dynamic_shapes=dynamic_shapes)
    calibrate(prepared, calib_data, progress=progress)
    return convert(prepared)


def split_calibration_data(config: Config, calib_data: Iterable | None, example_inputs: Any,
                           caller: str = "quantize()") -> tuple[Iterable, Any]:
    """(batches to calibrate with, example inputs): the first batch is peeked (it is the default
    example) and the rest stays lazy. Configs that need no calibration still run the example once, so
    weight observers record the weights' ranges."""
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
    elif getattr(config, "needs_calibration", True) or _weight_only_sequential(config):
        if _is_weight_only(config):
            names = " and ".join(sorted({type(c).__name__ for c in _weight_only_sequential(config)}))
            raise CalibrationError(f"{names} needs calib_data (an iterable of input batches): it "
                                   "calibrates block by block; RTNConfig quantizes without calibration")
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


def _saved_metadata(qmodel: GraphModule) -> dict:
    config = qmodel.meta.get(CONFIG_KEY)
    return {"format": _SAVE_FORMAT, "backend": getattr(config, "backend", None),
            "mixed_bf16": bool(getattr(config, "mixed_bf16", False)),
            "dynamic": bool(getattr(config, "is_dynamic", False)),
            "config": type(config).__name__ if config is not None else None,
            "int8_numerics": qmodel.meta.get(INT8_NUMERICS_KEY)}


def _output_type_names(exported: torch.export.ExportedProgram) -> list[str]:
    """Tree-spec type names of the model's input and output containers that come from Hugging Face
    (`transformers.modeling_outputs.*`): a fresh process must register them before it can load."""
    from torch.utils._pytree import SUPPORTED_SERIALIZED_TYPES

    names = set()
    for entry in exported.module_call_graph[:1]:
        for spec in (entry.signature.in_spec, entry.signature.out_spec) if entry.signature else ():
            stack = [spec]
            while stack:
                node = stack.pop()
                registered = SUPPORTED_SERIALIZED_TYPES.get(node.type)
                name = getattr(registered, "serialized_type_name", None)
                if name and name.startswith("transformers."):
                    names.add(name)
                stack.extend(node.children())
    return sorted(names)


def save(qmodel: GraphModule, path: str | os.PathLike) -> None:
    """Save a quantized (or any pt2q-captured) model as a torch.export archive (`.pt2`)."""
    if EXAMPLE_INPUTS_KEY not in getattr(qmodel, "meta", {}):
        raise ConfigError("save() takes a model produced by pt2q (quantize/convert/capture)")
    _check_not_converted(qmodel, "save()")
    if qmodel.meta.get(PREPARED_KEY) or observers(qmodel):
        raise NotPreparedError("save() takes a converted model; this one still has observers: calibrate it and "
                               "call pt2q.convert() first (an observed model cannot be exported)")
    args, kwargs = qmodel.meta[EXAMPLE_INPUTS_KEY]
    exported = torch.export.export(qmodel, args, kwargs, dynamic_shapes=qmodel.meta.get(meta.DYNAMIC_SHAPES))
    metadata = {**_saved_metadata(qmodel), "output_types": _output_type_names(exported)}
    torch.export.save(exported, path, extra_files={"pt2q.json": json.dumps(metadata)})


def _where(path) -> str:
    return f"pt2q.load({os.fspath(path) if isinstance(path, (str, os.PathLike)) else 'file'!r})"


def _read_metadata(data: bytes, where: str) -> dict:
    """pt2q's own metadata (extra/pt2q.json), read with zipfile and json only, before torch sees the file."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/pt2q.json")]
            metadata = json.loads(archive.read(names[0])) if names else {}
    except (zipfile.BadZipFile, ValueError, KeyError) as error:
        raise Pt2qError(f"{where}: not a torch.export archive ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dict) or not isinstance(metadata.get("output_types", []), list):
        raise Pt2qError(f"{where}: extra/pt2q.json is not pt2q's metadata")
    return metadata


def load(path: str | os.PathLike) -> GraphModule:
    """Load a model saved by `save`. The archive is vetted first (pt2q.archive): anything torch.export.load
    would run code from (pickles, expressions, guards, targets, unknown types) is refused with a Pt2qError."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the quantized_decomposed ops

    from . import ops  # noqa: F401 - registers pt2q::dequantize_weight

    from .archive import vet

    if hasattr(path, "read"):
        data = path.read()
    else:
        with open(path, "rb") as file:
            data = file.read()
    where = _where(path)
    metadata = _read_metadata(data, where)
    vet(data, where, metadata.get("output_types", []))
    # Load the bytes that were checked (not the path again, which could have changed meanwhile).
    exported = torch.export.load(io.BytesIO(data))
    graph_module = exported.module()
    graph_module.meta[QUANTIZED_KEY] = True
    graph_module.meta[meta.SAVED_METADATA] = metadata
    if metadata.get("backend"):
        recorded = metadata.get("config")
        cls = config_class(recorded) if recorded else \
            (DynamicQuantConfig if metadata.get("dynamic") else StaticQuantConfig)
        graph_module.meta[CONFIG_KEY] = cls(backend=metadata["backend"], mixed_bf16=metadata["mixed_bf16"])
    numerics = metadata.get("int8_numerics")
    if numerics:
        graph_module.meta[INT8_NUMERICS_KEY] = numerics
    from .backends.inductor.saturation import warn_if_saturating

    warn_if_saturating(graph_module, where, built_on=(numerics or {}).get("built_on"))
    return graph_module


def count_quantized_layers(qmodel: GraphModule) -> int:
    """Number of weighted layers (linear/conv) whose weight is dequantized from integers in the graph
    (int8 Q/DQ, or pt2q's packed weight-only form)."""
    from .ops import DEQUANTIZE_WEIGHT
    from .quantizers import weighted_ops

    dequant_ops = {torch.ops.quantized_decomposed.dequantize_per_channel.default,
                   torch.ops.quantized_decomposed.dequantize_per_tensor.default, DEQUANTIZE_WEIGHT}
    return sum(1 for node in qmodel.graph.nodes
               if node.target in weighted_ops() and len(node.args) > 1
               and getattr(node.args[1], "target", None) in dequant_ops)


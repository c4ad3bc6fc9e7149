"""prepare / calibrate / convert / quantize / save / load.

    prepared = pt2q.prepare(model, pt2q.StaticQuantConfig(), example_inputs)   # observed GraphModule
    pt2q.calibrate(prepared, calib_data)                                       # or call it yourself
    qmodel = pt2q.convert(prepared)                                            # Q/DQ GraphModule

or all at once: `pt2q.quantize(model, config, calib_data, example_inputs=...)`. The user's model is
never modified; `prepare` works on a capture of it.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from . import meta, pipeline
from .calibration import observers
from .capture import EXAMPLE_INPUTS_KEY
from .config import HQQConfig
from .config import AWQConfig, AutoRoundConfig, DynamicQuantConfig, FP8Config, GPTQConfig, RTNConfig, SmoothQuantConfig, StaticQuantConfig, TEQConfig, config_class
from .errors import ConfigError, NotPreparedError, Pt2qError
from .measurement import Measurement
from .passes.smooth_quant_apply import SmoothQuantReport
from .pipeline import check_not_converted as _check_not_converted

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

Config = StaticQuantConfig | DynamicQuantConfig | RTNConfig | HQQConfig | GPTQConfig | AWQConfig | AutoRoundConfig | TEQConfig | FP8Config
WEIGHT_ONLY_PLAN_KEY = meta.WEIGHT_ONLY_PLAN
WEIGHT_ONLY_REPORT_KEY = meta.WEIGHT_ONLY_REPORT


def prepare(model: torch.nn.Module, config: Config, example_inputs: Any = None, *,
            dynamic_shapes: Any = None) -> GraphModule:
    """Capture `model` (unless it is already a pt2q capture) and run the prepare stages of the pipeline
    `config` declares (pt2q.pipeline): observers, SmoothQuant recorders, the weight-only plan."""
    return pipeline.prepare(model, config, example_inputs, dynamic_shapes=dynamic_shapes)


def prepare_qat(model: torch.nn.Module, config: StaticQuantConfig | DynamicQuantConfig, example_inputs: Any = None,
                *, dynamic_shapes: Any = None) -> GraphModule:
    """Quantization-aware training: capture the training graph of `model` (a copy: the model is never
    changed; one in eval mode is captured in train mode, with a warning) and insert fake quantization
    with the config's QAT schemes (`StaticQuantConfig.qat_ranges`: "ema" or "learnable" activation
    ranges; dynamic activations take each batch's range). Conv + batch norm train as folded.

    Train the returned model like any module (its fake-quant ranges and the weights adapt), then
    `pt2q.convert(prepared)` gives the int8 model (batch norm folded, dropout off). Converting before any
    optimizer step is post-training quantization with the ranges the forward passes saw. For
    evaluation between steps use torchao's `move_exported_model_to_eval` / `move_exported_model_to_train`
    (exported graphs do not take `.eval()` / `.train()`)."""
    return pipeline.prepare_qat(model, config, example_inputs, dynamic_shapes=dynamic_shapes)


def calibrate(prepared: GraphModule, calib_data: Iterable, *, progress: bool = True) -> int:
    """Run every batch of `calib_data` (tuples of positional inputs or dicts of keyword inputs) through
    the prepared model: one shared pass for observers and SmoothQuant, block by block for GPTQ / AWQ
    (at most their `n_samples`). Returns the number of batches used. Raises CalibrationError on bad data."""
    return pipeline.calibrate(prepared, calib_data, progress=progress)


def convert(prepared: GraphModule, *, require_full_coverage: bool = False) -> GraphModule:
    """Turn a calibrated prepared model into the quantized GraphModule (Q/DQ for int8, packed weights for
    weight-only). This consumes `prepared`: calibrating or converting it again raises NotPreparedError.
    A model prepared by torchao's `prepare_pt2e` (with our quantizer or another) is converted as torchao does.
    `meta["pt2q_report"]` of the result lists the weighted ops left in float and why (pt2q.coverage), with
    one warning line for those the config did not ask for; `require_full_coverage=True` raises
    CoverageError naming the first of them instead."""
    if not isinstance(prepared, GraphModule) or not (observers(prepared) or prepared.meta.get(PREPARED_KEY)
                                                     or prepared.meta.get(CONVERTED_KEY)):
        raise NotPreparedError(
            f"convert() takes a model returned by pt2q.prepare() (or torchao prepare_pt2e) and calibrated; "
            f"got a {type(prepared).__name__} with no observers")
    return pipeline.convert(prepared, require_full_coverage=require_full_coverage)


def quantize(model: torch.nn.Module, config: Config | None, calib_data: Iterable | None = None, *,
             example_inputs: Any = None, dynamic_shapes: Any = None, progress: bool = True,
             backend: str | None = None, require_full_coverage: bool = False) -> GraphModule:
    """prepare + calibrate + convert in one call.

    `calib_data`: an iterable of batches, each a tuple of positional inputs or a dict of keyword inputs.
    Required for static quantization; optional for dynamic. `example_inputs` defaults to the first batch.
    `backend`: "auto" (the device pt2q.target_device() picks) or a device name ("cpu", "xpu", "hpu",
    "cuda"): the config is adjusted to what runs there (int8 for the X86 or XPU quantizer; an HPU takes
    FP8Config), and config=None takes that device's default (pt2q.targets). None: the config decides.
    With `PT2Q_DUMP_DIR` set, every pass is also dumped (text, diffs, numeric report, HTML): pt2q.debug.
    `require_full_coverage`: see `convert` (`qmodel.meta["pt2q_report"]` always says what stayed float).
    """
    if backend is not None:
        from . import targets

        config = targets.config_for(targets.resolve(backend), config)
    elif config is None:
        raise ConfigError("quantize() needs a config, or backend='auto' to pick the target device's default")
    if os.environ.get("PT2Q_DUMP_DIR"):
        from .debug.pipeline import dump_quantize
        return dump_quantize(model, config, calib_data, example_inputs=example_inputs,
                             dynamic_shapes=dynamic_shapes, progress=progress)
    return pipeline.quantize(model, config, calib_data, example_inputs=example_inputs,
                             dynamic_shapes=dynamic_shapes, progress=progress,
                             require_full_coverage=require_full_coverage)


def measure(model: torch.nn.Module, config: FP8Config, calib_data: Iterable, path: str | os.PathLike, *,
            example_inputs: Any = None, dynamic_shapes: Any = None, progress: bool = True) -> Measurement:
    """Calibrate `model` with `config` (an FP8Config with static activations) and write each FP8 layer's
    statistics and scales to the JSON file `path` (pt2q.measurement); then
    `quantize(model, FP8Config(..., from_measurement=path), example_inputs=...)` needs no data. The model is
    not changed, and a failed measure writes nothing."""
    from . import measurement

    path = measurement.check_measurable(config, path)
    calib_data, example_inputs = pipeline.split_calibration_data(config, calib_data, example_inputs, "measure()")
    prepared = pipeline.prepare(model, config, example_inputs, dynamic_shapes=dynamic_shapes, caller="measure()")
    batches = pipeline.calibrate(prepared, calib_data, progress=progress, desc="pt2q measure")
    return measurement.write(prepared, config, batches, path)


def smooth_quant(model_or_graph: torch.nn.Module, calib_data: Iterable, example_inputs: Any = None, *,
                 alpha: Any = 0.5, progress: bool = True, **options) -> tuple[GraphModule, SmoothQuantReport]:
    """Return an fp32 GraphModule with SmoothQuant scales folded in, and the report.

    `model_or_graph` is an nn.Module (captured here) or a GraphModule from `pt2q.capture`; neither is
    modified. `options` are the other `SmoothQuantConfig` fields. Runs the pipeline of a
    SmoothQuantConfig (pt2q.pipeline): plan, one calibration pass, apply.
    """
    config = SmoothQuantConfig(alpha=alpha, **options)
    graph_module = pipeline.quantize(model_or_graph, config, calib_data, example_inputs=example_inputs,
                                     progress=progress, caller="smooth_quant()", desc="pt2q smooth_quant")
    graph_module.meta.pop(meta.CONFIG, None)  # an fp32 graph: no quantization config applies to it
    return graph_module, graph_module.meta[meta.SMOOTH_QUANT_REPORT]


split_calibration_data = pipeline.split_calibration_data


def _saved_metadata(qmodel: GraphModule) -> dict:
    config = qmodel.meta.get(CONFIG_KEY)
    metadata = {"format": _SAVE_FORMAT, "backend": getattr(config, "backend", None),
                "mixed_bf16": bool(getattr(config, "mixed_bf16", False)),
                "dynamic": bool(getattr(config, "is_dynamic", False)),
                "config": type(config).__name__ if config is not None else None,
                "int8_numerics": qmodel.meta.get(INT8_NUMERICS_KEY)}
    if qmodel.meta.get(meta.TUNING) is not None:  # pt2q.autotune's trial table (JSON data), on a tuned model
        metadata["tuning"] = qmodel.meta[meta.TUNING]
    return metadata


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
    from .backends.habana import ops as _habana_ops  # noqa: F401 - registers pt2q_gaudi2:: / pt2q_gaudi3::

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
    if isinstance(metadata.get("tuning"), dict):
        graph_module.meta[meta.TUNING] = metadata["tuning"]
    from .backends.inductor.saturation import warn_if_saturating

    warn_if_saturating(graph_module, where, built_on=(numerics or {}).get("built_on"))
    return graph_module


count_quantized_layers = pipeline.count_quantized_layers

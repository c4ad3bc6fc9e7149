"""The FP8 measurement file (pt2q.measure -> FP8Config(from_measurement=...)): calibrate once, keep the statistics in a file, quantize from the file alone.

    pt2q.measure(model, FP8Config(...), calib_data, "model.fp8.json")     # calibration, writes the file
    pt2q.quantize(model, FP8Config(..., from_measurement="model.fp8.json"), example_inputs=...)

The file (JSON) lists every FP8 layer of the prepared graph in graph order: its node name, op and module
name, and per observed activation input the shape and max |x| seen in calibration, with the scale the
measuring config chose; per weight its shape, per-channel max |x| and scales. Quantizing from it sets
each activation observer's max |x| from the file and recomputes the scales with the quantizing config
(another scale method, format or device may be chosen than the one measured with); weights are read
from the model itself, so the file is small and the result is the graph that calibrating directly gives.

The file must come from the same model: node names, ops, module names and weight shapes must match,
and activation shapes must have the same rank and last dimension (batch and sequence sizes of the
example inputs may differ). The first difference is named in a MeasurementError. The file is written
to a temporary name and renamed, so a failed measure leaves no partial file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from . import meta
from .errors import ConfigError, MeasurementError
from .jsonfile import read_json, write_json_atomic

FORMAT = "pt2q-fp8-measurement"
VERSION = 1


@dataclass
class Measurement:
    """What `measure` wrote: the file, the FP8 layers it describes and the batches calibrated on."""

    path: Path
    layers: int
    batches: int

    def summary(self) -> str:
        return f"FP8 measurement of {self.layers} layers over {self.batches} batches -> {self.path}"


def check_measurable(config, path) -> Path:
    """The checks `pt2q.measure` makes before calibrating: an FP8Config with static activations and no
    measurement of its own, and a folder to write into."""
    from .config import FP8Config

    if not isinstance(config, FP8Config):
        raise ConfigError(f"measure() takes a pt2q.FP8Config, got {type(config).__name__}")
    if config.activation != "static":
        raise ConfigError("measure(): FP8Config(activation='dynamic') computes its scales at run time; there is "
                          "nothing to measure. Use activation='static'")
    if config.from_measurement is not None:
        raise ConfigError("measure(): the config already has from_measurement; measure with a config without it")
    path = Path(path)
    if not path.parent.is_dir():
        raise MeasurementError(f"measure(): the folder of {str(path)!r} does not exist; create it first")
    return path


def write(prepared: GraphModule, config, batches: int, path: Path) -> Measurement:
    """Write the measurement of a calibrated FP8 prepared graph to `path` (atomically)."""
    layers = [_layer_record(prepared, node, observed, with_values=True)
              for node, observed in _fp8_layers(prepared)]
    document = {"format": FORMAT, "version": VERSION, "model": prepared.meta.get(meta.SOURCE_CLASS),
                "config": _config_record(config), "calibration_batches": batches, "layers": layers}
    write_json_atomic(path, document, indent=1)
    return Measurement(path, len(layers), batches)


def load_into(prepared: GraphModule, path: str | os.PathLike) -> None:
    """Set the activation observers of `prepared` (an FP8 prepared graph) from the file at `path`,
    after checking that it describes this graph. Nothing is changed when a check fails."""
    document = read(path)
    here = [(node, observed, _layer_record(prepared, node, observed, with_values=False))
            for node, observed in _fp8_layers(prepared)]
    stored = {layer["node"]: layer for layer in document["layers"]}
    names_here = [record["node"] for _, _, record in here]
    for record_here in (r for _, _, r in here):
        theirs = stored.get(record_here["node"])
        if theirs is None:
            raise MeasurementError(f"{path}: this model's FP8 layer {_describe(record_here)} is not in the file; it "
                                   "was measured on another model (or another config's set_local rules): measure again")
        _compare(path, record_here, theirs)
    extra = [name for name in stored if name not in names_here]
    if extra:
        raise MeasurementError(f"{path}: the file has FP8 layer {_describe(stored[extra[0]])} that this model lacks "
                               f"({len(extra)} such layers); it was measured on another model: measure again")
    updates = []
    for node, observed, _ in here:
        entries = {entry["arg"]: entry for entry in stored[node.name]["inputs"]}
        for arg_index, observer in observed["inputs"]:
            amax = entries[arg_index]["amax"]
            updates.append((observer, torch.tensor(float(amax), dtype=torch.float32)))
    for observer, amax in updates:  # all checks passed: now write
        observer.amax = amax


def read(path: str | os.PathLike) -> dict:
    """The measurement document at `path`, checked for format, version and the fields quantizing reads."""
    document = read_json(path, MeasurementError, "FP8 measurement file", "run pt2q.measure again")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise MeasurementError(f"{path} is not a pt2q FP8 measurement file (format {FORMAT!r}); write one with "
                               "pt2q.measure")
    if document.get("version") != VERSION:
        raise MeasurementError(f"{path}: measurement version {document.get('version')!r}; this pt2q reads version "
                               f"{VERSION}: measure again")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise MeasurementError(f"{path}: no 'layers' list: the file is damaged; measure again")
    for index, layer in enumerate(layers):
        try:
            str(layer["node"]), list(layer["weight_shape"] or [])
            for entry in layer["inputs"]:
                int(entry["arg"]), list(entry["shape"])
                amax = float(entry["amax"])
                if not amax >= 0.0 or amax == float("inf"):
                    raise ValueError(f"amax {amax!r}")
        except (KeyError, TypeError, ValueError) as error:
            raise MeasurementError(f"{path}: layer #{index} ({layer.get('node') if isinstance(layer, dict) else layer!r}) "
                                   f"is damaged ({type(error).__name__}: {error}); measure again") from error
    return document


# -- the layers of a prepared FP8 graph --------------------------------------------------------------------
def _fp8_layers(prepared: GraphModule):
    """(node, {"inputs": [(arg index, observer)], "weight": (arg index, observer) | None}) per FP8 layer."""
    from .quantizers.fp8 import FP8Observer

    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        if node.op != "call_function":
            continue
        observed = {"inputs": [], "weight": None}
        for index, arg in enumerate(node.args):
            if isinstance(arg, Node) and arg.op == "call_module" and isinstance(modules.get(arg.target), FP8Observer):
                source = arg.args[0]
                if source.op == "get_attr":
                    observed["weight"] = (index, modules[arg.target])
                else:
                    observed["inputs"].append((index, modules[arg.target]))
        if observed["inputs"] or observed["weight"]:
            yield node, observed


def _layer_record(prepared: GraphModule, node: Node, observed: dict, with_values: bool) -> dict:
    from .graph import module_fqn

    record = {"node": node.name, "op": str(node.target), "module": module_fqn(node),
              "inputs": [], "weight_shape": None}
    for index, observer in observed["inputs"]:
        entry = {"arg": index, "shape": _shape(node.args[index].args[0])}
        if with_values:
            if not observer.observed or not torch.isfinite(observer.amax).all():
                raise MeasurementError(f"measure(): the input {node.args[index].args[0].name!r} of FP8 layer "
                                       f"{node.name!r} was {'not observed' if not observer.observed else 'NaN/Inf'} "
                                       "in calibration; nothing was written")
            entry["amax"] = float(observer.amax)
            entry["scale"] = float(observer.scale())
        record["inputs"].append(entry)
    if observed["weight"] is not None:
        index, observer = observed["weight"]
        record["weight_shape"] = _shape(node.args[index].args[0])
        if with_values:
            record["weight_amax"] = observer.amax.reshape(-1).tolist()
            record["weight_scale"] = observer.scale().reshape(-1).tolist()
    return record


def _shape(node: Node) -> list:
    value = node.meta.get("val")
    return [int(d) if isinstance(d, int) else str(d) for d in value.shape] if value is not None else []


def _describe(record: dict) -> str:
    return f"{record['node']!r} ({record['op']}, module {record['module'] or '<root>'!r})"


def _compare(path, here: dict, theirs: dict) -> None:
    where = f"{path}: FP8 layer {_describe(here)}"
    for key in ("op", "module"):
        if here[key] != theirs.get(key):
            raise MeasurementError(f"{where}: {key} is {theirs.get(key)!r} in the file; the file was measured on "
                                   "another model: measure again")
    if list(here["weight_shape"] or []) != list(theirs.get("weight_shape") or []):
        raise MeasurementError(f"{where}: weight shape {here['weight_shape']} here, {theirs.get('weight_shape')} in the "
                               "file; the file was measured on another model: measure again")
    mine = {entry["arg"]: entry for entry in here["inputs"]}
    stored = {entry["arg"]: entry for entry in theirs["inputs"]}
    if sorted(mine) != sorted(stored):
        raise MeasurementError(f"{where}: observed inputs {sorted(mine)} here, {sorted(stored)} in the file: measure again")
    for arg, entry in mine.items():
        a, b = entry["shape"], stored[arg]["shape"]
        if len(a) != len(b) or (a and a[-1] != b[-1]):
            raise MeasurementError(f"{where}: input {arg} has shape {a} here, {b} in the file (rank and last dimension "
                                   "must match); the file was measured on another model: measure again")


def _config_record(config) -> dict:
    from .fp8 import format_name

    return {"dtype": format_name(config.torch_dtype), "device": config.device, "scale_method": config.scale_method,
            "weight_granularity": config.weight_granularity, "weight_backoff": config.weight_backoff,
            "activation_backoff": config.activation_backoff}

"""Patch pt2q's scales into a qconf summary that IPEX produced. Plain dict/JSON code: runs without IPEX.

IPEX's static quantization records a model by tracing it (`ipex.quantization.prepare`, a calibration
run, then `prepared.save_qconf_summary(qconf_summary=path)`), and reads the file back with
`load_qconf_summary` before `convert`. The file can be edited but not written from nothing: its tensor
ids and op indices come from IPEX's own trace. Its layout (IPEX 2.8, `quantization/_utils.py`):

    {scope: {"q_op_infos": {op index: entry}, "nonq_op_infos": {...}, "layer_output_infos": [...]}}

A scope is a module with its own quantization state (" " is the root, "layers:0:attention" is
`layers.0.attention`); tensor ids are unique within a scope, and every entry that names one tensor id
shares that tensor's scale and zero point: when the file is loaded, the last entry listing the id wins.
An entry of a quantized op has "op_type", "op_type_is_module", "fqn" (the module name), per input
"id", "orig_dtype", "inf_dtype", "force_dtype", "scale", "zero_point", per weight "scale" (per output
channel) and "zero_point", and the observers it was calibrated with. An input is int8 when its
"force_dtype" is torch.quint8 / torch.qint8.

With IPEX's SmoothQuant qconfig (`ipex.quantization.get_smooth_quant_qconfig_mapping`) a Linear's input
info carries "smooth_quant_scaling_factor" as {weight key: [per input channel]}, and IPEX *multiplies*
the activation by it before quantizing; its weight info carries a list that IPEX multiplies into the
weight's input columns before quantizing with the weight scales. For pt2q's factor `s` (activation
divided by `s`, weight multiplied by `s`) the activation factor is therefore `1 / s` and the weight
factor `s`; the input scale is the one of the smoothed activation in both tools. The input scale and
zero point are then also keyed by weight key.

`patch_qconf(qconf, quantities)` writes, for every int8 module entry, pt2q's input scale / zero point,
weight scales / zero points and SmoothQuant factors, into that entry and into every other entry of its
scope that names the same input tensor. Every other field is kept. Int8 entries that are not modules
(attention matmuls and the like: pt2q records module layers only) keep IPEX's own calibration, and the
report lists them.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import Pt2qError
from ...jsonfile import read_json, write_json_atomic
from .quantities import load_quantities, validate_quantities

__all__ = ["QconfError", "QconfPatchReport", "check_loadable", "int8_module_entries", "patch_qconf",
           "patch_qconf_file", "read_qconf"]

QUANTIZED_DTYPES = {"torch.quint8": "uint8", "torch.qint8": "int8"}
DTYPE_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
# The dtype strings IPEX 2.8's loader maps back to torch dtypes (its `dtype_dict`).
KNOWN_DTYPES = frozenset({
    "torch.quint8", "torch.qint8", "torch.float32", "torch.float64", "torch.float16", "torch.bfloat16",
    "torch.complex64", "torch.complex128", "torch.int16", "torch.int32", "torch.int64", "torch.bool",
    "torch.uint8", "torch.int8", "torch.quint4x2",
})
SMOOTH_QUANT_OBSERVER = "SmoothQuantActivationObserver"
_CLASS_STRING = re.compile(r"<class '([^']+)'>")
_CALLABLE_STRING = re.compile(r"<(?:built-in )?(?:method|function|slot wrapper) '?([\w.]+)'?")


class QconfError(Pt2qError, ValueError):
    """An IPEX qconf summary is unreadable, not of the layout IPEX's loader reads, or does not fit pt2q's
    quantities (the message names the scope, entry and field)."""


@dataclass
class QconfPatchReport:
    """What `patch_qconf` did: module names patched (with SmoothQuant factors: `smooth_quant`), and the
    int8 entries that kept IPEX's own calibration (`kept_ipex`, as "scope/index op (fqn)")."""
    patched: list[str] = field(default_factory=list)
    smooth_quant: list[str] = field(default_factory=list)
    kept_ipex: list[str] = field(default_factory=list)
    shared_entries: int = 0  # other entries rewritten because they name a patched input tensor

    def summary(self) -> str:
        return (f"IPEX qconf: {len(self.patched)} layers patched with pt2q's scales "
                f"({len(self.smooth_quant)} with SmoothQuant factors, {self.shared_entries} entries sharing "
                f"their inputs), {len(self.kept_ipex)} int8 ops kept IPEX's calibration")


# -- reading and checking --------------------------------------------------------------------------------
def read_qconf(path: str | Path) -> dict:
    """Load a qconf JSON file and check it has the layout IPEX's loader reads (`check_loadable`)."""
    path = Path(path)
    qconf = read_json(path, QconfError, "IPEX qconf", "save it again with prepared.save_qconf_summary(qconf_summary=...)")
    check_loadable(qconf, str(path))
    return qconf


def _require(container: dict, key: str, kind, where: str):
    if key not in container:
        raise QconfError(f"{where}: missing {key!r}, which IPEX's load_qconf_summary reads")
    value = container[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise QconfError(f"{where}.{key}: expected {expected}, got {type(value).__name__}")
    return value


def _check_dtype(info: dict, key: str, where: str) -> None:
    value = _require(info, key, str, where)
    if value not in KNOWN_DTYPES:
        raise QconfError(f"{where}.{key}: {value!r} is not a dtype IPEX's loader knows")


def _check_numbers(value, where: str, integer: bool = False) -> None:
    lists = value.values() if isinstance(value, dict) else [value]
    for numbers in lists:
        if not isinstance(numbers, list) or not numbers:
            raise QconfError(f"{where}: expected a non-empty list of numbers")
        for number in numbers:
            kind = int if integer else (int, float)
            if isinstance(number, bool) or not isinstance(number, kind) or not math.isfinite(number):
                raise QconfError(f"{where}: {number!r} is not a finite {'integer' if integer else 'number'}")


def _check_qparams(info: dict, where: str, factor_may_be_null: bool) -> None:
    if "scale" in info or "zero_point" in info:
        scale = _require(info, "scale", (list, dict), where)
        zero_point = _require(info, "zero_point", (list, dict), where)
        if type(scale) is not type(zero_point) or isinstance(scale, dict) and set(scale) != set(zero_point):
            raise QconfError(f"{where}: 'scale' and 'zero_point' must have the same form and keys")
        _check_numbers(scale, f"{where}.scale")
        _check_numbers(zero_point, f"{where}.zero_point", integer=True)
    null_factor = factor_may_be_null and info.get("smooth_quant_scaling_factor", 0) is None
    if "smooth_quant_scaling_factor" in info and not null_factor:
        factor = _require(info, "smooth_quant_scaling_factor", (list, dict), where)
        _check_numbers(factor, f"{where}.smooth_quant_scaling_factor")


def _check_tensor_infos(entry: dict, key: str, where: str, *, with_id: bool, with_force: bool) -> None:
    for position, info in enumerate(_require(entry, key, list, where)):
        at = f"{where}.{key}[{position}]"
        if not isinstance(info, dict):
            raise QconfError(f"{at}: expected an object ({{}} for a non-tensor argument)")
        if not info:
            continue
        if with_id:
            _require(info, "id", int, at)
        _check_dtype(info, "orig_dtype", at)
        _check_dtype(info, "inf_dtype", at)
        if with_force:
            _check_dtype(info, "force_dtype", at)
        # IPEX writes a null factor on outputs (its loader does not read it there), never on inputs.
        _check_qparams(info, at, factor_may_be_null=key in ("output_tensor_infos", "layer_output_infos"))


def check_loadable(qconf, source: str = "qconf") -> None:
    """Raise QconfError unless `qconf` has every key, type and dtype string that IPEX 2.8's
    `load_qconf_summary` reads (scopes, op entries, tensor infos, observer settings)."""
    if not isinstance(qconf, dict) or not qconf:
        raise QconfError(f"{source}: expected a non-empty JSON object of scopes, as save_qconf_summary writes")
    for scope, layer in qconf.items():
        where = f"{source}[{scope!r}]"
        if not isinstance(layer, dict):
            raise QconfError(f"{where}: expected an object with q_op_infos, nonq_op_infos, layer_output_infos")
        for index, entry in _require(layer, "q_op_infos", dict, where).items():
            at = f"{where}.q_op_infos[{index!r}]"
            if not index.isdigit():
                raise QconfError(f"{at}: op indices are decimal integers")
            if not isinstance(entry, dict):
                raise QconfError(f"{at}: expected an object")
            _require(entry, "fqn", str, at)
            _require(entry, "op_type", str, at)
            _check_tensor_infos(entry, "input_tensor_infos", at, with_id=True, with_force=True)
            _check_tensor_infos(entry, "weight_tensor_infos", at, with_id=False, with_force=False)
            _check_tensor_infos(entry, "output_tensor_infos", at, with_id=True, with_force=False)
            for observer in ("activation_observer", "weight_observer"):
                _require(_require(entry, observer, dict, at), "name", str, f"{at}.{observer}")
        for index, entry in _require(layer, "nonq_op_infos", dict, where).items():
            at = f"{where}.nonq_op_infos[{index!r}]"
            if not isinstance(entry, dict):
                raise QconfError(f"{at}: expected an object")
            _require(entry, "fqn", str, at)
            _check_tensor_infos(entry, "input_tensor_infos", at, with_id=True, with_force=False)
            _check_tensor_infos(entry, "output_tensor_infos", at, with_id=True, with_force=False)
        _check_tensor_infos(layer, "layer_output_infos", where, with_id=True, with_force=False)


# -- which entries are int8 layers ----------------------------------------------------------------------
def _effective_dtype(info: dict) -> str:
    """The dtype IPEX's convert uses for an input: 'force_dtype' wins where it differs from 'inf_dtype'."""
    return info.get("force_dtype", info.get("inf_dtype", ""))


def _is_int8_input(info: dict) -> bool:
    return bool(info) and info.get("orig_dtype") == "torch.float32" and _effective_dtype(info) in QUANTIZED_DTYPES


def _first_input(entry: dict) -> dict | None:
    return next((info for info in entry["input_tensor_infos"] if info), None)


def _first_weight(entry: dict) -> dict | None:
    return next((info for info in entry["weight_tensor_infos"] if info), None)


def _is_int8_module(entry: dict) -> bool:
    activation, weight = _first_input(entry), _first_weight(entry)
    return bool(entry.get("op_type_is_module")) and activation is not None and _is_int8_input(activation) \
        and weight is not None and weight.get("inf_dtype") == "torch.qint8"


def int8_module_entries(qconf: dict) -> dict[str, list[tuple[str, str]]]:
    """{module name: [(scope, op index), ...]} of the int8 Linear / Conv module entries (a module called
    twice has two entries)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for scope, layer in qconf.items():
        for index, entry in layer["q_op_infos"].items():
            if _is_int8_module(entry):
                found.setdefault(entry["fqn"], []).append((scope, index))
    return found


def _op_name(entry: dict) -> str:
    """A readable op name from IPEX's repr string: the class path of a module, else the callable's name."""
    match = _CLASS_STRING.fullmatch(entry["op_type"]) or _CALLABLE_STRING.match(entry["op_type"])
    return match.group(1) if match else entry["op_type"]


# -- patching -------------------------------------------------------------------------------------------
def _keyed_like(existing, value):
    """`value` in the form of `existing`: a list, or a dict with the same keys (IPEX keys SmoothQuant
    activation values by weight)."""
    return {key: list(value) for key in existing} if isinstance(existing, dict) else list(value)


def _close(first: list[float], second: list[float]) -> bool:
    return len(first) == len(second) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
                                             for a, b in zip(first, second))


def _check_dtype_matches(name: str, where: str, activation: dict, layer: dict) -> None:
    ipex_dtype = QUANTIZED_DTYPES[_effective_dtype(activation)]
    if layer["input_dtype"] != ipex_dtype:
        raise QconfError(f"{where} ({name}): IPEX quantizes the input to {ipex_dtype}, pt2q to "
                         f"{layer['input_dtype']}; quantize with StaticQuantConfig(backend='x86') (uint8 "
                         f"activations, as IPEX's default qconfig)")
    low, high = DTYPE_RANGES[ipex_dtype]
    if not low <= layer["input_quant_min"] <= layer["input_zero_point"] <= layer["input_quant_max"] <= high:
        raise QconfError(f"{where} ({name}): pt2q's input zero point {layer['input_zero_point']} and range "
                         f"[{layer['input_quant_min']}, {layer['input_quant_max']}] do not fit {ipex_dtype}")
    if not -128 <= layer["weight_quant_min"] < layer["weight_quant_max"] <= 127:
        raise QconfError(f"{where} ({name}): pt2q's weight range [{layer['weight_quant_min']}, "
                         f"{layer['weight_quant_max']}] does not fit IPEX's int8 weights")
    if any(zero_point != 0 for zero_point in layer["weight_zero_points"]):
        raise QconfError(f"{where} ({name}): pt2q's weight zero points are not all 0; IPEX's int8 weights are "
                         f"symmetric")


def _smooth_quant_entry(entry: dict, activation: dict, weight: dict) -> bool:
    observer = entry["activation_observer"]
    return observer.get("name") == SMOOTH_QUANT_OBSERVER and bool(observer.get("smooth_quant_enabled")) and \
        "smooth_quant_scaling_factor" in activation and "smooth_quant_scaling_factor" in weight


def _patch_layer(name: str, where: str, entry: dict, layer: dict, report: QconfPatchReport):
    """Write pt2q's values into one int8 module entry; returns (tensor id, scale, zero point, activation
    factor or None) for the entries sharing its input."""
    activation, weight = _first_input(entry), _first_weight(entry)
    _check_dtype_matches(name, where, activation, layer)
    if "scale" not in activation or "scale" not in weight:
        raise QconfError(f"{where} ({name}): no calibrated scale in the qconf; run calibration before "
                         f"save_qconf_summary")
    out_channels = len(weight["scale"])
    if len(layer["weight_scales"]) != out_channels:
        hint = " (pt2q quantized the weight per tensor: use weight_granularity='per_channel')" \
            if len(layer["weight_scales"]) == 1 else ""
        raise QconfError(f"{where} ({name}).weight_tensor_infos[0].scale: IPEX has {out_channels} output "
                         f"channels, pt2q {len(layer['weight_scales'])}{hint}")
    factor = layer["smooth_quant_scaling_factor"]
    activation_factor = None
    if _smooth_quant_entry(entry, activation, weight):
        in_channels = len(weight["smooth_quant_scaling_factor"])
        if factor is None:
            factor = [1.0] * in_channels  # SmoothQuant left this layer alone
        elif len(factor) != in_channels:
            raise QconfError(f"{where} ({name}).smooth_quant_scaling_factor: IPEX has {in_channels} input "
                             f"channels, pt2q's factor has {len(factor)}")
        else:
            report.smooth_quant.append(name)
        weight["smooth_quant_scaling_factor"] = list(factor)
        activation_factor = [1.0 / value for value in factor]
    elif factor is not None and any(value != 1.0 for value in factor):
        raise QconfError(f"{where} ({name}): pt2q smoothed this layer but the qconf entry has no SmoothQuant "
                         f"factors; prepare IPEX with ipex.quantization.get_smooth_quant_qconfig_mapping()")
    weight["scale"] = list(layer["weight_scales"])
    weight["zero_point"] = list(layer["weight_zero_points"])
    return activation["id"], [layer["input_scale"]], [layer["input_zero_point"]], activation_factor


def _tensor_infos_of_scope(layer: dict):
    for entry in layer["q_op_infos"].values():
        yield from (info for info in entry["input_tensor_infos"] if info)
        yield from (info for info in entry["output_tensor_infos"] if info)
    yield from (info for info in layer["layer_output_infos"] if info)


def patch_qconf(qconf: dict, quantities: dict[str, dict[str, Any]]) -> tuple[dict, QconfPatchReport]:
    """A copy of `qconf` with pt2q's `quantities` (pt2q.backends.ipex.extract_quantities) written into
    its int8 module entries; `qconf` itself is not changed. Every int8 module of the qconf needs a pt2q
    entry and every pt2q entry an int8 module of the qconf: either missing raises QconfError naming them."""
    check_loadable(qconf)
    validate_quantities(quantities)
    patched = copy.deepcopy(qconf)
    modules = int8_module_entries(patched)
    only_ipex = sorted(set(modules) - set(quantities))
    only_pt2q = sorted(set(quantities) - set(modules))
    if only_ipex:
        raise QconfError(f"int8 layers in the IPEX qconf without pt2q quantities: {', '.join(only_ipex)}; "
                         f"quantize them with pt2q too (or the qconf was made from another model)")
    if only_pt2q:
        raise QconfError(f"pt2q quantities for layers that are not int8 modules of the IPEX qconf: "
                         f"{', '.join(only_pt2q)}; the qconf was made from another model, or IPEX keeps them "
                         f"in fp32")
    report = QconfPatchReport()
    own_inputs = set()  # id() of each layer entry's own input info
    # (scope, tensor id) -> (scale, zero point, activation factor, the layer that set them)
    shared: dict[tuple[str, int], tuple[list, list, list | None, str]] = {}
    for name, places in modules.items():
        for scope, index in places:
            where = f"qconf[{scope!r}].q_op_infos[{index!r}]"
            own_inputs.add(id(_first_input(patched[scope]["q_op_infos"][index])))
            tensor_id, scale, zero_point, factor = _patch_layer(name, where, patched[scope]["q_op_infos"][index],
                                                                quantities[name], report)
            key = (scope, tensor_id)
            if key in shared:
                first_scale, first_zero, first_factor, first_name = shared[key]
                same_factor = (first_factor is None) == (factor is None) and \
                    (factor is None or _close(first_factor, factor))
                if not (_close(first_scale, scale) and first_zero == zero_point and same_factor):
                    raise QconfError(f"{where}: IPEX quantizes the input of {first_name} and {name} once "
                                     f"(tensor {tensor_id}), but pt2q's input scales or SmoothQuant factors "
                                     f"for them differ")
            shared[key] = (scale, zero_point, factor, name)
        report.patched.append(name)
    for scope, layer in patched.items():
        for info in _tensor_infos_of_scope(layer):
            values = shared.get((scope, info.get("id")))
            if values is None or "scale" not in info:
                continue
            scale, zero_point, factor, _ = values
            info["scale"] = _keyed_like(info["scale"], scale)
            info["zero_point"] = _keyed_like(info["zero_point"], zero_point)
            if factor is not None and "smooth_quant_scaling_factor" in info:
                info["smooth_quant_scaling_factor"] = _keyed_like(info["smooth_quant_scaling_factor"], factor)
            report.shared_entries += id(info) not in own_inputs
        for index, entry in layer["q_op_infos"].items():
            if not _is_int8_module(entry) and any(_is_int8_input(info) for info in entry["input_tensor_infos"]):
                report.kept_ipex.append(f"{scope}/{index} {_op_name(entry)} ({entry['fqn'] or 'root'})")
    check_loadable(patched, "patched qconf")
    return patched, report


def patch_qconf_file(qconf_path: str | Path, quantities: dict[str, dict[str, Any]] | str | Path,
                     out_path: str | Path) -> QconfPatchReport:
    """Read IPEX's qconf at `qconf_path`, patch pt2q's `quantities` (a dict, or a file save_quantities
    wrote) in, and write the result to `out_path` atomically. Nothing is written when anything fails."""
    qconf = read_qconf(qconf_path)
    if not isinstance(quantities, dict):
        quantities = load_quantities(quantities)
    patched, report = patch_qconf(qconf, quantities)
    write_json_atomic(out_path, patched)
    return report

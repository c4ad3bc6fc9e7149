"""User-facing quantization configs and their `set_local` rules.

`StaticQuantConfig` (calibrated int8 activations) and `DynamicQuantConfig` (activation qparams computed
at run time). `set_local(target, config_or_None)` overrides the global choice: `target` is a regex on
module names (matched against every enclosing module's name, as in `named_modules()`), an
`nn.Module` subclass, or an ATen op; `None` keeps the matched nodes in fp32. Name rules beat type rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .isa import SATURATION_GUARDS
from .quantizers import QUANTIZERS
from .quantizers.base import ACTIVATION_OBSERVERS, QuantScheme, RuleQuantizer

BACKENDS = tuple(QUANTIZERS)

# Every string field and its valid values, and the boolean fields: what `validate` checks.
_CHOICES = {
    "backend": BACKENDS,
    "activation_observer": tuple(sorted(ACTIVATION_OBSERVERS)),
    "weight_granularity": ("per_channel", "per_tensor"),
    "saturation_guard": SATURATION_GUARDS,
}
_FLAGS = ("mixed_bf16", "quantize_attention_matmul")


def _reject_unknown_fields(cls, kwargs: dict) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in kwargs:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cls.__name__} has no field {name!r}{hint}; valid fields: {', '.join(valid)}")


class _Config:
    """Shared behaviour: `set_local` and conversion to a quantizer. Subclasses define
    `scheme(quantizer_cls) -> QuantScheme`."""

    def validate(self) -> None:
        """Check every field by type and value (at construction, and again when the config is used, since
        fields can be assigned later). Raises ConfigError naming the field and the valid values."""
        name = type(self).__name__
        for field_name, choices in _CHOICES.items():
            if not hasattr(self, field_name):
                continue
            value = getattr(self, field_name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"{name}.{field_name}={value!r} is not valid; valid: "
                                  f"{', '.join(map(repr, choices))}")
        for field_name in _FLAGS:
            value = getattr(self, field_name, False)
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{field_name} must be True or False, got {value!r} "
                                  f"({type(value).__name__})")
        if hasattr(self, "smooth_quant") and self.smooth_quant is not None:
            if not isinstance(self.smooth_quant, SmoothQuantConfig):
                raise ConfigError(f"{name}.smooth_quant must be a pt2q.SmoothQuantConfig or None, "
                                  f"got {type(self.smooth_quant).__name__}")
            self.smooth_quant.validate()

    def set_local(self, target: Any, config: "StaticQuantConfig | DynamicQuantConfig | None"):
        """Override the config for a module-name regex, an nn.Module class or an ATen op. Returns self."""
        if not isinstance(target, (str, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise ConfigError(f"set_local target must be a module-name regex, an nn.Module class or an ATen op; "
                              f"got {target!r}")
        if isinstance(target, type) and not issubclass(target, torch.nn.Module):
            raise ConfigError(f"set_local target class {target.__name__} is not an nn.Module subclass")
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as error:
                raise ConfigError(f"set_local({target!r}): not a valid regex: {error}") from error
        if config is not None:
            if not isinstance(config, _Config):
                raise ConfigError(f"set_local config must be a StaticQuantConfig, DynamicQuantConfig or None; "
                                  f"got {type(config).__name__}")
            if config.backend != self.backend:
                raise ConfigError(f"set_local({target!r}): backend {config.backend!r} differs from the global "
                                  f"backend {self.backend!r}")
        self.local_rules.append((target, config))
        return self

    def to_quantizer(self) -> RuleQuantizer:
        self.validate()
        for target, config in self.local_rules:
            if config is not None:
                config.validate()
                if config.backend != self.backend:
                    raise ConfigError(f"set_local({target!r}): backend {config.backend!r} differs from the global "
                                      f"backend {self.backend!r}")
        quantizer_cls = QUANTIZERS[self.backend]
        quantizer = quantizer_cls(quantize_attention_matmul=self.quantize_attention_matmul)
        quantizer.set_global(self.scheme(quantizer_cls))
        for target, config in self.local_rules:
            scheme = None if config is None else config.scheme(quantizer_cls)
            if isinstance(target, str):
                quantizer.set_module_name(target, scheme)
            else:
                quantizer.set_op_type(target, scheme)
        return quantizer


@dataclass(init=True)
class StaticQuantConfig(_Config):
    """Static int8: activation qparams from calibration.

    backend: "x86" (uint8 activations) or "xpu" (int8 activations).
    activation_observer: "histogram" (default: MSE-optimal clipping of outliers; on MiniLM mean
        cosine 0.9939 vs 0.9933 for "minmax"), "minmax" (exact ranges), "moving_average".
    weight_granularity: "per_channel" (default) or "per_tensor".
    mixed_bf16: run the non-quantized ops in bfloat16 (int8-mixed-bf16) when compiled.
    quantize_attention_matmul: also quantize activation x activation matmuls (eager attention).
    smooth_quant: a `pt2q.SmoothQuantConfig` to smooth activation outliers (same calibration pass).
    saturation_guard: "auto" (default: on CPUs whose int8 kernels saturate, i.e. without VNNI/AMX,
        int8 weights in [-64, 63]; nothing elsewhere), "weights7", "activations7" (torchao's 7-bit
        activations; under Inductor it holds only for inputs inside the calibrated range) or "off".
        See `pt2q.isa`.
    """

    backend: str = "x86"
    activation_observer: str = "histogram"
    weight_granularity: str = "per_channel"
    mixed_bf16: bool = False
    quantize_attention_matmul: bool = False
    smooth_quant: Any = None
    saturation_guard: str = "auto"
    local_rules: list = field(default_factory=list, repr=False, init=False)  # filled by set_local()

    def __post_init__(self):
        self.validate()

    is_dynamic = False
    needs_calibration = True

    def scheme(self, quantizer_cls):
        return quantizer_cls.static_scheme(observer=self.activation_observer,
                                           per_channel=self.weight_granularity == "per_channel",
                                           saturation_guard=self.saturation_guard)


@dataclass(init=True)
class _UncalibratedConfig(_Config):
    """Fields shared by the configs that need no calibration data."""

    backend: str = "x86"
    weight_granularity: str = "per_channel"
    mixed_bf16: bool = False
    quantize_attention_matmul: bool = False
    local_rules: list = field(default_factory=list, repr=False, init=False)  # filled by set_local()

    def __post_init__(self):
        self.validate()

    needs_calibration = False


@dataclass(init=True)
class DynamicQuantConfig(_UncalibratedConfig):
    """Dynamic int8: int8 weights, activation qparams computed per call (no calibration data needed).
    `saturation_guard` as in StaticQuantConfig."""

    saturation_guard: str = "auto"
    is_dynamic = True

    def scheme(self, quantizer_cls):
        return quantizer_cls.dynamic_scheme(per_channel=self.weight_granularity == "per_channel",
                                            saturation_guard=self.saturation_guard)


@dataclass(init=True)
class WeightOnlyQuantConfig(_UncalibratedConfig):
    """Weight-only int8 (round to nearest, symmetric per output channel); activations stay fp32.
    No calibration data needed."""

    is_dynamic = False

    def scheme(self, quantizer_cls):
        return quantizer_cls.weight_only_scheme(per_channel=self.weight_granularity == "per_channel")


def with_field_check(cls):
    """Wrap a config dataclass's generated __init__ so an unknown field raises a ConfigError that
    lists the valid fields (instead of a bare TypeError)."""
    generated_init = cls.__init__

    def __init__(self, *args, **kwargs):
        _reject_unknown_fields(cls, kwargs)
        generated_init(self, *args, **kwargs)

    __init__.__doc__ = generated_init.__doc__
    cls.__init__ = __init__
    return cls


StaticQuantConfig = with_field_check(StaticQuantConfig)
DynamicQuantConfig = with_field_check(DynamicQuantConfig)
WeightOnlyQuantConfig = with_field_check(WeightOnlyQuantConfig)

# The registry of quantization configs: kind (the compile backend's `mode`) -> class. save/load, the
# compile backend, the CLI and prepare() look configs up here.
CONFIG_KINDS: dict[str, type] = {
    "static": StaticQuantConfig,
    "dynamic": DynamicQuantConfig,
    "weight_only": WeightOnlyQuantConfig,
}


def config_kind(config) -> str | None:
    """The registry kind of a config object, or None when it is not a quantization config."""
    return next((kind for kind, cls in CONFIG_KINDS.items() if type(config) is cls), None)


def config_class(name: str) -> type:
    """A config class by kind ("static") or class name ("StaticQuantConfig")."""
    for kind, cls in CONFIG_KINDS.items():
        if name in (kind, cls.__name__):
            return cls
    names = [f"{kind} ({cls.__name__})" for kind, cls in CONFIG_KINDS.items()]
    raise ConfigError(f"unknown quantization config {name!r}; known: {', '.join(names)}")


_CRITERIA = ("min", "max", "mean")


@dataclass(kw_only=True)
class SmoothQuantConfig:
    """alpha: float in [0, 1]; "auto" (grid search per group on fake-quantized consumer outputs); or a
        dict {module-name regex | nn.Module class | ATen op: float | "auto" | None} (first matching key
        wins, other groups use `default_alpha`; None leaves those layers unsmoothed).
    folding_only: only smooth groups whose producer can absorb the scale (no explicit `mul`).
    auto_grid: the alphas tried by "auto". auto_criterion: how a group's consumers' best alphas combine.
    skip_if_worse: leave a group unsmoothed when smoothing raises its consumers' estimated (fake-quant)
        output error on a calibration sample; the report lists it with both errors.
    """

    alpha: Any = 0.5
    default_alpha: float = 0.5
    folding_only: bool = False
    auto_grid: tuple = tuple(round(i * 0.1, 2) for i in range(11))
    auto_criterion: str = "mean"
    skip_if_worse: bool = True

    def __post_init__(self):
        try:
            self.auto_grid = tuple(float(a) for a in self.auto_grid)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"SmoothQuant auto_grid must be alphas in [0, 1], got {self.auto_grid!r}") from error
        self.validate()

    @staticmethod
    def _check_alpha_value(value, where: str, allow_none: bool = False) -> None:
        if value == "auto" or (allow_none and value is None):
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"SmoothQuant {where} must be a number in [0, 1] or 'auto', got {value!r}")

    def validate(self) -> None:
        if isinstance(self.alpha, dict):
            if not self.alpha:
                raise ConfigError("SmoothQuant alpha dict is empty")
            for key, value in self.alpha.items():
                if not isinstance(key, (str, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                    raise ConfigError(f"SmoothQuant alpha key {key!r} must be a module-name regex, an nn.Module "
                                      "class or an ATen op")
                if isinstance(key, str):
                    try:
                        re.compile(key)
                    except re.error as error:
                        raise ConfigError(f"SmoothQuant alpha key {key!r} is not a valid regex: {error}") from error
                self._check_alpha_value(value, f"alpha[{key!r}]", allow_none=True)
        else:
            self._check_alpha_value(self.alpha, "alpha")
        self._check_alpha_value(self.default_alpha, "default_alpha", allow_none=True)
        if self.auto_criterion not in _CRITERIA:
            raise ConfigError(f"SmoothQuant auto_criterion={self.auto_criterion!r}; valid: {_CRITERIA}")
        if not self.auto_grid or any(not 0.0 <= a <= 1.0 for a in self.auto_grid):
            raise ConfigError(f"SmoothQuant auto_grid must be alphas in [0, 1], got {self.auto_grid}")

    @property
    def needs_samples(self) -> bool:
        values = self.alpha.values() if isinstance(self.alpha, dict) else [self.alpha]
        return self.skip_if_worse or any(v == "auto" for v in values)


SmoothQuantConfig = with_field_check(SmoothQuantConfig)

"""User-facing quantization configs and their `set_local` rules.

`StaticQuantConfig` (calibrated int8 activations) and `DynamicQuantConfig` (activation qparams computed
at run time). `set_local(target, config_or_None)` overrides the global choice: `target` is a regex on
module names (matched against every enclosing module's name, as in `named_modules()`), an
`nn.Module` subclass, or an ATen op; `None` keeps the matched nodes in fp32. Name rules beat type rules.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .isa import SATURATION_GUARDS
from .quantizers import QUANTIZERS
from .quantizers.base import ACTIVATION_OBSERVERS, QuantScheme, RuleQuantizer

BACKENDS = tuple(QUANTIZERS)


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

    def _validate_common(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"{type(self).__name__}.backend={self.backend!r} is unknown; valid: {BACKENDS}")
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"{type(self).__name__}.weight_granularity={self.weight_granularity!r}; valid: "
                              "'per_channel', 'per_tensor'")
        guard = getattr(self, "saturation_guard", "off")
        if guard not in SATURATION_GUARDS:
            raise ConfigError(f"{type(self).__name__}.saturation_guard={guard!r}; valid: "
                              f"{', '.join(map(repr, SATURATION_GUARDS))}")

    def set_local(self, target: Any, config: "StaticQuantConfig | DynamicQuantConfig | None"):
        """Override the config for a module-name regex, an nn.Module class or an ATen op. Returns self."""
        if not isinstance(target, (str, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise ConfigError(f"set_local target must be a module-name regex, an nn.Module class or an ATen op; "
                              f"got {target!r}")
        if isinstance(target, type) and not issubclass(target, torch.nn.Module):
            raise ConfigError(f"set_local target class {target.__name__} is not an nn.Module subclass")
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
        self._validate_common()
        from .smooth_quant import SmoothQuantConfig

        if self.smooth_quant is not None and not isinstance(self.smooth_quant, SmoothQuantConfig):
            raise ConfigError(f"StaticQuantConfig.smooth_quant must be a pt2q.SmoothQuantConfig or None, "
                              f"got {type(self.smooth_quant).__name__}")
        if self.activation_observer not in ACTIVATION_OBSERVERS:
            raise ConfigError(f"StaticQuantConfig.activation_observer={self.activation_observer!r}; valid: "
                              f"{sorted(ACTIVATION_OBSERVERS)}")

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
        self._validate_common()

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

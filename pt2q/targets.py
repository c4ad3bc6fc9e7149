"""What runs on each target device: the quantizer `backend="auto"` picks and the lowering `compile` uses.

    device   quantizes with                               lowers with
    cpu      StaticQuantConfig / DynamicQuantConfig (x86)   backends.inductor.compile (oneDNN int8, pt2q's
             and the weight-only configs                    weight-only kernels) — real here
    cuda     as cpu (pt2q has no CUDA lowering)             backends.inductor.compile, on the CPU
    xpu      int8 configs with backend="xpu"                backends.xpu.compile (Inductor on the XPU)
    hpu      FP8Config                                      backends.habana.lower (HPU fp8 ops)

`resolve(name)` turns "auto" (pt2q.target_device(): hpu > xpu > cuda > cpu, PT2Q_TARGET_DEVICE first)
or a device name into its `Target`. `config_for(target, config)` is the config a target quantizes
with (a copy, never the caller's object). `compile(qmodel, example_inputs, backend)` lowers a quantized
model: an FP8 model always goes to the Habana lowering (the one that runs FP8; its ops are emulated on a
CPU), an int8 model quantized for the XPU to the XPU backend on an XPU and through Inductor's CPU path
elsewhere, everything else to Inductor.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, DeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    device: str
    int8_backend: str | None    # the config.backend of int8 configs here; None: int8 does not run here
    lowering: str               # a key of LOWERINGS
    default_config: str         # the CONFIG_KINDS kind quantize(backend=...) uses when no config is given


TARGETS = {
    "cpu": Target("cpu", "x86", "inductor", "static"),
    "cuda": Target("cuda", "x86", "inductor", "static"),
    "xpu": Target("xpu", "xpu", "xpu", "static"),
    "hpu": Target("hpu", None, "habana", "fp8"),
}
LOWERINGS = ("inductor", "xpu", "habana")


def resolve(name: str = "auto") -> Target:
    """The Target of "auto" (pt2q.target_device()) or of a device name."""
    from .device import target_device

    if not isinstance(name, str):
        raise DeviceError(f"backend={name!r}: give 'auto' or a device name: {', '.join(map(repr, TARGETS))}")
    device = target_device() if name == "auto" else name
    if device not in TARGETS:
        raise DeviceError(f"backend={name!r} is not a target; valid: 'auto', {', '.join(map(repr, TARGETS))}")
    if device == "cuda":
        log.info("pt2q has no CUDA lowering: the CUDA machine quantizes and runs on its CPU (Inductor)")
    return TARGETS[device]


def config_for(target: Target, config: Any = None):
    """The config `target` quantizes with: `config` adjusted to it (a copy), or the target's default."""
    from .config import CONFIG_KINDS, FP8Config

    if config is None:
        config = CONFIG_KINDS[target.default_config]()
        if hasattr(config, "backend") and target.int8_backend is not None:
            config.backend = target.int8_backend
        return config
    if isinstance(config, FP8Config):
        return config
    if target.int8_backend is None:
        raise ConfigError(f"the target device {target.device!r} runs FP8 (Gaudi has no int8 lowering in pt2q): "
                          f"use pt2q.FP8Config instead of {type(config).__name__}, or pick another backend")
    if hasattr(config, "backend") and config.backend != target.int8_backend:
        config = copy.deepcopy(config)
        config.backend = target.int8_backend
        for _, local in config.local_rules:
            if local is not None:
                local.backend = target.int8_backend
    elif getattr(config, "family", None) == "weight_only" and target.device == "xpu":
        raise ConfigError(f"{type(config).__name__}: pt2q's weight-only kernels are CPU kernels; the XPU target takes "
                          "StaticQuantConfig / DynamicQuantConfig (or backend='cpu' for weight-only)")
    return config


def lowering_for(qmodel, target: Target) -> str:
    """Which lowering takes `qmodel` on `target` (see the module docstring)."""
    from . import meta

    if meta.FP8 in getattr(qmodel, "meta", {}):
        return "habana"
    if target.lowering == "habana":
        raise ConfigError("the target device 'hpu' runs FP8 models and this model is not one: quantize with "
                          "pt2q.FP8Config (or backend='auto' on the Gaudi machine)")
    return target.lowering


def compile(qmodel, example_inputs: Any, backend: str = "auto", **options):
    """Lower a quantized model for `backend` ("auto" or a device name); `options` go to the lowering."""
    target = resolve(backend)
    lowering = lowering_for(qmodel, target)
    if lowering == "habana":
        from .backends import habana

        device = options.pop("device", None)
        if options:
            raise ConfigError(f"pt2q.compile: the Habana lowering takes no options {sorted(options)}")
        return habana.lower(qmodel, device=device)
    if lowering == "xpu":
        from .backends import xpu

        return xpu.compile(qmodel, example_inputs, **options)
    from .backends import inductor

    return inductor.compile(qmodel, example_inputs, **options)

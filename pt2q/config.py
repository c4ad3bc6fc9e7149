"""User-facing quantization configs and their `set_local` rules.

`StaticQuantConfig` (calibrated int8 activations) and `DynamicQuantConfig` (activation qparams computed
at run time). `set_local(target, config_or_None)` overrides the global choice: `target` is a regex on
module names (matched against every enclosing module's name, as in `named_modules()`), an
`nn.Module` subclass, or an ATen op; `None` keeps the matched nodes in fp32. Name rules beat type rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .isa import SATURATION_GUARDS
from .quantizers import QUANTIZERS
from .quantizers.base import ACTIVATION_OBSERVERS, QAT_RANGES, RuleQuantizer

BACKENDS = tuple(QUANTIZERS)

# Every string field and its valid values, and the boolean fields: what `validate` checks.
_CHOICES = {
    "backend": BACKENDS,
    "activation_observer": tuple(sorted(ACTIVATION_OBSERVERS)),
    "weight_granularity": ("per_channel", "per_tensor"),
    "saturation_guard": SATURATION_GUARDS,
    "qat_ranges": QAT_RANGES,
    "weight_dtype": ("int8", "float16"),
}
_FLAGS = ("mixed_bf16", "quantize_attention_matmul")


def _reject_unknown_fields(cls, kwargs: dict) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in kwargs:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cls.__name__} has no field {name!r}{hint}; valid fields: {', '.join(valid)}")


_RULE_TARGET_TYPES = (str, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket)


def _check_local_target(target) -> None:
    """A set_local target of the int8 and FP8 configs: a module-name regex, an nn.Module class or an ATen op."""
    if not isinstance(target, _RULE_TARGET_TYPES):
        raise ConfigError(f"set_local target must be a module-name regex, an nn.Module class or an ATen op; "
                          f"got {target!r}")
    _check_rule_target(target)


def _set_quantizer_rules(quantizer, local_rules, scheme_of) -> None:
    """Give `quantizer` the set_local rules: a regex by module name, a class or op by type."""
    for target, config in local_rules:
        scheme = None if config is None else scheme_of(config)
        if isinstance(target, str):
            quantizer.set_module_name(target, scheme)
        else:
            quantizer.set_op_type(target, scheme)


def _check_rule_target(target) -> None:
    """A set_local class must be an nn.Module subclass and a regex must compile (ConfigError otherwise)."""
    if isinstance(target, type) and not issubclass(target, torch.nn.Module):
        raise ConfigError(f"set_local target class {target.__name__} is not an nn.Module subclass")
    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error as error:
            raise ConfigError(f"set_local({target!r}): not a valid regex: {error}") from error


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
        _check_local_target(target)
        if config is not None:
            if not isinstance(config, _Config):
                raise ConfigError(f"set_local config must be a StaticQuantConfig, DynamicQuantConfig or None; "
                                  f"got {type(config).__name__}")
            if config.backend != self.backend:
                raise ConfigError(f"set_local({target!r}): backend {config.backend!r} differs from the global "
                                  f"backend {self.backend!r}")
        self.local_rules.append((target, config))
        return self

    @property
    def needs_calibration(self) -> bool:
        """Static activations anywhere in the model (the global config or a set_local one) need data."""
        return self.is_static or any(config is not None and config.is_static for _, config in self.local_rules)

    def to_quantizer(self, qat: bool = False) -> RuleQuantizer:
        """The quantizer of this config; `qat`: its fake-quant (training) schemes, for prepare_qat."""
        self.validate()
        for target, config in self.local_rules:
            if config is not None:
                config.validate()
                if config.backend != self.backend:
                    raise ConfigError(f"set_local({target!r}): backend {config.backend!r} differs from the global "
                                      f"backend {self.backend!r}")
        quantizer_cls = QUANTIZERS[self.backend]
        quantizer = quantizer_cls(quantize_attention_matmul=self.quantize_attention_matmul)
        quantizer.set_global(self.scheme(quantizer_cls, qat))
        _set_quantizer_rules(quantizer, self.local_rules, lambda config: config.scheme(quantizer_cls, qat))
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
    qat_ranges: for `pt2q.prepare_qat` only: "ema" (default: activation ranges follow a moving average
        of the training batches) or "learnable" (scale and zero point trained by backpropagation, LSQ).
    """

    backend: str = "x86"
    activation_observer: str = "histogram"
    weight_granularity: str = "per_channel"
    mixed_bf16: bool = False
    quantize_attention_matmul: bool = False
    smooth_quant: Any = None
    saturation_guard: str = "auto"
    qat_ranges: str = "ema"
    local_rules: list = field(default_factory=list, repr=False, init=False)  # filled by set_local()

    def __post_init__(self):
        self.validate()

    is_dynamic = False
    is_static = True

    def scheme(self, quantizer_cls, qat: bool = False):
        per_channel = self.weight_granularity == "per_channel"
        if qat:
            return quantizer_cls.qat_scheme(per_channel=per_channel, ranges=self.qat_ranges,
                                            saturation_guard=self.saturation_guard)
        return quantizer_cls.static_scheme(observer=self.activation_observer, per_channel=per_channel,
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

    is_static = False


@dataclass(init=True)
class DynamicQuantConfig(_UncalibratedConfig):
    """Dynamic int8: int8 weights, activation qparams computed per call (no calibration data needed).
    `saturation_guard` as in StaticQuantConfig.
    weight_dtype: "int8" (default) or "float16": fp16 weights and fp32 activations for linear layers
        (Inductor's linear_dynamic_fp16 kernel; convs stay fp32), half the weight memory, no int8 error.
    """

    saturation_guard: str = "auto"
    weight_dtype: str = "int8"
    is_dynamic = True

    def scheme(self, quantizer_cls, qat: bool = False):
        per_channel = self.weight_granularity == "per_channel"
        if self.weight_dtype == "float16":
            return quantizer_cls.float16_weight_scheme()  # nothing to train: the same for QAT
        if qat:
            return quantizer_cls.qat_scheme(dynamic=True, per_channel=per_channel,
                                            saturation_guard=self.saturation_guard)
        return quantizer_cls.dynamic_scheme(per_channel=per_channel, saturation_guard=self.saturation_guard)


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


_WEIGHT_DTYPES = ("int", "nf4", "fp4")


class _WeightOnlyConfig:
    """Weight-only quantization: linear weights stored as packed low-bit integers with per-group scales
    (pt2q.ops), activations stay float. Fields shared by every weight-only algorithm:

    bits: 2..8. group_size: input columns per scale (-1: one scale per output channel); a last, shorter
        group is zero padded. sym: symmetric (zero point 2**(bits-1)) or asymmetric (a zero point per group).
    dtype: "int", or the 4-bit code tables "nf4" / "fp4" (E2M1), both symmetric.
    group_dim: 1 (groups along the input dimension, the usual layout) or 0 (along the output dimension).

    `set_local(regex | nn.Module class, config | None)` gives layers another weight-only config (e.g. 8
    bits for `down_proj`) or keeps them float (None). An LM head (a linear named `lm_head` / `embed_out`,
    or one whose weight is tied to an embedding) stays float unless a rule names it.
    """

    is_dynamic = False
    family = "weight_only"
    algorithm = "rtn"       # the key of pt2q.weight_only.LAYER_ALGORITHMS / BLOCK_ALGORITHMS
    sequential = False      # calibrated block by block (GPTQ, AWQ) rather than not at all (RTN)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        name = type(self).__name__
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"{name}.bits={self.bits!r} is not valid; valid: an integer from 2 to 8")
        if self.dtype not in _WEIGHT_DTYPES:
            raise ConfigError(f"{name}.dtype={self.dtype!r} is not valid; valid: {', '.join(map(repr, _WEIGHT_DTYPES))}")
        if self.dtype != "int" and (self.bits != 4 or not self.sym):
            raise ConfigError(f"{name}.dtype={self.dtype!r} is a symmetric 4-bit code table: use bits=4, sym=True "
                              f"(got bits={self.bits}, sym={self.sym})")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or \
                not (self.group_size == -1 or self.group_size >= 1):
            raise ConfigError(f"{name}.group_size={self.group_size!r} is not valid; valid: -1 (per output channel) "
                              "or a positive number of input columns, e.g. 32 or 128")
        if self.group_dim not in (0, 1) or isinstance(self.group_dim, bool):
            raise ConfigError(f"{name}.group_dim={self.group_dim!r} is not valid; valid: 1 (input dim) or 0 (output dim)")
        for flag in ("sym", *self._flags):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{name}.{flag} must be True or False, got {getattr(self, flag)!r}")
        for field_name, (low, high, what) in self._ranges.items():
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
                raise ConfigError(f"{name}.{field_name}={value!r} is not valid; valid: {what}")

    _flags: tuple = ()
    _ranges: dict = {}

    @property
    def needs_calibration(self) -> bool:
        return self.sequential

    def weight_format(self):
        from .algorithms.rtn import WeightFormat

        return WeightFormat(bits=self.bits, group_size=self.group_size, sym=self.sym, dtype=self.dtype,
                            full_range=getattr(self, "full_range", False), group_dim=self.group_dim)

    def set_local(self, target: Any, config: "_WeightOnlyConfig | None"):
        """Another weight-only config (or None: keep float) for a module-name regex or nn.Module class."""
        if not isinstance(target, (str, type)):
            raise ConfigError(f"set_local target must be a module-name regex or an nn.Module class; got {target!r}")
        _check_rule_target(target)
        if config is not None and not isinstance(config, _WeightOnlyConfig):
            names = ", ".join(cls.__name__ for cls in CONFIG_KINDS.values() if getattr(cls, "family", "") == "weight_only")
            raise ConfigError(f"set_local({target!r}): a weight-only config takes {names} or None per layer; "
                              f"got {type(config).__name__}")
        self.local_rules.append((target, config))
        return self


@dataclass(kw_only=True)
class RTNConfig(_WeightOnlyConfig):
    """Round to nearest, no calibration data. quantile: clip factor on each group's range (1.0: none).
    mse_clip: per group, the clip factor in 1 - i/200 (i < 40) with the least squared error.
    full_range: symmetric int uses code -2**(bits-1) too (the group's largest magnitude maps to it)."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True
    dtype: str = "int"
    full_range: bool = False
    quantile: float = 1.0
    mse_clip: bool = False
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    _flags = ("full_range", "mse_clip")
    _ranges = {"quantile": (1e-3, 1.0, "a clip factor in (0, 1]")}


@dataclass(kw_only=True)
class WeightOnlyQuantConfig(RTNConfig):
    """int8 weights, one scale per output channel: RTNConfig with bits=8, group_size=-1 as defaults
    (the historical name; the same code path)."""

    bits: int = 8
    group_size: int = -1


@dataclass(kw_only=True)
class HQQConfig(_WeightOnlyConfig):
    """HQQ, no calibration data: per group, the scale and the float zero point that fit the weight best,
    found by a half-quadratic solver of `sum |w - w'|^lp_norm` (pt2q.algorithms.hqq, with its figures on
    MiniLM: less error than RTN at 3 and 4 bits). Zero points are stored as float32 in the graph.

    group_size: 64 by default, HQQ's own default: float32 scale and zero cost 1 bit per weight at g64 (2 at
        g32), and both CPU kernel families take it. On MiniLM at 4 bits g32 has 28% less squared error
        than g64 (0.00554 / 0.00766) for 1 more bit per weight.
    sym: must be False: HQQ's output is the zero point (use RTNConfig for symmetric weights).
    iters: solver steps per group (0: min/max round to nearest with a float zero point).
    lp_norm: the loss exponent p in (0, 1]. beta: the splitting weight, > 0; kappa: its growth per step,
        >= 1 (the threshold |r|^(p-1) / beta shrinks as beta grows).
    early_stop: a group stops at its first step without less squared error (False: all iters steps).
    fit_scale: refit the scale with the zero point each step (False: the zero point alone, the scale kept
        at its min/max start, HQQ's published step; more error, same as the hqq package).
    """

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True
    fit_scale: bool = True
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    algorithm = "hqq"
    dtype = "int"       # HQQ fits integer codes with an affine (scale, zero point) per group: no code tables
    _flags = ("early_stop", "fit_scale")
    _ranges = {"iters": (0, 100_000, "a number of solver steps >= 0"),
               "lp_norm": (0.0, 1.0, "a norm exponent in (0, 1]"),
               "beta": (0.0, math.inf, "a positive number"),
               "kappa": (1.0, math.inf, "a growth factor >= 1 (1: beta stays constant)")}

    def validate(self) -> None:
        if self.sym is not False:
            raise ConfigError(f"HQQConfig.sym={self.sym!r} is not valid; valid: False (HQQ fits a zero point per "
                              "group; for symmetric weights use RTNConfig(sym=True))")
        if self.dtype != "int":
            raise ConfigError(f"HQQConfig.dtype={self.dtype!r} is not valid; valid: 'int' (HQQ fits integer codes, "
                              "not the nf4 / fp4 tables: use RTNConfig(dtype=...) for those)")
        super().validate()
        if isinstance(self.iters, bool) or not isinstance(self.iters, int):
            raise ConfigError(f"HQQConfig.iters={self.iters!r} is not valid; valid: an integer >= 0")
        for name in ("lp_norm", "beta"):  # the ranges above are inclusive; these exclude their lower end
            value = getattr(self, name)
            if value == 0 or not math.isfinite(value):
                raise ConfigError(f"HQQConfig.{name}={value!r} is not valid; valid: {self._ranges[name][2]}")
        if not math.isfinite(self.kappa):
            raise ConfigError(f"HQQConfig.kappa={self.kappa!r} is not valid; valid: {self._ranges['kappa'][2]}")


@dataclass(kw_only=True)
class GPTQConfig(_WeightOnlyConfig):
    """GPTQ: columns quantized left to right, each one's error spread over the columns not yet quantized
    through the inverse Hessian of the layer's inputs (`H = 2/n sum x x^T`), transformer block by block.

    block_size: columns per lazy-update block. percdamp: damping, a fraction of mean(diag H).
    act_order: quantize columns by descending diag(H) (groups then stay in the stored column order, fixed
        from the unquantized weight as with static_groups: the graph form has no per-column group index).
    static_groups: group scales from the unquantized weight, before any error propagation.
    true_sequential: within a block, layers fed by the outputs of already quantized layers are calibrated
        after them (q/k/v, then o, then gate/up, then down in a LLaMA block).
    mse_clip: each group's range is the clip factor 1 - i/200 (i < 40) with the least squared error of the
        group's values at the moment GPTQ reaches it, instead of the full range. On by default: on real
        all-MiniLM-L6-v2 at 4 bits, groups of 32, it raised the mean / min cosine to fp32 on the
        calibration sentences from 0.9881 / 0.9789 to 0.9909 / 0.9860 (symmetric) and 0.9920 / 0.9854 to
        0.9925 / 0.9869 (asymmetric), for about 7% more quantize time. mse_clip=False: the full range.
    n_samples: calibration batches used (the first n of calib_data).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    mse_clip: bool = True
    n_samples: int = 128
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    algorithm = "gptq"
    sequential = True
    _flags = ("act_order", "static_groups", "true_sequential", "mse_clip")
    _ranges = {"percdamp": (0.0, 1.0, "a fraction in [0, 1]"), "block_size": (1, 1 << 20, "a positive integer"),
               "n_samples": (1, 1 << 30, "a positive number of batches")}

    def validate(self) -> None:
        super().validate()
        if self.group_dim != 1:
            raise ConfigError("GPTQConfig.group_dim must be 1: GPTQ propagates errors along the input dimension")
        for name in ("block_size", "n_samples"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTQConfig.{name} must be an integer, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class AWQConfig(_WeightOnlyConfig):
    """AWQ: per group of layers sharing an input, scales `s = mean|x|^r / mean|W|^(1-r)` searched over r
    (and s = 1) for the least output error after quantization, folded into the producer (auto_scale);
    then per-layer clipping of each group's range searched over 1 - i/100, i < 10 (auto_clip).
    Block by block, like GPTQ. n_samples: calibration batches used."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"
    auto_scale: bool = True
    auto_clip: bool = True
    n_samples: int = 128
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    algorithm = "awq"
    sequential = True
    _flags = ("auto_scale", "auto_clip")
    _ranges = {"n_samples": (1, 1 << 30, "a positive number of batches")}


@dataclass(kw_only=True)
class AutoRoundConfig(_WeightOnlyConfig):
    """AutoRound (SignRound): per transformer block, a rounding offset in [-0.5, 0.5] per weight and range
    factors in [0, 1] per group, trained to minimise the block's output MSE against the float block
    (pt2q.algorithms.autoround), then stored in the packed graph form like RTN's. iters=0 is exactly RTN.

    iters: training steps per block (200). lr: learning rate of the rounding offsets (None: 1/iters);
        minmax_lr: of the range factors (None: lr). Both decay linearly to 0 over the steps.
    optimizer: "sign_sgd" (p -= lr * sign(grad), the paper's), "adam" or "adamw".
    n_samples: calibration batches used (None: all given; more than given is an error). A sample is one
        calibration batch as given: its rows are trained on together.
    batch_size: samples per step; gradient_accumulate_steps: steps whose gradients add up before each
        update. sampler: "rand" (random samples each step, from `seed`) or "fix" (in order, cycling).
    seqlen: cut each 2-D calibration input (token ids, masks) to this many positions (None: as given);
        needs a capture with a dynamic sequence dimension (dynamic_shapes="batch_seq"). With such a
        capture, each batch is also cut after its longest row's last unmasked position (`attention_mask`):
        the loss leaves padding out and masked keys never reach real positions, so only the compute on
        padding goes (the share of positions kept is in the report's findings).
    enable_minmax_tuning: train the range factors (False: offsets only). use_quant_input: feed each block
        the outputs of the quantized blocks before it (True) or of the float ones (False); the targets are
        always the float model's. not_use_mse: keep the last iterate instead of the lowest-loss one.
    dynamic_max_gap: stop a block early after this many steps without a better loss (-1: never).
    n_blocks: consecutive blocks trained together as one unit. low_mem: keep AutoRound's cached float
        inputs and targets in a temporary directory instead of RAM. amp: run the block in bf16 autocast
        (the loss in fp32). seed: the sampler's seed; a fixed seed gives the same weights.
    full_range: symmetric codes use -2**(bits-1) too (as RTNConfig.full_range, whose default is False). On
        by default here, as in the field: on real all-MiniLM-L6-v2, W4 g32 sym, 50 iterations, it raised the
        mean / min cosine to fp32 from 0.98667 / 0.97356 to 0.98829 / 0.97817. iters=0 equals
        RTNConfig(full_range=True) bit for bit, and RTNConfig() with full_range=False.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"
    full_range: bool = True
    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    optimizer: str = "sign_sgd"
    n_samples: int | None = None
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    sampler: str = "rand"
    seqlen: int | None = None
    enable_minmax_tuning: bool = True
    use_quant_input: bool = True
    not_use_mse: bool = False
    dynamic_max_gap: int = -1
    n_blocks: int = 1
    low_mem: bool = False
    amp: bool = False
    seed: int = 42
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    algorithm = "autoround"
    sequential = True
    _flags = ("full_range", "enable_minmax_tuning", "use_quant_input", "not_use_mse", "low_mem", "amp")

    def validate(self) -> None:
        from .algorithms.autoround import OPTIMIZERS, SAMPLERS

        super().validate()
        name = type(self).__name__
        if self.dtype != "int":
            raise ConfigError(f"{name}.dtype={self.dtype!r}: AutoRound trains integer codes; use dtype='int'")

        def integer(field_name: str, low: int, what: str, optional: bool = False) -> None:
            value = getattr(self, field_name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}.{field_name}={value!r} is not valid; valid: {what}")

        integer("iters", 0, "an integer >= 0 (0: round to nearest)")
        integer("batch_size", 1, "a positive number of samples per step")
        integer("gradient_accumulate_steps", 1, "a positive integer")
        integer("n_blocks", 1, "a positive number of blocks trained together")
        integer("seed", 0, "an integer >= 0")
        integer("n_samples", 1, "None (all calibration batches) or a positive number of batches", optional=True)
        integer("seqlen", 1, "None (as given) or a positive number of positions", optional=True)
        if isinstance(self.dynamic_max_gap, bool) or not isinstance(self.dynamic_max_gap, int) or \
                not (self.dynamic_max_gap == -1 or self.dynamic_max_gap >= 1):
            raise ConfigError(f"{name}.dynamic_max_gap={self.dynamic_max_gap!r} is not valid; valid: -1 (never stop "
                              "early) or a positive number of steps")
        for field_name in ("lr", "minmax_lr"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name}.{field_name}={value!r} is not valid; valid: None (1/iters) or a "
                                  "learning rate > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{name}.optimizer={self.optimizer!r} is not valid; valid: {', '.join(map(repr, OPTIMIZERS))}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{name}.sampler={self.sampler!r} is not valid; valid: {', '.join(map(repr, SAMPLERS))}")

    def tune_settings(self):
        from .algorithms.autoround import TuneSettings

        return TuneSettings(iters=self.iters, lr=self.lr, minmax_lr=self.minmax_lr, batch_size=self.batch_size,
                            gradient_accumulate_steps=self.gradient_accumulate_steps, sampler=self.sampler,
                            seed=self.seed, not_use_mse=self.not_use_mse, dynamic_max_gap=self.dynamic_max_gap,
                            optimizer=self.optimizer)


@dataclass(kw_only=True)
class TEQConfig(_WeightOnlyConfig):
    """TEQ (trainable equivalent transformation): per group of layers sharing an input (q/k/v after a norm,
    gate/up, ...), one scale per input channel, starting at 1 and trained with Adam so that the block with
    weights Q(W s) and inputs x / s comes closer to the float block (the mean squared error of the block's
    outputs; all groups of a block trained together). The scales are then folded like AWQ's (1/s into the
    producer, or an explicit `mul` where none can take it; s into the weights' input columns) and the
    weights rounded to nearest. A block whose trained scales do not lower its loss on the calibration
    batches keeps s = 1 (plain RTN). Block by block, like GPTQ (pt2q.algorithms.teq).

    steps: training steps per block, one calibration batch each (shuffled passes over the batches).
    lr: Adam's learning rate. On real all-MiniLM-L6-v2 at 4 bits, groups of 32, 16 calibration batches of
        8 x 128 tokens, 200 steps: mean cosine to fp32 on held-out sentences 0.9708 / 0.9745 / 0.9762 /
        0.9754 for lr 1e-3 / 5e-3 / 1e-2 / 2e-2 (RTN 0.9586); 100 steps at 1e-2: 0.9750 in half the time.
    n_samples: calibration batches used (the first n of calib_data).
    seed: the order of the batches in training; a fixed seed gives the same weights.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    dtype: str = "int"
    steps: int = 200
    lr: float = 1e-2
    n_samples: int = 128
    seed: int = 0
    group_dim: int = 1
    local_rules: list = field(default_factory=list, repr=False, init=False)

    algorithm = "teq"
    sequential = True
    _ranges = {"steps": (1, 1 << 20, "a positive number of training steps per block"),
               "n_samples": (1, 1 << 30, "a positive number of batches")}

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.group_dim != 1:
            raise ConfigError(f"{name}.group_dim must be 1: a scale folded into a producer's output rows leaves the "
                              "rounding unchanged only when the groups lie along the input dimension")
        for field_name in ("steps", "n_samples"):
            if not isinstance(getattr(self, field_name), int):
                raise ConfigError(f"{name}.{field_name} must be an integer, got {getattr(self, field_name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"{name}.seed={self.seed!r} is not valid; valid: an integer >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not 0 < self.lr <= 1:
            raise ConfigError(f"{name}.lr={self.lr!r} is not valid; valid: a learning rate in (0, 1], e.g. 1e-3")


@dataclass(kw_only=True)
class FP8Config:
    """FP8 quantization of linear layers (and, opt-in, attention matmuls) for Gaudi: activations and
    weights cast to float8, computed by the Habana lowering's fp8 GEMM (pt2q.backends.habana).

    dtype: "e4m3" (torch.float8_e4m3fn, default) or "e5m2" (torch.float8_e5m2); the torch dtypes work too.
    device: "gaudi2" (E4M3 saturates at 240), "gaudi3" (448) or "generic" (the format's own maximum).
    scale_method: "maxabs_hw" (default: max |x| scale rounded up to the device's hardware-aligned scales),
        "maxabs_pow2" (rounded up to a power of two), "maxabs" (exact) or "unit" (scale 1). See pt2q.fp8.
    weight_granularity: "per_channel" (default, a scale per output channel) or "per_tensor".
    activation: "static" (scales from calibration, or from a measurement file) or "dynamic" (a per-tensor
        scale computed at every call; no calibration data).
    weight_backoff / activation_backoff: the share of the full scale the calibrated maximum may use
        (0.5 / 0.25: headroom for values beyond the calibrated range).
    quantize_attention_matmul: also quantize activation x activation matmuls.
    from_measurement: a file written by `pt2q.measure`: quantize from its statistics alone, without
        calibration data (scales are recomputed from its max |x| with this config's method and device).

    `set_local(regex | nn.Module class | ATen op, FP8Config | None)` sets individual layers (None: float).
    """

    dtype: Any = "e4m3"
    device: str = "gaudi2"
    scale_method: str = "maxabs_hw"
    weight_granularity: str = "per_channel"
    activation: str = "static"
    weight_backoff: float = 0.5
    activation_backoff: float = 0.25
    quantize_attention_matmul: bool = False
    from_measurement: Any = None
    local_rules: list = field(default_factory=list, repr=False, init=False)

    is_dynamic = False
    family = "fp8"
    algorithm = "fp8"

    def __post_init__(self):
        self.validate()

    @property
    def needs_calibration(self) -> bool:
        return self.activation == "static" and self.from_measurement is None

    @property
    def torch_dtype(self) -> torch.dtype:
        from .fp8 import fp8_dtype

        return fp8_dtype(self.dtype, f"{type(self).__name__}.dtype")

    def validate(self) -> None:
        from . import fp8

        name = type(self).__name__
        self.torch_dtype  # noqa: B018 - raises ConfigError listing the formats
        for field_name, choices in (("device", fp8.DEVICES), ("scale_method", fp8.SCALE_METHODS),
                                    ("weight_granularity", ("per_channel", "per_tensor")),
                                    ("activation", ("static", "dynamic"))):
            value = getattr(self, field_name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"{name}.{field_name}={value!r} is not valid; valid: {', '.join(map(repr, choices))}")
        for field_name in ("weight_backoff", "activation_backoff"):
            fp8.check_backoff(getattr(self, field_name), f"{name}.{field_name}")
        if not isinstance(self.quantize_attention_matmul, bool):
            raise ConfigError(f"{name}.quantize_attention_matmul must be True or False, got "
                              f"{self.quantize_attention_matmul!r}")
        if self.from_measurement is not None and not isinstance(self.from_measurement, (str, os.PathLike)):
            raise ConfigError(f"{name}.from_measurement must be the path of a file pt2q.measure wrote, got "
                              f"{type(self.from_measurement).__name__}")
        if self.scale_method == "maxabs_hw":
            fp8.hardware_scales(self.torch_dtype, self.device)

    def scheme(self):
        from .quantizers.fp8 import fp8_scheme

        return fp8_scheme(self.torch_dtype, self.device, scale_method=self.scale_method,
                          per_channel=self.weight_granularity == "per_channel",
                          dynamic=self.activation == "dynamic", weight_backoff=self.weight_backoff,
                          activation_backoff=self.activation_backoff)

    def set_local(self, target: Any, config: "FP8Config | None"):
        """Another FP8Config (same device) or None (keep float) for a module-name regex, an nn.Module
        class or an ATen op. Returns self."""
        _check_local_target(target)
        if config is not None:
            if not isinstance(config, FP8Config):
                raise ConfigError(f"set_local({target!r}): an FP8Config takes another FP8Config or None per layer; "
                                  f"got {type(config).__name__}")
            self._check_local(target, config)
        self.local_rules.append((target, config))
        return self

    def _check_local(self, target, config: "FP8Config") -> None:
        if config.device != self.device:
            raise ConfigError(f"set_local({target!r}): device {config.device!r} differs from the global device "
                              f"{self.device!r}: one model is lowered for one device")
        if config.activation != self.activation:
            raise ConfigError(f"set_local({target!r}): activation={config.activation!r} differs from the global "
                              f"{self.activation!r}; mixing static and dynamic FP8 activations is not supported")

    def to_quantizer(self):
        from .quantizers.fp8 import FP8Quantizer

        self.validate()
        quantizer = FP8Quantizer(quantize_attention_matmul=self.quantize_attention_matmul)
        quantizer.set_global(self.scheme())
        for target, config in self.local_rules:
            if config is not None:
                config.validate()
                self._check_local(target, config)
        _set_quantizer_rules(quantizer, self.local_rules, lambda config: config.scheme())
        return quantizer


StaticQuantConfig = with_field_check(StaticQuantConfig)
DynamicQuantConfig = with_field_check(DynamicQuantConfig)
RTNConfig = with_field_check(RTNConfig)
WeightOnlyQuantConfig = with_field_check(WeightOnlyQuantConfig)
HQQConfig = with_field_check(HQQConfig)
GPTQConfig = with_field_check(GPTQConfig)
AWQConfig = with_field_check(AWQConfig)
AutoRoundConfig = with_field_check(AutoRoundConfig)
TEQConfig = with_field_check(TEQConfig)
FP8Config = with_field_check(FP8Config)

# The registry of quantization configs: kind (the compile backend's `mode`) -> class. save/load, the
# compile backend, the CLI and prepare() look configs up here.
CONFIG_KINDS: dict[str, type] = {
    "static": StaticQuantConfig,
    "dynamic": DynamicQuantConfig,
    "weight_only": WeightOnlyQuantConfig,  # RTNConfig with int8 per-channel defaults
    "rtn": RTNConfig,
    "hqq": HQQConfig,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "autoround": AutoRoundConfig,
    "teq": TEQConfig,
    "fp8": FP8Config,
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
                if not isinstance(key, _RULE_TARGET_TYPES):
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

_FALLBACK_AFTER = ("each_config", "all_configs")


@dataclass(kw_only=True)
class TuningConfig:
    """What `pt2q.autotune` searches, what passes, and when it stops. Not a quantization config (it is not
    in CONFIG_KINDS): it lists them.

    config_set: the quantization configs to try, in order (StaticQuantConfig, RTNConfig, ... with their
        set_local rules). autotune quantizes with copies; these objects are never changed.
    tolerable_loss: the largest relative loss of the eval_fn score against the fp32 model's that passes:
        (fp32 - score) / |fp32| when higher_is_better, (score - fp32) / |fp32| otherwise (0.01: 1 %).
    higher_is_better: True for accuracy or cosine similarity, False for perplexity or a loss.
    max_trials: the most quantization trials (the fp32 evaluation is not one); None: no limit.
    timeout_s: wall-clock budget in seconds, counted from the start of autotune; once it is spent no new
        trial starts (a trial already running finishes). None: no limit.
    fallback_layers: after a config fails, each fallback trial quantizes it again with its k most damaged
        layers kept float, for each k here in order. The layers are ranked by the dump tool's per-node
        SQNR against fp32 on the example inputs (pt2q.debug, lowest first). A k that would keep every
        quantized layer float is skipped. None: k = 1, 2, 4, ... below the config's number of quantized
        layers. (): no fallback.
    fallback_after: "each_config" (config 1, its fallbacks, config 2, its fallbacks, ...) or "all_configs"
        (every config as given first, then the fallbacks of each, the best-scoring config first).
    """

    config_set: list
    tolerable_loss: float = 0.01
    higher_is_better: bool = True
    max_trials: int | None = 100
    timeout_s: float | None = None
    fallback_layers: tuple | None = None
    fallback_after: str = "each_config"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (at construction and again when autotune starts). Raises ConfigError naming
        the field and what it accepts."""
        quantization_configs = tuple(CONFIG_KINDS.values())
        names = ", ".join(cls.__name__ for cls in quantization_configs)
        if not isinstance(self.config_set, (list, tuple)) or not self.config_set:
            raise ConfigError(f"TuningConfig.config_set must be a non-empty list of pt2q quantization configs "
                              f"({names}); got {self.config_set!r}")
        for index, config in enumerate(self.config_set):
            if not isinstance(config, quantization_configs):
                hint = " (give it as StaticQuantConfig(smooth_quant=...))" if isinstance(config, SmoothQuantConfig) else ""
                raise ConfigError(f"TuningConfig.config_set[{index}] is a {type(config).__name__}, not a pt2q "
                                  f"quantization config{hint}; valid: {names}")
            config.validate()
        loss = self.tolerable_loss
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real) or not math.isfinite(loss) or loss < 0:
            raise ConfigError(f"TuningConfig.tolerable_loss={loss!r} is not valid; valid: a relative loss >= 0, "
                              "e.g. 0.01 for 1 %")
        if not isinstance(self.higher_is_better, bool):
            raise ConfigError(f"TuningConfig.higher_is_better must be True or False, got {self.higher_is_better!r}")
        trials = self.max_trials
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            raise ConfigError(f"TuningConfig.max_trials={trials!r} is not valid; valid: an integer >= 1, or None "
                              "(no limit)")
        timeout = self.timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(f"TuningConfig.timeout_s={timeout!r} is not valid; valid: seconds > 0, or None "
                              "(no limit)")
        sizes = self.fallback_layers
        if sizes is not None:
            if not isinstance(sizes, (list, tuple)) or any(
                    isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes) \
                    or any(a >= b for a, b in zip(sizes, sizes[1:])):
                raise ConfigError(f"TuningConfig.fallback_layers={sizes!r} is not valid; valid: increasing layer "
                                  "counts >= 1 such as (1, 2, 4), () for no fallback, or None (1, 2, 4, ...)")
        if self.fallback_after not in _FALLBACK_AFTER:
            raise ConfigError(f"TuningConfig.fallback_after={self.fallback_after!r} is not valid; valid: "
                              f"{', '.join(map(repr, _FALLBACK_AFTER))}")


TuningConfig = with_field_check(TuningConfig)

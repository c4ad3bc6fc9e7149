"""FP8 numerics shared by the FP8 quantizer, the measurement file and the Habana lowering.

Formats. `E4M3` is `torch.float8_e4m3fn` (4 exponent bits, bias 7, 3 mantissa bits) and `E5M2` is
`torch.float8_e5m2` (bias 15). A device saturates at its *full scale*: Gaudi2's E4M3 stops at 240
(the bias-7 grid without its top binade: every value up to 240 is a float8_e4m3fn value, so emulation
clamps to 240 and casts), Gaudi3's at 448 (= float8_e4m3fn's max); E5M2 stops at 57344 on both.
"generic" is the format's own maximum.

Scales. A scale `s` is the dequantize multiplier: `x ~= fp8 * s`, and quantizing computes
`fp8 = cast_rne(clamp(x * (1 / s), -full_scale, full_scale))` — a multiply by the reciprocal, the form
Gaudi's `cast_to_fp8_v2(x, scale_inv)` takes, so the portable Q/DQ graph and the lowered one round alike.
Scale methods, from a tensor's max |x| (`amax`, per tensor or per output channel):

    unit         s = 1
    maxabs       s = amax / (full_scale * backoff)
    maxabs_pow2  s = 2 ** ceil(log2(maxabs s))
    maxabs_hw    the smallest hardware-aligned scale >= the maxabs s (the largest one when none is):
                 Gaudi2 E4M3 {16, 1, 1/16, 1/256} (its exponent biases 3, 7, 11, 15), Gaudi2 E5M2 {1};
                 Gaudi3 any 2 ** (default_bias - b), b in [0, 63)

`backoff` (< 1) leaves headroom above the calibrated maximum: 0.5 for weights and 0.25 for
activations by default, the values in use on Gaudi.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DEVICES = ("gaudi2", "gaudi3", "generic")
SCALE_METHODS = ("unit", "maxabs", "maxabs_pow2", "maxabs_hw")
_EXPONENT_BIAS = {torch.float8_e4m3fn: 7, torch.float8_e5m2: 15}
_GAUDI2_E4M3_FULL_SCALE = 240.0
_GAUDI2_EXPONENT_BIASES = {torch.float8_e4m3fn: (3, 7, 11, 15), torch.float8_e5m2: (15,)}
_GAUDI3_EXPONENT_BIASES = range(0, 63)
# Smallest amax a scale is computed from: an all-zero tensor still gets a finite, nonzero scale.
AMAX_FLOOR = 2.0 ** -30


def fp8_dtype(name_or_dtype, where: str = "dtype") -> torch.dtype:
    """torch.float8_e4m3fn / torch.float8_e5m2 from "e4m3" / "e5m2" (any case) or the dtype itself."""
    if isinstance(name_or_dtype, torch.dtype) and name_or_dtype in FP8_DTYPES.values():
        return name_or_dtype
    if isinstance(name_or_dtype, str) and name_or_dtype.lower() in FP8_DTYPES:
        return FP8_DTYPES[name_or_dtype.lower()]
    raise ConfigError(f"{where}={name_or_dtype!r} is not an FP8 format; valid: 'e4m3' (torch.float8_e4m3fn), "
                      "'e5m2' (torch.float8_e5m2)")


def format_name(dtype: torch.dtype) -> str:
    return next(name for name, value in FP8_DTYPES.items() if value is dtype)


def full_scale(dtype: torch.dtype, device: str) -> float:
    """The largest magnitude `device` represents in `dtype` (values beyond it saturate)."""
    if device not in DEVICES:
        raise ConfigError(f"FP8 device={device!r} is not valid; valid: {', '.join(map(repr, DEVICES))}")
    if device == "gaudi2" and dtype is torch.float8_e4m3fn:
        return _GAUDI2_E4M3_FULL_SCALE
    return float(torch.finfo(dtype).max)


def hardware_scales(dtype: torch.dtype, device: str) -> torch.Tensor:
    """The hardware-aligned scales of `device` for `dtype`, ascending (float32)."""
    if device == "gaudi2":
        biases = _GAUDI2_EXPONENT_BIASES[dtype]
    elif device == "gaudi3":
        biases = _GAUDI3_EXPONENT_BIASES
    else:
        raise ConfigError("FP8 scale_method='maxabs_hw' needs device='gaudi2' or 'gaudi3' (hardware-aligned "
                          f"scales are a Gaudi property); got device={device!r}: use 'maxabs_pow2' instead")
    default = _EXPONENT_BIAS[dtype]
    return torch.tensor(sorted(2.0 ** (default - bias) for bias in biases), dtype=torch.float32)


def compute_scale(amax: torch.Tensor, method: str, dtype: torch.dtype, device: str, backoff: float) -> torch.Tensor:
    """The scale of each entry of `amax` (float32, same shape) under `method` (see the module docstring)."""
    if method not in SCALE_METHODS:
        raise ConfigError(f"FP8 scale_method={method!r} is not valid; valid: {', '.join(map(repr, SCALE_METHODS))}")
    amax = amax.detach().to(torch.float32)
    if method == "unit":
        return torch.ones_like(amax)
    scale = amax.clamp(min=AMAX_FLOOR) / (full_scale(dtype, device) * backoff)
    if method == "maxabs":
        return scale
    if method == "maxabs_pow2":
        return torch.exp2(torch.ceil(torch.log2(scale)))
    aligned = hardware_scales(dtype, device)
    index = torch.searchsorted(aligned, scale.reshape(-1), right=False).clamp(max=aligned.numel() - 1)
    return aligned[index].reshape(scale.shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, saturation: float) -> torch.Tensor:
    """`cast_rne(clamp(x * (1 / scale), -saturation, saturation))` as `dtype`: the one FP8 cast of pt2q."""
    scaled = x.to(torch.float32) * torch.reciprocal(scale.to(torch.float32))
    return scaled.clamp(-saturation, saturation).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x.to(torch.float32) * scale.to(torch.float32)).to(out_dtype)


def dynamic_scale(x: torch.Tensor, saturation: float) -> torch.Tensor:
    """The per-tensor maxabs scale of `x` at run time (no backoff: the range is the call's own)."""
    return (x.detach().abs().amax().to(torch.float32).clamp(min=AMAX_FLOOR) / saturation).reshape(())


def check_backoff(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0 \
            or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r} is not valid; valid: a fraction in (0, 1] (the share of the "
                          "full scale the calibrated maximum may use)")
    return float(value)

"""Gaudi's FP8 ops with their HPU signatures, as CPU reference kernels in pt2q's own namespaces.

On a Habana build these three ops live in `torch.ops.hpu`:

    cast_to_fp8_v2(Tensor input, Tensor? scale=None, bool stochastic_rounding=False, bool is_amax=False,
                   ScalarType dtype=None, int[]? scale_shape=None) -> (Tensor, Tensor)
    cast_from_fp8(Tensor input, Tensor? scale, ScalarType out_dtype, int[]? scale_shape=None) -> Tensor
    fp8_gemm_v2(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D, ScalarType out_dtype,
                Tensor? A_scale_inv=None, Tensor? B_scale_inv=None, Tensor? bias=None, bool accumulate=False,
                int[]? B_scale_shape=None) -> Tensor

Here they are defined again, with the same names, schemas and defaults, once per device:
`torch.ops.pt2q_gaudi2.<op>` and `torch.ops.pt2q_gaudi3.<op>`. The device is in the namespace because the
cast saturates at the device's E4M3 full scale (240 on Gaudi2, 448 on Gaudi3; E5M2 57344 on both) and
the HPU signature has no argument for it: a graph that calls `pt2q_gaudi2::cast_to_fp8_v2` says by its
op names alone which card it computes like, also after `torch.export.save` / `load`. Each op has a CPU
kernel and a fake kernel (shapes and dtypes only), so lowered graphs run, export and save on any machine.

What the kernels compute (pt2q/fp8.py holds the formats, the full scales and the one RNE cast):
- cast_to_fp8_v2: `input * scale` in float32 (callers pass the inverse of the dequantize scale; no scale:
  1), saturated at the device's full scale, rounded to nearest even into `dtype` (float8_e4m3fn or
  float8_e5m2; None is refused: the HPU default is not documented, and guessing a format would silently
  change results). NaN stays NaN. `stochastic_rounding=True` rounds instead to one of the two
  neighbouring float8 values, up with probability (v - lower) / (upper - lower), drawing from torch's
  global generator (seed it with torch.manual_seed for repeatable results). The second output is
  max |input| (before scaling: what delayed scaling records), float32 of shape [], when `is_amax`; else
  an empty float32 tensor of shape [0]. `scale_shape` reshapes the scale before it broadcasts.
- cast_from_fp8: `input * scale` (no scale: 1) computed in float32, returned as `out_dtype`.
- fp8_gemm_v2: op(A * A_scale_inv) @ op(B * B_scale_inv), op transposing the last two dimensions when its
  `trans_*` flag is set, in float32 (each operand dequantized first, as the Q/DQ graph does), `+ bias`,
  `+ D` when `accumulate` (D is read, never written: the op is functional), returned as `out_dtype`.
  A_scale_inv broadcasts against A as given (per tensor, or per row [M, 1]). B_scale_inv is per tensor (one
  element), or per output column of op(B) with `B_scale_shape=[N]` (the form Habana's own callers pass
  for a per-channel weight scale; only the hardware-gated test checks it against a card); other
  B_scale_shape values are refused rather than guessed. A 2-D B with trans_B is the
  linear form and runs `torch.nn.functional.linear(a, b, bias)`, the very op (and so the very rounding)
  of the Q/DQ graph's `aten.linear`; every other shape runs `torch.matmul` (the Q/DQ graph's matmul/bmm),
  then adds the bias.
"""
from __future__ import annotations

import math

import torch

from ... import fp8
from ...errors import ConfigError

__all__ = ["DEVICES", "HPU_NAMESPACE", "NAMESPACES", "OP_NAMES", "SCHEMAS", "device_of_namespace", "reference_op"]

# The HPU schemas, verbatim (without the namespace): the pt2q ops are defined from these strings.
SCHEMAS = {
    "cast_to_fp8_v2": "cast_to_fp8_v2(Tensor input, Tensor? scale=None, bool stochastic_rounding=False, "
                      "bool is_amax=False, ScalarType dtype=None, int[]? scale_shape=None) -> (Tensor, Tensor)",
    "cast_from_fp8": "cast_from_fp8(Tensor input, Tensor? scale, ScalarType out_dtype, "
                     "int[]? scale_shape=None) -> Tensor",
    "fp8_gemm_v2": "fp8_gemm_v2(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D, ScalarType out_dtype, "
                   "Tensor? A_scale_inv=None, Tensor? B_scale_inv=None, Tensor? bias=None, bool accumulate=False, "
                   "int[]? B_scale_shape=None) -> Tensor",
}
OP_NAMES = tuple(SCHEMAS)
DEVICES = ("gaudi2", "gaudi3")
NAMESPACES = {device: f"pt2q_{device}" for device in DEVICES}
HPU_NAMESPACE = "hpu"
_UNIT = torch.ones((), dtype=torch.float32)  # "no scale": multiplying by 1.0 changes no bit
_FP8_DTYPES = tuple(fp8.FP8_DTYPES.values())


def reference_op(device: str, name: str) -> torch._ops.OpOverload:
    """`torch.ops.pt2q_<device>.<name>.default`."""
    return getattr(getattr(torch.ops, NAMESPACES[device]), name).default


def device_of_namespace(namespace: str) -> str | None:
    """"gaudi2" for "pt2q_gaudi2", ...; None for another namespace."""
    return next((device for device, ns in NAMESPACES.items() if ns == namespace), None)


# -- argument checks shared by the CPU and the fake kernels ------------------------------------------
def _cast_dtype(dtype, namespace: str) -> torch.dtype:
    if dtype not in _FP8_DTYPES:
        raise ConfigError(f"{namespace}::cast_to_fp8_v2: dtype={dtype!r} is not a float8 format; pass "
                          "dtype=torch.float8_e4m3fn or torch.float8_e5m2 (None is not accepted: the HPU default "
                          "is not documented)")
    return dtype


def _check_fp8_input(tensor: torch.Tensor, namespace: str, name: str, argument: str) -> None:
    if tensor.dtype not in _FP8_DTYPES:
        raise ConfigError(f"{namespace}::{name}: {argument} is {tensor.dtype}, not a float8 tensor; cast it with "
                          f"{namespace}::cast_to_fp8_v2 first")


def _shaped(scale: torch.Tensor, shape, namespace: str, name: str, argument: str) -> torch.Tensor:
    """`scale` reshaped to the op's `*scale_shape` argument (None: as it is)."""
    if shape is None:
        return scale
    if scale.numel() != math.prod(shape):
        raise ConfigError(f"{namespace}::{name}: the scale has {scale.numel()} elements and cannot take "
                          f"{argument}={list(shape)}; pass a shape with as many elements")
    return scale.reshape(shape)


def _b_scale(B: torch.Tensor, trans_B: bool, scale: torch.Tensor | None, scale_shape, namespace: str):
    """B_scale_inv shaped to broadcast against B as stored: per tensor, or per output column of op(B)."""
    if scale is None:
        return None
    if scale_shape is None:
        if scale.numel() != 1:
            raise ConfigError(f"{namespace}::fp8_gemm_v2: B_scale_inv has {scale.numel()} elements but no "
                              "B_scale_shape; a per-channel scale needs B_scale_shape=[N] (N: the output columns)")
        return scale.reshape(())
    columns = B.shape[-2] if trans_B else B.shape[-1]
    if len(scale_shape) != 1 or scale_shape[0] != columns or scale.numel() != columns:
        raise ConfigError(f"{namespace}::fp8_gemm_v2: B_scale_shape={list(scale_shape)} with a B_scale_inv of "
                          f"{scale.numel()} elements is not emulated; the reference kernel takes B_scale_shape=[N] "
                          f"with N={columns} scales (one per output column), or a single scale")
    # op(B)'s column n is B's row n when B is transposed, else B's column n.
    return scale.reshape(columns, 1) if trans_B else scale.reshape(columns)


def _gemm_operands(A: torch.Tensor, B: torch.Tensor, namespace: str) -> None:
    for argument, tensor in (("A", A), ("B", B)):
        _check_fp8_input(tensor, namespace, "fp8_gemm_v2", argument)
        if tensor.dim() < 2:
            raise ConfigError(f"{namespace}::fp8_gemm_v2: {argument} has {tensor.dim()} dimension(s); it needs at "
                              "least 2 (rows and columns)")


def _gemm_shape(A, trans_A, B, trans_B, namespace: str) -> tuple:
    rows, inner = (A.shape[-1], A.shape[-2]) if trans_A else (A.shape[-2], A.shape[-1])
    b_inner, columns = (B.shape[-1], B.shape[-2]) if trans_B else (B.shape[-2], B.shape[-1])
    torch._check(inner == b_inner, lambda: f"{namespace}::fp8_gemm_v2: op(A) has {inner} columns but op(B) has "
                                          f"{b_inner} rows")
    return (*torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]), rows, columns)


def _check_accumulate(D, namespace: str) -> None:
    if D is None:
        raise ConfigError(f"{namespace}::fp8_gemm_v2: accumulate=True needs D (the tensor to add the product to); "
                          "pass D or accumulate=False")


# -- CPU kernels -------------------------------------------------------------------------------------
def _stochastic_cast(scaled: torch.Tensor, dtype: torch.dtype, saturation: float) -> torch.Tensor:
    """Saturate, then round each value to one of its two neighbouring `dtype` values at random, up with
    probability (|v| - lower) / (upper - lower): unbiased, E[result] = v."""
    clamped = scaled.clamp(-saturation, saturation)
    nearest = fp8.quantize(clamped, _UNIT, dtype, saturation)
    codes = nearest.view(torch.uint8).to(torch.int16)
    sign, code = codes & 0x80, codes & 0x7F
    magnitude = clamped.abs().to(torch.float64)
    near_magnitude = nearest.to(torch.float64).abs()
    # Float8 codes are sign-magnitude, and their magnitudes grow with the 7 low bits: the other neighbour
    # is the next code away from the nearest one, on the far side of v. It never leaves the finite range:
    # |v| <= saturation, a value of the format, so a code above the nearest one is at most saturation's.
    above = magnitude > near_magnitude
    other_code = torch.where(above, code + 1, (code - 1).clamp(min=0))
    other_magnitude = other_code.to(torch.uint8).view(dtype).to(torch.float64)
    lower = torch.minimum(near_magnitude, other_magnitude)
    upper = torch.maximum(near_magnitude, other_magnitude)
    exact = (magnitude == near_magnitude) | torch.isnan(magnitude)
    probability_up = torch.where(exact, 0.0, (magnitude - lower) / torch.where(exact, 1.0, upper - lower))
    round_up = torch.rand(magnitude.shape, dtype=torch.float64) < probability_up
    lower_code, upper_code = torch.minimum(code, other_code), torch.maximum(code, other_code)
    chosen = torch.where(exact, code, torch.where(round_up, upper_code, lower_code))
    return (sign | chosen).to(torch.uint8).view(dtype)


def _cast_to_fp8_v2(device: str):
    namespace = NAMESPACES[device]

    def kernel(input, scale=None, stochastic_rounding=False, is_amax=False, dtype=None, scale_shape=None):
        dtype = _cast_dtype(dtype, namespace)
        saturation = fp8.full_scale(dtype, device)
        scaled = input.to(torch.float32)
        if scale is not None:
            scaled = scaled * _shaped(scale, scale_shape, namespace, "cast_to_fp8_v2", "scale_shape").to(torch.float32)
        if stochastic_rounding:
            output = _stochastic_cast(scaled, dtype, saturation)
        else:  # `scaled` already holds input * scale: quantize with a unit scale (x * 1/1 keeps every bit)
            output = fp8.quantize(scaled, _UNIT, dtype, saturation)
        amax = input.abs().amax().to(torch.float32) if is_amax else input.new_empty((0,), dtype=torch.float32)
        return output, amax

    return kernel


def _cast_from_fp8(device: str):
    namespace = NAMESPACES[device]

    def kernel(input, scale, out_dtype, scale_shape=None):
        _check_fp8_input(input, namespace, "cast_from_fp8", "input")
        scale = _UNIT if scale is None else _shaped(scale, scale_shape, namespace, "cast_from_fp8", "scale_shape")
        return fp8.dequantize(input, scale, out_dtype)

    return kernel


def _fp8_gemm_v2(device: str):
    namespace = NAMESPACES[device]

    def kernel(A, trans_A, B, trans_B, D, out_dtype, A_scale_inv=None, B_scale_inv=None, bias=None,
               accumulate=False, B_scale_shape=None):
        _gemm_operands(A, B, namespace)
        _gemm_shape(A, trans_A, B, trans_B, namespace)
        a = fp8.dequantize(A, _UNIT if A_scale_inv is None else A_scale_inv)
        b_scale = _b_scale(B, trans_B, B_scale_inv, B_scale_shape, namespace)
        b = fp8.dequantize(B, _UNIT if b_scale is None else b_scale)
        if trans_A:
            a = a.transpose(-2, -1)
        bias = None if bias is None else bias.to(torch.float32)
        if trans_B and b.dim() == 2:
            output = torch.nn.functional.linear(a, b, bias)  # aten.linear's own rounding (see the docstring)
        else:
            output = torch.matmul(a, b.transpose(-2, -1) if trans_B else b)
            if bias is not None:
                output = output + bias
        if accumulate:
            _check_accumulate(D, namespace)
            output = output + D.to(torch.float32)
        return output.to(out_dtype)

    return kernel


# -- fake kernels (torch.export, FakeTensor propagation) ------------------------------------------------
def _cast_to_fp8_v2_fake(device: str):
    namespace = NAMESPACES[device]

    def fake(input, scale=None, stochastic_rounding=False, is_amax=False, dtype=None, scale_shape=None):
        dtype = _cast_dtype(dtype, namespace)
        shape = input.shape
        if scale is not None:
            shape = torch.broadcast_shapes(shape, _shaped(scale, scale_shape, namespace, "cast_to_fp8_v2",
                                                          "scale_shape").shape)
        amax_shape = () if is_amax else (0,)
        return input.new_empty(shape, dtype=dtype), input.new_empty(amax_shape, dtype=torch.float32)

    return fake


def _cast_from_fp8_fake(device: str):
    namespace = NAMESPACES[device]

    def fake(input, scale, out_dtype, scale_shape=None):
        _check_fp8_input(input, namespace, "cast_from_fp8", "input")
        shape = input.shape
        if scale is not None:
            shape = torch.broadcast_shapes(shape, _shaped(scale, scale_shape, namespace, "cast_from_fp8",
                                                          "scale_shape").shape)
        return input.new_empty(shape, dtype=out_dtype)

    return fake


def _fp8_gemm_v2_fake(device: str):
    namespace = NAMESPACES[device]

    def fake(A, trans_A, B, trans_B, D, out_dtype, A_scale_inv=None, B_scale_inv=None, bias=None,
             accumulate=False, B_scale_shape=None):
        _gemm_operands(A, B, namespace)
        shape = _gemm_shape(A, trans_A, B, trans_B, namespace)
        _b_scale(B, trans_B, B_scale_inv, B_scale_shape, namespace)  # refuses what the CPU kernel refuses
        if bias is not None:
            shape = torch.broadcast_shapes(shape, bias.shape)
        if accumulate:
            _check_accumulate(D, namespace)
            shape = torch.broadcast_shapes(shape, D.shape)
        return A.new_empty(shape, dtype=out_dtype)

    return fake


_KERNELS = {"cast_to_fp8_v2": (_cast_to_fp8_v2, _cast_to_fp8_v2_fake),
            "cast_from_fp8": (_cast_from_fp8, _cast_from_fp8_fake),
            "fp8_gemm_v2": (_fp8_gemm_v2, _fp8_gemm_v2_fake)}


def _define(device: str) -> torch.library.Library:
    namespace = NAMESPACES[device]
    library = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        make_kernel, make_fake = _KERNELS[name]
        library.define(schema)
        library.impl(name, make_kernel(device), "CPU")
        torch.library.register_fake(f"{namespace}::{name}", make_fake(device), lib=library)
    return library


# The libraries own the registrations: they must live as long as the process.
_LIBRARIES = {device: _define(device) for device in DEVICES}

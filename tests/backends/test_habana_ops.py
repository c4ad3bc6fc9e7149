"""The Habana reference ops (pt2q/backends/habana/ops.py): HPU signatures, casts bit for bit against a
float8 reference written here, fp8_gemm_v2 against the dequantized matmul, fake kernels under export.

The reference cast enumerates every finite value of the format up to the device's full scale, takes the
nearest one to |v| (ties: the even code, whose mantissa ends in 0), saturates beyond the full scale and
puts the sign back. Distances are taken in float64, where they are exact for the two grid values that
bracket |v| (both within a factor of 2 of |v|, or zero), which are the only ones that can be nearest.

Tolerances. The casts, cast_from_fp8 and fp8_gemm_v2 against the dequantized matmul (the Q/DQ graph's
ops on the dequantized operands) are compared with torch.equal. fp8_gemm_v2 against an independent
float64 product is bounded by float32 accumulation, (K + 3) * 2**-24 times sum_k |a_k b_k| (+ |bias| +
|D|): K roundings of the sum, one of each dequantized operand, one of the bias / D additions.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from pt2q import fp8
from pt2q.backends.habana import ops as habana_ops
from pt2q.errors import ConfigError
from pt2q.ops import DEQUANTIZE_FP8, QUANTIZE_FP8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
DEVICES = ("gaudi2", "gaudi3")
FORMATS = (E4M3, E5M2)
# The full scales as the issue states them (E4M3: 240 on Gaudi2, 448 on Gaudi3; E5M2: 57344).
FULL_SCALE = {("gaudi2", E4M3): 240.0, ("gaudi3", E4M3): 448.0, ("gaudi2", E5M2): 57344.0, ("gaudi3", E5M2): 57344.0}
HPU_SCHEMAS = {
    "cast_to_fp8_v2": "(Tensor input, Tensor? scale=None, bool stochastic_rounding=False, bool is_amax=False, "
                      "ScalarType dtype=None, int[]? scale_shape=None) -> (Tensor, Tensor)",
    "cast_from_fp8": "(Tensor input, Tensor? scale, ScalarType out_dtype, int[]? scale_shape=None) -> Tensor",
    "fp8_gemm_v2": "(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D, ScalarType out_dtype, "
                   "Tensor? A_scale_inv=None, Tensor? B_scale_inv=None, Tensor? bias=None, bool accumulate=False, "
                   "int[]? B_scale_shape=None) -> Tensor",
}


def ops_of(device):
    return getattr(torch.ops, f"pt2q_{device}")


# -- the float8 reference ------------------------------------------------------------------------------
def grid(dtype, full_scale):
    """(codes, values): every non-negative finite value of `dtype` up to `full_scale`, ascending."""
    codes = torch.arange(0, 128, dtype=torch.uint8)
    values = codes.view(dtype).to(torch.float64)
    keep = torch.isfinite(values) & (values <= full_scale)
    return codes[keep], values[keep]


def reference_codes(values: torch.Tensor, dtype, full_scale) -> torch.Tensor:
    """The uint8 codes of round-to-nearest-even with saturation at `full_scale` (values: finite or inf)."""
    codes, grid_values = grid(dtype, full_scale)
    values = values.to(torch.float64)
    magnitude = values.abs()
    distance = (magnitude[:, None] - grid_values[None, :]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    even = nearest & (codes[None, :] % 2 == 0)
    choice = torch.where(even.any(dim=1), even.to(torch.int8).argmax(dim=1), nearest.to(torch.int8).argmax(dim=1))
    magnitude_codes = codes[choice]
    magnitude_codes = torch.where(magnitude >= full_scale, codes[-1], magnitude_codes)  # saturate
    sign = torch.signbit(values).to(torch.uint8) * 0x80
    return sign | magnitude_codes


def probe_values(dtype, full_scale) -> torch.Tensor:
    """float32 values that exercise the cast: grid values, exact ties, their float32 neighbours,
    subnormals, the full-scale neighbourhood, overflow, and random magnitudes; both signs."""
    _, values = grid(dtype, full_scale)
    values = values.to(torch.float32)
    midpoints = (values[:-1] + values[1:]) / 2  # exact in float32: one more mantissa bit than the format
    assert torch.equal(midpoints.double(), (values[:-1].double() + values[1:].double()) / 2)
    up = torch.nextafter(midpoints, torch.tensor(math.inf))
    down = torch.nextafter(midpoints, torch.tensor(-math.inf))
    smallest = values[1]
    special = torch.tensor([0.0, smallest.item() / 2, smallest.item() / 4, smallest.item() * 0.75,
                            1e-30, 1e-44, 2.0 ** -149, full_scale, full_scale * 1.03, full_scale * 2,
                            float(torch.finfo(dtype).max), float(torch.finfo(dtype).max) * 1.5, 1e30, math.inf],
                           dtype=torch.float32)
    near_full = torch.nextafter(torch.tensor([full_scale] * 2, dtype=torch.float32),
                                torch.tensor([math.inf, -math.inf]))
    generator = torch.Generator().manual_seed(0)
    random = torch.exp2(torch.empty(4000).uniform_(-24, math.log2(full_scale) + 2, generator=generator))
    positive = torch.cat([values, midpoints, up, down, special, near_full, random])
    return torch.cat([positive, -positive])


# -- signatures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(HPU_SCHEMAS))
def test_ops_have_the_exact_hpu_signatures(device, name):
    schema = getattr(ops_of(device), name).default._schema
    assert schema.name == f"pt2q_{device}::{name}"
    assert str(schema) == f"pt2q_{device}::{name}{HPU_SCHEMAS[name]}"


def test_the_namespace_names_the_device():
    assert habana_ops.NAMESPACES == {"gaudi2": "pt2q_gaudi2", "gaudi3": "pt2q_gaudi3"}
    assert habana_ops.device_of_namespace("pt2q_gaudi3") == "gaudi3"
    assert habana_ops.device_of_namespace("hpu") is None


# -- cast_to_fp8_v2 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_cast_equals_the_float8_reference_bit_for_bit(device, dtype):
    full_scale = FULL_SCALE[device, dtype]
    assert fp8.full_scale(dtype, device) == full_scale
    values = probe_values(dtype, full_scale)
    fp8_values, amax = ops_of(device).cast_to_fp8_v2(values, None, False, False, dtype)
    assert fp8_values.dtype is dtype and amax.shape == (0,)
    expected = reference_codes(values, dtype, full_scale)
    mismatches = (fp8_values.view(torch.uint8) != expected).nonzero().flatten()
    assert mismatches.numel() == 0, [(values[i].item(), fp8_values[i].item()) for i in mismatches[:5]]
    assert fp8_values.to(torch.float32).abs().max().item() == full_scale  # saturated, never beyond


@pytest.mark.parametrize("device", DEVICES)
def test_ties_round_to_the_even_code(device):
    # 1 + 1/16 lies halfway between 1 (code 0x38, even) and 1.125 (0x39): it goes down; 1 + 3/16, between
    # 1.125 (odd) and 1.25 (0x3A, even), goes up. Half the smallest subnormal goes to zero.
    values = torch.tensor([1.0625, 1.1875, 2.0 ** -10, -1.0625])
    fp8_values = ops_of(device).cast_to_fp8_v2(values, None, False, False, E4M3)[0]
    assert fp8_values.to(torch.float32).tolist() == [1.0, 1.25, 0.0, -1.0]
    assert fp8_values.view(torch.uint8).tolist() == [0x38, 0x3A, 0x00, 0xB8]


def test_gaudi2_saturates_e4m3_at_240_and_gaudi3_at_448():
    values = torch.tensor([239.0, 249.0, 300.0, 448.0, 1000.0, -1000.0])
    gaudi2 = torch.ops.pt2q_gaudi2.cast_to_fp8_v2(values, None, False, False, E4M3)[0].to(torch.float32)
    gaudi3 = torch.ops.pt2q_gaudi3.cast_to_fp8_v2(values, None, False, False, E4M3)[0].to(torch.float32)
    assert gaudi2.tolist() == [240.0, 240.0, 240.0, 240.0, 240.0, -240.0]
    assert gaudi3.tolist() == [240.0, 256.0, 288.0, 448.0, 448.0, -448.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_cast_multiplies_by_the_scale_in_float32_first(device, dtype):
    full_scale = FULL_SCALE[device, dtype]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=generator) * 3
    for scale in (torch.tensor(0.0625), torch.tensor(37.3), torch.tensor(full_scale / 2.9)):
        fp8_values = ops_of(device).cast_to_fp8_v2(x, scale, False, False, dtype)[0]
        expected = reference_codes((x * scale).flatten(), dtype, full_scale).reshape(x.shape)
        assert torch.equal(fp8_values.view(torch.uint8), expected)
    bf16 = x.to(torch.bfloat16)
    fp8_values = ops_of(device).cast_to_fp8_v2(bf16, torch.tensor(3.0), False, False, dtype)[0]
    assert torch.equal(fp8_values.view(torch.uint8),
                       reference_codes((bf16.to(torch.float32) * 3).flatten(), dtype, full_scale).reshape(x.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_cast_with_the_inverse_scale_equals_pt2q_quantize_fp8(device, dtype):
    """What the lowering relies on: cast_to_fp8_v2(x, 1/s) is the Q/DQ graph's quantize_fp8(x, s)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(128, 16, generator=generator) * 50
    full_scale = fp8.full_scale(dtype, device)
    for scale in (torch.tensor(0.3), torch.tensor(0.125), torch.tensor(7.1)):
        expected = QUANTIZE_FP8(x, scale, dtype, full_scale)
        actual = ops_of(device).cast_to_fp8_v2(x, torch.reciprocal(scale), False, False, dtype)[0]
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def test_cast_keeps_nan():
    fp8_values = torch.ops.pt2q_gaudi2.cast_to_fp8_v2(torch.tensor([math.nan, 1.0]), None, False, False, E4M3)[0]
    assert torch.isnan(fp8_values.to(torch.float32)[0]) and fp8_values.to(torch.float32)[1] == 1.0


def test_amax_is_max_abs_of_the_input_before_scaling():
    x = torch.tensor([[1.5, -704.0], [3.0, 2.0]])
    fp8_values, amax = torch.ops.pt2q_gaudi2.cast_to_fp8_v2(x, torch.tensor(0.25), False, True, E4M3)
    assert amax.dtype is torch.float32 and amax.shape == () and amax.item() == 704.0
    assert fp8_values.to(torch.float32).tolist() == [[0.375, -176.0], [0.75, 0.5]]
    _, no_amax = torch.ops.pt2q_gaudi2.cast_to_fp8_v2(x, torch.tensor(0.25), False, False, E4M3)
    assert no_amax.shape == (0,) and no_amax.dtype is torch.float32


def test_scale_shape_reshapes_the_scale():
    x = torch.ones(4, 3)
    scale = torch.tensor([1.0, 2.0, 4.0, 8.0])
    fp8_values = torch.ops.pt2q_gaudi3.cast_to_fp8_v2(x, scale, False, False, E4M3, [4, 1])[0]
    assert fp8_values.to(torch.float32).tolist() == [[1.0] * 3, [2.0] * 3, [4.0] * 3, [8.0] * 3]
    with pytest.raises(ConfigError, match=r"scale_shape=\[3, 1\]"):
        torch.ops.pt2q_gaudi3.cast_to_fp8_v2(x, scale, False, False, E4M3, [3, 1])


def test_cast_refuses_a_missing_or_non_float8_dtype():
    with pytest.raises(ConfigError, match="dtype=None is not a float8 format"):
        torch.ops.pt2q_gaudi2.cast_to_fp8_v2(torch.ones(2))
    with pytest.raises(ConfigError, match="torch.int8"):
        torch.ops.pt2q_gaudi2.cast_to_fp8_v2(torch.ones(2), None, False, False, torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_stochastic_rounding_picks_a_neighbour_without_bias(device, dtype):
    full_scale = FULL_SCALE[device, dtype]
    _, grid_values = grid(dtype, full_scale)
    generator = torch.Generator().manual_seed(3)
    lower_index = torch.randint(0, len(grid_values) - 1, (24,), generator=generator)
    lower, upper = grid_values[lower_index], grid_values[lower_index + 1]
    fraction = torch.rand(24, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    targets = (lower + fraction * (upper - lower)).to(torch.float32)
    fraction = (targets.double() - lower) / (upper - lower)  # after float32 rounding of the targets
    samples = 4000
    values = torch.cat([targets.repeat_interleave(samples), -targets[:4], grid_values[:40].float(),
                        torch.tensor([full_scale * 3, -math.inf])])
    torch.manual_seed(0)
    fp8_values = ops_of(device).cast_to_fp8_v2(values, None, True, False, dtype)[0].to(torch.float64)
    rounded = fp8_values[:24 * samples].reshape(24, samples)
    assert ((rounded == lower[:, None]) | (rounded == upper[:, None])).all()
    share_up = (rounded == upper[:, None]).double().mean(dim=1)
    sigma = (fraction * (1 - fraction) / samples).sqrt()
    assert ((share_up - fraction).abs() <= 5 * sigma).all(), (share_up, fraction)
    negative = fp8_values[24 * samples:24 * samples + 4]
    assert ((negative == -lower[:4]) | (negative == -upper[:4])).all()
    assert torch.equal(fp8_values[24 * samples + 4:-2], grid_values[:40])  # values of the format stay
    assert fp8_values[-2:].tolist() == [full_scale, -full_scale]  # saturation first


# -- cast_from_fp8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_cast_from_fp8_is_input_times_scale(dtype):
    codes = torch.arange(0, 256, dtype=torch.uint8)
    values = codes.view(dtype)
    finite = torch.isfinite(values.to(torch.float32))
    values = values[finite]
    scale = torch.tensor(0.37)
    out = torch.ops.pt2q_gaudi2.cast_from_fp8(values, scale, torch.float32)
    assert torch.equal(out, values.to(torch.float32) * scale)  # one float32 multiply
    assert torch.equal(out, DEQUANTIZE_FP8(values, scale, torch.float32))
    assert torch.equal(torch.ops.pt2q_gaudi2.cast_from_fp8(values, None, torch.bfloat16),
                       values.to(torch.float32).to(torch.bfloat16))
    weight = values[:24].reshape(4, 6)
    per_row = torch.tensor([1.0, 0.5, 2.0, 0.25])
    out = torch.ops.pt2q_gaudi3.cast_from_fp8(weight, per_row, torch.float32, [4, 1])
    assert torch.equal(out, weight.to(torch.float32) * per_row[:, None])


def test_cast_from_fp8_refuses_a_float_input():
    with pytest.raises(ConfigError, match="input is torch.float32, not a float8 tensor"):
        torch.ops.pt2q_gaudi2.cast_from_fp8(torch.ones(2), None, torch.float32)


# -- fp8_gemm_v2 ------------------------------------------------------------------------------------------
def random_fp8(shape, dtype=E4M3, seed=0, spread=8.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * spread).to(dtype)


def float64_gemm(A, trans_A, B, trans_B, a_scale, b_scale_columns, bias=None, D=None):
    """(result, magnitude) in float64; b_scale_columns: None, a scalar, or one scale per output column."""
    a = A.to(torch.float64) * (1.0 if a_scale is None else a_scale.double())
    b = B.to(torch.float64)
    a = a.transpose(-2, -1) if trans_A else a
    b = b.transpose(-2, -1) if trans_B else b
    if b_scale_columns is not None:
        b = b * b_scale_columns.double()
    result, magnitude = a @ b, a.abs() @ b.abs()
    for extra in (bias, D):
        if extra is not None:
            result, magnitude = result + extra.double(), magnitude + extra.double().abs()
    return result, magnitude


def assert_float32_accurate(actual, expected, magnitude, inner):
    bound = (inner + 3) * 2.0 ** -24 * magnitude
    error = (actual.double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("trans_A", [False, True])
@pytest.mark.parametrize("trans_B", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_a_float64_product(trans_A, trans_B, per_channel, bias):
    M, K, N = 6, 32, 10
    A = random_fp8((K, M) if trans_A else (M, K), seed=1)
    B = random_fp8((N, K) if trans_B else (K, N), seed=2)
    a_scale = torch.tensor(0.0371)
    b_scale = torch.linspace(0.01, 0.2, N) if per_channel else torch.tensor(0.043)
    bias_tensor = torch.randn(N) if bias else None
    out = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, trans_A, B, trans_B, None, torch.float32, a_scale, b_scale,
                                            bias_tensor, False, [N] if per_channel else None)
    assert out.shape == (M, N) and out.dtype is torch.float32
    expected, magnitude = float64_gemm(A, trans_A, B, trans_B, a_scale, b_scale, bias_tensor)
    assert_float32_accurate(out, expected, magnitude, K)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_form_equals_the_dequantized_linear_bit_for_bit(per_channel, bias):
    """trans_B with a 2-D B is the Q/DQ graph's linear(dequantize_fp8(x), dequantize_fp8(w), bias)."""
    A, B = random_fp8((3, 5, 48), seed=3), random_fp8((20, 48), seed=4)
    a_scale = torch.tensor(0.021)
    b_scale = torch.linspace(0.01, 0.3, 20) if per_channel else torch.tensor(0.013)
    bias_tensor = torch.randn(20) if bias else None
    out = torch.ops.pt2q_gaudi3.fp8_gemm_v2(A, False, B, True, None, torch.float32, a_scale, b_scale, bias_tensor,
                                            False, [20] if per_channel else None)
    weight_scale = b_scale.reshape(20, 1) if per_channel else b_scale
    expected = torch.ops.aten.linear.default(DEQUANTIZE_FP8(A, a_scale, torch.float32),
                                             DEQUANTIZE_FP8(B, weight_scale, torch.float32), bias_tensor)
    assert out.shape == (3, 5, 20)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("batched", ["bmm", "matmul4d", "matmul3d_2d"])
def test_matmul_form_equals_the_dequantized_matmul_bit_for_bit(batched):
    shapes = {"bmm": ((4, 6, 16), (4, 16, 7)), "matmul4d": ((2, 3, 6, 16), (2, 3, 16, 7)),
              "matmul3d_2d": ((2, 6, 16), (16, 7))}[batched]
    A, B = random_fp8(shapes[0], seed=5), random_fp8(shapes[1], E5M2, seed=6)
    a_scale, b_scale = torch.tensor(0.5), torch.tensor(0.007)
    out = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, False, B, False, None, torch.float32, a_scale, b_scale)
    dequantized = (DEQUANTIZE_FP8(A, a_scale, torch.float32), DEQUANTIZE_FP8(B, b_scale, torch.float32))
    expected = (torch.ops.aten.bmm.default if batched == "bmm" else torch.ops.aten.matmul.default)(*dequantized)
    assert torch.equal(out, expected)


def test_gemm_accumulates_into_d_and_casts_to_out_dtype():
    A, B = random_fp8((5, 24), seed=7), random_fp8((9, 24), seed=8)
    a_scale, b_scale, D, bias = torch.tensor(0.1), torch.tensor(0.2), torch.randn(5, 9), torch.randn(9)
    out = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, False, B, True, D, torch.float32, a_scale, b_scale, bias, True)
    expected, magnitude = float64_gemm(A, False, B, True, a_scale, b_scale, bias, D)
    assert_float32_accurate(out, expected, magnitude, 24)
    ignored = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, False, B, True, D, torch.float32, a_scale, b_scale, bias, False)
    without_d = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, False, B, True, None, torch.float32, a_scale, b_scale, bias)
    assert torch.equal(ignored, without_d)  # D is only read when accumulating
    assert not torch.equal(out, without_d)
    bf16 = torch.ops.pt2q_gaudi2.fp8_gemm_v2(A, False, B, True, D, torch.bfloat16, a_scale, b_scale, bias, True)
    assert bf16.dtype is torch.bfloat16 and torch.equal(bf16, out.to(torch.bfloat16))  # one rounding, at the end


def test_gemm_refuses_what_it_does_not_emulate():
    A, B = random_fp8((5, 24)), random_fp8((9, 24))
    gemm = torch.ops.pt2q_gaudi2.fp8_gemm_v2
    with pytest.raises(ConfigError, match=r"needs B_scale_shape=\[N\]"):
        gemm(A, False, B, True, None, torch.float32, None, torch.ones(9))
    with pytest.raises(ConfigError, match=r"B_scale_shape=\[3, 3\]"):
        gemm(A, False, B, True, None, torch.float32, None, torch.ones(9), None, False, [3, 3])
    with pytest.raises(ConfigError, match="accumulate=True needs D"):
        gemm(A, False, B, True, None, torch.float32, None, None, None, True)
    with pytest.raises(ConfigError, match="A is torch.float32, not a float8 tensor"):
        gemm(A.to(torch.float32), False, B, True, None, torch.float32)
    with pytest.raises(RuntimeError, match="op\\(A\\) has 24 columns but op\\(B\\) has 9 rows"):
        gemm(A, False, B, False, None, torch.float32)


# -- fake kernels ------------------------------------------------------------------------------------------
class CallsEveryOp(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.ops = ops_of(device)
        self.register_buffer("weight", random_fp8((12, 16), seed=9))
        self.register_buffer("weight_scale", torch.linspace(0.01, 0.1, 12))
        self.register_buffer("input_scale_inverse", torch.tensor(4.0))

    def forward(self, x):
        q, amax = self.ops.cast_to_fp8_v2(x, self.input_scale_inverse, False, True, E4M3, None)
        y = self.ops.fp8_gemm_v2(q, False, self.weight, True, None, torch.float32, torch.reciprocal(
            self.input_scale_inverse), self.weight_scale, None, False, [12])
        scores = self.ops.fp8_gemm_v2(q, False, q, True, None, torch.bfloat16, None, None)
        return y, self.ops.cast_from_fp8(q, None, torch.bfloat16, None), scores, amax


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernels_export_save_and_load(device):
    model = CallsEveryOp(device)
    x = torch.randn(3, 5, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {f"pt2q_{device}.{name}.default" for name in HPU_SCHEMAS} <= targets
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    other = torch.randn(7, 5, 16)
    for actual, expected in zip(loaded(other), model(other)):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    for node in exported.graph.nodes:  # the fake values export recorded match the real outputs
        if node.op == "call_function" and str(node.target).startswith(f"pt2q_{device}.fp8_gemm_v2"):
            assert node.meta["val"].shape[1:] in ((5, 12), (5, 5))


@pytest.mark.parametrize("name", list(HPU_SCHEMAS))
def test_opcheck_fake_kernels_agree_with_the_cpu_kernels(name):
    # test_schema is left out: its mutation check calls allclose on float8 inputs, which torch's CPU
    # kernels do not implement (cast_to_fp8_v2, whose inputs are float, passes it).
    utils = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    q, w = random_fp8((4, 16), seed=10), random_fp8((8, 16), seed=11)
    samples = {
        "cast_to_fp8_v2": [(torch.randn(4, 16) * 100, torch.tensor(0.5), False, True, E4M3, None),
                           (torch.randn(2, 3, 8), torch.rand(3), True, False, E5M2, [3, 1])],
        "cast_from_fp8": [(q, torch.tensor(0.5), torch.bfloat16, None), (w, torch.rand(8), torch.float32, [8, 1])],
        "fp8_gemm_v2": [(q, False, w, True, torch.randn(4, 8), torch.float32, torch.tensor(0.5), torch.rand(8),
                         torch.randn(8), True, [8]),
                        (q.reshape(2, 2, 16), False, w, True, None, torch.bfloat16, None, None, None, False, None),
                        (q, True, random_fp8((4, 8), seed=12), False, None, torch.float32, None, None, None,
                         False, None)],
    }
    for device in DEVICES:
        for args in samples[name]:
            result = torch.library.opcheck(getattr(ops_of(device), name).default, args, test_utils=utils)
            assert set(result.values()) == {"SUCCESS"}, result

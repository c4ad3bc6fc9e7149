"""LowerWeightOnly: dequantize_weight + linear -> ATen's int8 / int4 weight-only CPU kernels, or a logged fallback.

Tolerances. With the default bf16 activations the lowered layer rounds its input, its scales (and int4
zeros) and its output to bf16 (8 significant bits: up to 2**-9 ~ 2e-3 relative per element each); two
layers measured ~4e-3 relative error against the fp32 dequantize + linear graph, so the bound is 1.5e-2
relative and cosine >= 0.9999. With fp32 activations the kernels compute the same products as the
dequantized weight in fp32: 1e-5 relative. Fallback layers are the untouched graph: identical outputs.

These tests pin ATen's kernels (`kernels="aten"`: they test ATen's contract); pt2q's own kernels and the
kernel table are tested in test_weight_only_kernels.py. Only one test compiles with Inductor (slow on 2
cores); the rest run the rewritten GraphModule eagerly.
"""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import pt2q
from pt2q.algorithms.rtn import WeightFormat, rtn_quantize
from pt2q.backends import inductor
from pt2q.backends.inductor.weight_only import INT4_KERNEL, INT8_KERNEL, LowerWeightOnly
from pt2q.ops import DEQUANTIZE_WEIGHT
from pt2q.passes.manager import PassManager
from pt2q.passes.pack_weights import PackWeights
from tests.conftest import rel_error

aten = torch.ops.aten
KERNEL_OPS = {INT8_KERNEL: aten._weight_int8pack_mm.default, INT4_KERNEL: aten._weight_int4pack_mm_for_cpu.default}
BF16_REL, BF16_COS, FP32_REL = 1.5e-2, 0.9999, 1e-5


class TwoLinears(torch.nn.Module):
    def __init__(self, dims=(64, 96, 128), bias=(True, False)):
        super().__init__()
        self.up = torch.nn.Linear(dims[0], dims[1], bias=bias[0])
        self.down = torch.nn.Linear(dims[1], dims[2], bias=bias[1])

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class OneLinear(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def _output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def packed_model(model, x, fmt: WeightFormat):
    """Captured `model` with every linear weight RTN-quantized in `fmt` and packed (dequantize + linear)."""
    torch.manual_seed(0)
    gm = pt2q.capture(model, (x,))
    quantized = {node.name: rtn_quantize(gm.get_parameter(node.args[1].target), fmt)
                 for node in gm.graph.nodes if node.target is aten.linear.default}
    PassManager([PackWeights(quantized)])(gm)
    return gm


def lowered(gm, **options):
    options.setdefault("kernels", "aten")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's LeafSpec deprecation when deep-copying
        copied = copy.deepcopy(gm)
    lower = LowerWeightOnly(**options)
    copied, _ = PassManager([lower])(copied)
    return copied, lower.report


def targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return TwoLinears().eval(), torch.randn(2, 3, 64)  # 3-D: exercises the [..., K] reshape


FORMATS = {
    "w8_per_channel_sym": (WeightFormat(bits=8, group_size=-1), INT8_KERNEL),
    "w4_g32_sym": (WeightFormat(bits=4, group_size=32), INT4_KERNEL),
    "w4_g32_asym": (WeightFormat(bits=4, group_size=32, sym=False), INT4_KERNEL),
    "w3_g32": (WeightFormat(bits=3, group_size=32), None),
    "nf4": (WeightFormat(bits=4, group_size=32, dtype="nf4"), None),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_kernel_choice_and_numerics(model_and_input, name, caplog):
    model, x = model_and_input
    fmt, kernel = FORMATS[name]
    gm = packed_model(model, x, fmt)
    expected = _output(gm(x))
    with caplog.at_level(logging.INFO, logger="pt2q.backends.inductor.weight_only"):
        bf16, report = lowered(gm)
    assert set(report.layers) == {"linear", "linear_1"}
    found = targets(bf16)
    if kernel is None:
        assert all(not layer.lowered for layer in report.layers.values())
        assert found.count(DEQUANTIZE_WEIGHT) == 2 and not set(KERNEL_OPS.values()) & set(found)
        assert all(value.startswith("fallback: ") for value in report.kernels().values())
        reason = "3-bit" if fmt.bits == 3 else "nf4 code table"
        lines = [r.getMessage() for r in caplog.records if "keeps dequantize + linear" in r.getMessage()]
        assert len(lines) == 2 and all(reason in line for line in lines)
        assert torch.equal(_output(bf16(x)), expected)
        return
    assert report.kernels() == {"linear": kernel, "linear_1": kernel}
    assert found.count(KERNEL_OPS[kernel]) == 2 and DEQUANTIZE_WEIGHT not in found
    assert aten.linear.default not in found
    actual = _output(bf16(x))
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert rel_error(actual, expected) < BF16_REL
    assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > BF16_COS
    fp32, report32 = lowered(gm, activation_dtype=torch.float32)
    assert report32.kernels() == report.kernels()
    assert targets(fp32).count(KERNEL_OPS[kernel]) == 2
    assert rel_error(_output(fp32(x)), expected) < FP32_REL


@pytest.mark.parametrize("dims, fmt, activation_dtype, kernel, reason", [
    ((64, 40), WeightFormat(bits=4, group_size=32), torch.bfloat16, None, "N=40 is not a multiple of 16"),
    ((48, 32), WeightFormat(bits=4, group_size=32), torch.bfloat16, INT4_KERNEL, ""),  # last group padded: x padded
    ((576, 32), WeightFormat(bits=4, group_size=128, sym=False), torch.bfloat16, INT4_KERNEL, ""),  # SmolLM2's K
    ((64, 32), WeightFormat(bits=4, group_size=16), torch.bfloat16, None, "group_size=16"),
    ((64, 32), WeightFormat(bits=4, group_size=32, group_dim=0), torch.bfloat16, None, "group_dim=0"),
    ((64, 32), WeightFormat(bits=8, group_size=32), torch.bfloat16, None, "one scale per output channel"),
    ((64, 32), WeightFormat(bits=8, group_size=-1, sym=False), torch.bfloat16, None, "asymmetric 8-bit"),
    ((40, 32), WeightFormat(bits=8, group_size=-1), torch.bfloat16, None, "K=40 is not a multiple of 16"),
    ((40, 32), WeightFormat(bits=8, group_size=-1), torch.float32, INT8_KERNEL, ""),  # scalar path: any K
    ((64, 8), WeightFormat(bits=8, group_size=-1), torch.bfloat16, None, "N=8 < 9"),  # Inductor inlines scales
    ((64, 32), WeightFormat(bits=4, group_size=-1, sym=False), torch.bfloat16, INT4_KERNEL, ""),  # g=64
    ((512, 32), WeightFormat(bits=4, group_size=512), torch.bfloat16, INT4_KERNEL, ""),  # g=256, scales x2
    ((64, 32), WeightFormat(bits=2, group_size=32), torch.bfloat16, None, "2-bit"),
])
def test_shapes_and_formats(dims, fmt, activation_dtype, kernel, reason):
    torch.manual_seed(0)
    model = OneLinear(*dims).eval()
    x = torch.randn(3, dims[0])  # 2-D: no reshape around the kernel
    gm = packed_model(model, x, fmt)
    out, report = lowered(gm, activation_dtype=activation_dtype)
    layer = report.layers["linear"]
    assert layer.kernel == kernel
    assert reason in layer.reason
    expected = _output(gm(x))
    if kernel is None:
        assert torch.equal(_output(out(x)), expected)
        return
    assert aten.reshape.default not in targets(out)
    assert (aten.constant_pad_nd.default in targets(out)) == (dims[0] % max(fmt.group_size, 1) != 0
                                                              and fmt.group_size != -1 and kernel == INT4_KERNEL)
    bound = FP32_REL if activation_dtype == torch.float32 else BF16_REL
    assert rel_error(_output(out(x)), expected) < bound
    if kernel == INT4_KERNEL and fmt.group_size in (-1, 512):
        assert layer.kernel_group_size == {-1: 64, 512: 256}[fmt.group_size]


def test_dynamic_activations_fall_back_to_int4_with_one_logged_reason(model_and_input, caplog):
    model, x = model_and_input
    gm = packed_model(model, x, WeightFormat(bits=4, group_size=32))
    with caplog.at_level(logging.INFO, logger="pt2q.backends.inductor.weight_only"):
        out, report = lowered(gm, dynamic_activations=True)
    assert report.kernels() == {"linear": INT4_KERNEL, "linear_1": INT4_KERNEL}
    assert len(report.notes) == 1 and "da8w4_linear_cpu" in report.notes[0]
    assert sum("da8w4_linear_cpu" in r.getMessage() for r in caplog.records) == 1
    assert rel_error(_output(out(x)), _output(gm(x))) < BF16_REL


def test_inductor_compile_lowers_and_leaves_the_model_alone(model_and_input, monkeypatch):
    """The one compiled test: W8 on `up`, W4 g32 asym on `down`, through pt2q's Inductor compile."""
    monkeypatch.setenv("PT2Q_WEIGHT_ONLY_KERNELS", "aten")
    model, x = model_and_input
    torch.manual_seed(0)
    gm = pt2q.capture(model, (x,))
    PassManager([PackWeights({
        "linear": rtn_quantize(gm.get_parameter("up.weight"), WeightFormat(bits=8, group_size=-1)),
        "linear_1": rtn_quantize(gm.get_parameter("down.weight"), WeightFormat(bits=4, group_size=32, sym=False)),
    })])(gm)
    before = targets(gm)
    expected = _output(gm(x))
    compiled = inductor.compile(gm, (x,))
    assert compiled.weight_only_kernels == {"linear": INT8_KERNEL, "linear_1": INT4_KERNEL}
    assert compiled.options["weight_only_activation_dtype"] == torch.bfloat16
    actual = _output(compiled(x))
    assert rel_error(actual, expected) < BF16_REL
    assert targets(gm) == before and before.count(DEQUANTIZE_WEIGHT) == 2  # the caller's graph is unchanged


def test_a_kernel_that_disagrees_with_the_dequantized_weight_is_not_used(model_and_input, monkeypatch):
    """The self-check: a kernel contract change (simulated: outputs off by 10%) keeps dequantize + linear."""
    model, x = model_and_input
    gm = packed_model(model, x, WeightFormat(bits=4, group_size=32))
    original = LowerWeightOnly._kernel_call
    monkeypatch.setattr(LowerWeightOnly, "_kernel_call", lambda self, *args: original(self, *args) * 1.1)
    out, report = lowered(gm)
    assert all("self-check failed" in reason for reason in report.fallbacks.values()) and len(report.fallbacks) == 2
    assert targets(out).count(DEQUANTIZE_WEIGHT) == 2

"""HQQ's float32 zero points through the Inductor weight-only lowering (LowerWeightOnly) and one compile.

Every kernel that takes asymmetric weights folds the zero point into a float term (ATen int4:
`(8 - zero) * scale`; pt2q's: `scale * zero`), so a float zero point must come out exactly as pt2q's own
dequantize computes it. Tolerances as in test_weight_only_lowering.py / test_weight_only_kernels.py: fp32
activations 1e-5 relative against the dequantize + linear graph (a zero point truncated to an integer
gives about 0.1), bf16 activations 1.5e-2. Only one test compiles with Inductor.
"""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q.algorithms.hqq import hqq_quantize
from pt2q.algorithms.rtn import WeightFormat
from pt2q.backends import inductor
from pt2q.backends.inductor.weight_only import INT4_KERNEL, PT2Q_INT4_AVX2, PT2Q_INT8_AVX2
from pt2q.isa import detect
from pt2q.ops import DEQUANTIZE_WEIGHT
from pt2q.passes.manager import PassManager
from pt2q.passes.pack_weights import PackWeights
from tests.backends.test_weight_only_lowering import BF16_REL, FP32_REL, TwoLinears, _output, lowered, targets
from tests.conftest import rel_error

aten = torch.ops.aten
ISA = detect()
NEEDS_AVX2 = pytest.mark.skipif(ISA.vector_isa not in ("avx2", "avx512"), reason=f"no AVX2 here ({ISA.describe()})")


def hqq_model(model, x, fmt: WeightFormat):
    """Captured `model` with every linear weight HQQ-quantized in `fmt` and packed (dequantize + linear)."""
    gm = pt2q.capture(model, (x,))
    quantized = {node.name: hqq_quantize(gm.get_parameter(node.args[1].target), fmt)
                 for node in gm.graph.nodes if node.target is aten.linear.default}
    assert all(q.zero_point.dtype == torch.float32 for q in quantized.values())
    assert any(not torch.equal(q.zero_point, q.zero_point.round()) for q in quantized.values())
    PassManager([PackWeights(quantized)])(gm)
    return gm


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return TwoLinears().eval(), torch.randn(2, 3, 64)


@pytest.mark.parametrize("bits, kernel", [
    (4, INT4_KERNEL),
    pytest.param(4, PT2Q_INT4_AVX2, marks=NEEDS_AVX2),
    pytest.param(8, PT2Q_INT8_AVX2, marks=NEEDS_AVX2),
])
def test_float_zero_points_are_exact_in_each_kernel(bits, kernel, model_and_input):
    model, x = model_and_input
    gm = hqq_model(model, x, WeightFormat(bits=bits, group_size=32, sym=False))
    expected = _output(gm(x))
    out, report = lowered(gm, kernels=[kernel], activation_dtype=torch.float32)
    assert report.kernels() == {"linear": kernel, "linear_1": kernel}
    assert DEQUANTIZE_WEIGHT not in targets(out)
    assert rel_error(_output(out(x)), expected) < FP32_REL


def test_three_bit_hqq_keeps_dequantize_and_linear(model_and_input):
    model, x = model_and_input
    gm = hqq_model(model, x, WeightFormat(bits=3, group_size=32, sym=False))
    out, report = lowered(gm)
    assert all(not layer.lowered and "3-bit" in layer.reason for layer in report.layers.values())
    assert torch.equal(_output(out(x)), _output(gm(x)))


def test_inductor_compile_of_an_hqq_model(model_and_input, monkeypatch):
    """The one compiled test: W4 g32 HQQ through pt2q's Inductor compile, ATen's int4 kernel (bf16)."""
    monkeypatch.setenv("PT2Q_WEIGHT_ONLY_KERNELS", "aten")
    model, x = model_and_input
    qmodel = pt2q.quantize(model, pt2q.HQQConfig(bits=4, group_size=32), example_inputs=(x,), progress=False)
    before = targets(qmodel)
    expected = _output(qmodel(x))
    compiled = inductor.compile(qmodel, (x,))
    assert compiled.weight_only_kernels == {"linear": INT4_KERNEL, "linear_1": INT4_KERNEL}
    actual = _output(compiled(x))
    assert rel_error(actual, expected) < BF16_REL
    assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.9999
    assert targets(qmodel) == before and before.count(DEQUANTIZE_WEIGHT) == 2   # the caller's graph is unchanged

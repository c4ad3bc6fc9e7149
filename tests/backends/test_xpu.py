"""XPU backend on a machine without an Intel GPU: XPUQuantizer graphs (signed int8 activations) through
Inductor's CPU path, what oneDNN's CPU int8 kernels take, and `compile` refusing to pretend.

Measured here (torch 2.13, AVX512-VNNI; `make test-avx2` reruns it capped to AVX2):
- residual block (linear-relu-linear + residual add), signed int8 activations as they are: 2 oneDNN int8
  linears (one with the add fused as a binary post-op); compiled vs eager Q/DQ 5e-8 relative (bound 1e-4:
  fp32 rounding of the int32 -> fp32 rescale), vs fp32 2.7e-3 (bound 0.01), cosine vs fp32 > 0.9999.
- residual CNN, activations re-encoded as uint8 (oneDNN's CPU conv refuses int8): 3 int8 convs (one with
  the residual add fused) and 1 int8 linear; compiled vs eager Q/DQ 8e-8, vs fp32 7.7e-3 (bound 0.03).
Compiles are slow on 2 cores: two compiled models, each built once for the module.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pt2q
from pt2q.backends import xpu
from pt2q.backends.inductor import Int8SaturationWarning
from pt2q.errors import BackendUnavailable, ConfigError
from pt2q.graph import get_constant
from tests.backends.test_inductor import ResidualBlock
from tests.conftest import (
    DQ_PER_CHANNEL, DQ_PER_TENSOR, PROCESS_ISA, Q_PER_TENSOR, call, nodes_of, rel_error, requires_non_saturating_int8,
)
from tests.models import build

XPU = pt2q.StaticQuantConfig(backend="xpu")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def compile_recording_saturation(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = xpu.compile_on_cpu(*args, **kwargs)
    return compiled, [w for w in caught if issubclass(w.category, Int8SaturationWarning)]


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = ResidualBlock().eval()
    x = torch.randn(128, 64)
    qmodel = pt2q.quantize(model, XPU, [(x,)], progress=False)
    # the signed graph as it is (the default re-encodes activations as uint8: see compile_on_cpu)
    compiled, saturation = compile_recording_saturation(qmodel, (x,), uint8_activations=False)
    return model, qmodel, x, compiled, saturation


@pytest.fixture(scope="module")
def cnn():
    zoo = build("cnn")
    qmodel = pt2q.quantize(zoo.model, XPU, [zoo.args], progress=False)
    compiled, saturation = compile_recording_saturation(qmodel, zoo.args)  # default: uint8 re-encoding
    assert compiled.options["uint8_activations"] is True
    return zoo, qmodel, compiled, saturation


# -- the graph ----------------------------------------------------------------------------------------
def test_xpu_graph_has_signed_int8_activations_and_int8_per_channel_weights(block):
    _, qmodel, _, _, _ = block
    activations = nodes_of(qmodel, Q_PER_TENSOR, DQ_PER_TENSOR)
    assert len(activations) == 4  # the inputs of up (LayerNorm output) and down (ReLU output): a Q/DQ pair each
    for node in activations:
        _, scale, zero_point, quant_min, quant_max, dtype = node.args
        assert (quant_min, quant_max, dtype) == (-128, 127, torch.int8), node.format_node()
        assert scale > 0 and -128 <= zero_point <= 127
    weights = nodes_of(qmodel, DQ_PER_CHANNEL)
    assert len(weights) == 2
    for dequantize in weights:
        assert dequantize.args[3:] == (0, -128, 127, torch.int8)  # axis 0: one scale per output channel
        assert get_constant(qmodel, dequantize.args[0]).dtype == torch.int8
        assert torch.count_nonzero(get_constant(qmodel, dequantize.args[2])) == 0  # symmetric


# -- signed int8 linears on the CPU path, as they are -------------------------------------------------
def test_signed_linears_lower_to_onednn_int8_kernels(block):
    _, _, _, compiled, _ = block
    assert compiled.int8_kernels == {"qlinear_pointwise.tensor": 1, "qlinear_pointwise.binary_tensor": 1}
    assert compiled.options["device"] == "cpu"
    assert compiled.options["uint8_activations"] is False and compiled.options["signed_conv_inputs"] == []


@requires_non_saturating_int8
def test_signed_linears_match_eager_qdq_and_fp32(block):
    model, qmodel, x, compiled, _ = block
    original = x.clone()
    with torch.no_grad():
        expected = model(x)
        # 3x: outside the calibrated range the fused int8 output quantize clamps to [-128, 127], the
        # graph's own range, so compiled and eager still agree
        for probe in (x, 3 * x):
            assert rel_error(compiled(probe), call(qmodel, (probe,))) < 1e-4
        assert rel_error(compiled(x), expected) < 0.01
        assert cosine(compiled(x), expected) > 0.9999
    assert torch.equal(x, original) and compiled.guarded_inputs == ["x"]


def test_saturation_warning_only_where_int8_saturates(block):
    _, _, _, _, saturation = block
    assert len(saturation) == (1 if PROCESS_ISA.int8_saturates else 0), [str(w.message) for w in saturation]


# -- convs: oneDNN's CPU int8 conv takes uint8 only -----------------------------------------------------
def test_upstream_cpu_int8_kernels_take_signed_linear_inputs_but_not_conv_inputs():
    """Pins the oneDNN (ATen) CPU behaviour behind `uint8_activations`. If the conv starts accepting int8,
    upstream changed and the re-encoding may go. Values stay small (activations |q| <= 32, so at most 160
    once shifted to uint8; weights |w| <= 64) so that no int16 pair sum can saturate on any CPU
    (2 * 160 * 64 < 32767): both kernels must then be exact."""
    torch.manual_seed(0)
    x_scale, w_scale = 0.02, torch.full((8,), 0.01)
    zeros = torch.zeros(8, dtype=torch.long)
    qx = torch.randint(-32, 33, (4, 64), dtype=torch.int8)
    qw = torch.randint(-64, 65, (8, 64), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(qw, [4, 64])
    out = torch.ops.onednn.qlinear_pointwise.tensor(qx, torch.tensor(x_scale), torch.tensor(0), packed, w_scale,
                                                    zeros, None, 1.0, 0, torch.float32, "none", [], "")
    reference = (qx.double() * x_scale) @ (qw.double() * w_scale[:, None]).T
    assert rel_error(out, reference) < 1e-6

    image = torch.randint(-32, 33, (1, 4, 6, 6), dtype=torch.int8)
    kernel = torch.randint(-64, 65, (8, 4, 3, 3), dtype=torch.int8)
    conv_packed = torch.ops.onednn.qconv_prepack(kernel, w_scale, x_scale, 0, [1, 1], [1, 1], [1, 1], 1, [1, 4, 6, 6])

    def conv(q, zero_point):
        return torch.ops.onednn.qconv_pointwise.tensor(
            q, torch.tensor(x_scale), torch.tensor(zero_point), conv_packed, w_scale, zeros, None, [1, 1], [1, 1],
            [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")

    with pytest.raises(RuntimeError, match=r"Input tensor should have uint8 \(unsigned char\) or fp8 data type"):
        conv(image, 0)
    shifted = conv((image.to(torch.int16) + 128).to(torch.uint8), 128)  # what activations_as_uint8 does
    reference = F.conv2d(image.double() * x_scale, kernel.double() * w_scale.double()[:, None, None, None], padding=1)
    assert rel_error(shifted, reference) < 1e-6


def test_signed_conv_inputs_are_refused_by_name(cnn):
    _, qmodel, _, _ = cnn
    assert xpu.signed_int8_conv_inputs(qmodel) == ["conv2d", "conv2d_1", "conv2d_2"]
    with pytest.raises(BackendUnavailable, match=r"3 conv\(s\) \(conv2d, conv2d_1, conv2d_2\) read signed int8 "
                                                 r"activations.*uint8_activations=True"):
        xpu.compile_on_cpu(qmodel, ((torch.randn(2, 3, 32, 32),)), uint8_activations=False)


def test_uint8_reencoding_is_exact_and_leaves_the_model_alone(cnn):
    zoo, qmodel, _, _ = cnn
    before = [node.args for node in nodes_of(qmodel, Q_PER_TENSOR, DQ_PER_TENSOR)]
    reencoded = xpu.activations_as_uint8(qmodel)
    assert reencoded is not qmodel
    activations = nodes_of(reencoded, Q_PER_TENSOR, DQ_PER_TENSOR)
    assert [node.args[2:] for node in activations] == [
        (zero_point + 128, low + 128, high + 128, torch.uint8) for _, _, zero_point, low, high, _ in before]
    assert [node.args[1] for node in activations] == [args[1] for args in before]  # same scales
    assert [node.args[3:] for node in nodes_of(reencoded, DQ_PER_CHANNEL)] == [(0, -128, 127, torch.int8)] * 4
    assert torch.equal(call(reencoded, zoo.args), call(qmodel, zoo.args))
    assert [node.args for node in nodes_of(qmodel, Q_PER_TENSOR, DQ_PER_TENSOR)] == before
    assert xpu.activations_as_uint8(reencoded) is reencoded  # nothing signed left


def test_reencoded_conv_net_runs_on_int8_conv_kernels(cnn):
    zoo, qmodel, compiled, saturation = cnn
    kernels = compiled.int8_kernels
    assert sum(n for name, n in kernels.items() if name.startswith("qconv")) == 3, kernels
    assert any(name.startswith("qconv") and "binary" in name for name in kernels), kernels  # residual add fused
    assert sum(n for name, n in kernels.items() if name.startswith("qlinear")) == 1, kernels
    assert compiled.options["signed_conv_inputs"] == ["conv2d", "conv2d_1", "conv2d_2"]
    # uint8 x full-range int8 weights: at risk exactly where this CPU's int8 pair sums saturate
    assert bool(saturation) is PROCESS_ISA.int8_saturates
    assert all(node.args[-1] == torch.int8 for node in nodes_of(qmodel, Q_PER_TENSOR))  # the model is still signed


@requires_non_saturating_int8
def test_reencoded_conv_net_matches_eager_qdq_and_fp32(cnn):
    zoo, qmodel, compiled, _ = cnn
    with torch.no_grad():
        assert rel_error(compiled(*zoo.args), call(qmodel, zoo.args)) < 1e-4
        assert rel_error(compiled(*zoo.args), zoo.run()) < 0.03
        assert cosine(compiled(*zoo.args), zoo.run()) > 0.999


def test_conv3d_stays_float_and_is_not_refused():
    class Volume(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    args = (torch.randn(1, 2, 6, 6, 6),)
    qmodel = pt2q.quantize(Volume().eval(), XPU, [args], progress=False)
    assert pt2q.count_quantized_layers(qmodel) == 1 and xpu.signed_int8_conv_inputs(qmodel) == []


def test_bad_option_is_named(block):
    _, qmodel, x, _, _ = block
    with pytest.raises(ConfigError, match=r"uint8_activations='yes' must be a bool"):
        xpu.compile_on_cpu(qmodel, (x,), uint8_activations="yes")


# -- the XPU path itself ---------------------------------------------------------------------------------
@pytest.mark.skipif(torch.xpu.is_available(), reason="an XPU is present: compile runs for real")
def test_compile_raises_without_an_xpu_device(block):
    _, qmodel, x, _, _ = block
    with pytest.raises(BackendUnavailable, match=r"no XPU device is present \(torch\.xpu\.is_available\(\) is False"
                                                 r".*pt2q\.backends\.inductor\.compile.*compile_on_cpu"):
        xpu.compile(qmodel, (x,))


def test_compile_refuses_what_cannot_run_on_an_xpu(block):
    model, _, x, _, _ = block
    with pytest.raises(TypeError, match="takes the torch.fx.GraphModule"):
        xpu.compile(model, (x,))
    weight_only = pt2q.quantize(model, pt2q.WeightOnlyQuantConfig(), progress=False, example_inputs=(x,))
    with pytest.raises(BackendUnavailable, match=r"weight-only layer\(s\).*pt2q.backends.inductor.compile"):
        xpu.compile(weight_only, (x,))


class WithPositions(torch.nn.Module):
    """A buffer, a parameter, and a factory op that torch.export bakes `device=cpu` into."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.register_buffer("table", torch.randn(8, 16))

    def forward(self, x):
        return self.linear(x + self.table[torch.arange(x.shape[0], device=x.device)])


def test_graph_on_device_moves_every_tensor_and_device_argument_of_a_copy():
    """What compile does before Inductor, checked with the meta device (no XPU here)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    qmodel = pt2q.quantize(WithPositions().eval(), XPU, [(x,)], progress=False)
    expected = call(qmodel, (x,))
    tensors = {node.target: get_constant(qmodel, node) for node in qmodel.graph.find_nodes(op="get_attr")}
    pointers = {name: tensor.data_ptr() for name, tensor in tensors.items()}

    moved = xpu.graph_on_device(qmodel, "meta")
    for node in moved.graph.find_nodes(op="get_attr"):
        assert get_constant(moved, node).device.type == "meta", node.target
    devices = [node.kwargs["device"] for node in moved.graph.nodes if "device" in node.kwargs]
    assert devices == [torch.device("meta")]
    out = call(moved, (x.to("meta"),))
    assert out.device.type == "meta" and out.shape == expected.shape

    assert [node.kwargs["device"] for node in qmodel.graph.nodes if "device" in node.kwargs] == [torch.device("cpu")]
    for node in qmodel.graph.find_nodes(op="get_attr"):
        tensor = get_constant(qmodel, node)
        assert tensor is tensors[node.target] and tensor.data_ptr() == pointers[node.target]
    assert torch.equal(call(qmodel, (x,)), expected)

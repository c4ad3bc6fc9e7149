"""FP8Quantizer / FP8Config: the FP8 Q/DQ graph form, numerics against fp32, set_local, torchao's flow."""
from __future__ import annotations

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

import pt2q
from pt2q import fp8
from pt2q.graph import get_constant
from pt2q.ops import CHOOSE_FP8_SCALE, DEQUANTIZE_FP8, QUANTIZE_FP8
from pt2q.quantizers import FP8Quantizer, fp8_scheme
from tests.conftest import ModelSnapshot, call, count_of, fp32_weighted_layers, nodes_of, rel_error

LINEAR = torch.ops.aten.linear.default


def quantize(zm, config, batches=None):
    batches = batches or [zm.kwargs or zm.args]
    if config.activation == "dynamic":
        return pt2q.quantize(zm.model, config, example_inputs=zm.kwargs or zm.args, progress=False)
    return pt2q.quantize(zm.model, config, batches, progress=False)


def test_is_a_torchao_quantizer_usable_with_prepare_convert_pt2e(zoo):
    zm = zoo("mlp")
    assert issubclass(FP8Quantizer, Quantizer)
    quantizer = FP8Quantizer().set_global(fp8_scheme(torch.float8_e4m3fn, "gaudi2"))
    prepared = prepare_pt2e(pt2q.capture(zm.model, zm.args), quantizer)
    call(prepared, zm.args)
    converted = convert_pt2e(prepared)
    assert count_of(converted, DEQUANTIZE_FP8) == 6 and count_of(converted, QUANTIZE_FP8) == 3
    # E4M3 rounding errs by up to 2**-4 per value (about 2.5% RMS), on activations and weights, over 3
    # layers of a random MLP whose outputs are small sums of cancelling terms
    assert rel_error(call(converted, zm.args), zm.run()) < 0.08


@pytest.mark.parametrize("dtype, saturation", [("e4m3", 240.0), ("e5m2", 57344.0)])
def test_static_graph_form(zoo, dtype, saturation):
    zm = zoo("mlp")
    qmodel = quantize(zm, pt2q.FP8Config(dtype=dtype))
    linears = nodes_of(qmodel, LINEAR)
    assert len(linears) == 3 and pt2q.count_quantized_layers(qmodel) == 3
    assert fp32_weighted_layers(qmodel) == []
    torch_dtype = fp8.FP8_DTYPES[dtype]
    for linear in linears:
        activation, weight = linear.args[0], linear.args[1]
        assert activation.target is DEQUANTIZE_FP8 and weight.target is DEQUANTIZE_FP8
        quantized = activation.args[0]
        assert quantized.target is QUANTIZE_FP8 and quantized.args[2:] == (torch_dtype, saturation)
        assert get_constant(qmodel, quantized.args[1]).shape == ()
        stored, scale = get_constant(qmodel, weight.args[0]), get_constant(qmodel, weight.args[1])
        assert stored.dtype is torch_dtype and scale.shape == (stored.shape[0], 1)
    assert qmodel.meta["pt2q_fp8"]["device"] == "gaudi2"


def test_weights_are_cast_with_their_per_channel_maxabs_hw_scale(zoo):
    zm = zoo("mlp")
    qmodel = quantize(zm, pt2q.FP8Config())
    weight_node = nodes_of(qmodel, LINEAR)[0].args[1]
    stored, scale = get_constant(qmodel, weight_node.args[0]), get_constant(qmodel, weight_node.args[1])
    weight = zm.model[0].weight.detach()
    expected_scale = fp8.compute_scale(weight.abs().amax(dim=1), "maxabs_hw", torch.float8_e4m3fn, "gaudi2", 0.5)
    assert torch.equal(scale.reshape(-1), expected_scale)
    expected = fp8.quantize(weight, expected_scale.reshape(-1, 1), torch.float8_e4m3fn, 240.0)
    assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))


def test_per_tensor_weights_and_dynamic_activations(zoo):
    zm = zoo("mlp")
    qmodel = quantize(zm, pt2q.FP8Config(weight_granularity="per_tensor", activation="dynamic"))
    assert count_of(qmodel, CHOOSE_FP8_SCALE) == 3
    for linear in nodes_of(qmodel, LINEAR):
        assert get_constant(qmodel, linear.args[1].args[1]).shape == ()
        assert linear.args[0].args[0].args[1].target is CHOOSE_FP8_SCALE
    assert rel_error(call(qmodel, zm.args), zm.run()) < 0.08


@pytest.mark.parametrize("config, tolerance", [
    (pt2q.FP8Config(), 0.04), (pt2q.FP8Config(device="gaudi3"), 0.04), (pt2q.FP8Config(dtype="e5m2"), 0.08),
    (pt2q.FP8Config(scale_method="maxabs"), 0.04), (pt2q.FP8Config(scale_method="maxabs_pow2"), 0.04),
    (pt2q.FP8Config(scale_method="unit", device="gaudi3"), 0.2),
])
def test_bert_numerics_against_fp32(zoo, config, tolerance):
    # Relative L2 error of the last hidden state. E4M3 keeps 3 mantissa bits (<= 6% per value, far less
    # on average), E5M2 two; "unit" scales leave small activations in E4M3's subnormal range.
    zm = zoo("bert")
    qmodel = quantize(zm, config)
    assert pt2q.count_quantized_layers(qmodel) == zm.num_quantizable
    error = rel_error(zm.output_fn(call(qmodel, zm.args, zm.kwargs)), zm.run())
    assert error < tolerance


def test_attention_matmul_opt_in_quantizes_both_inputs():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.matmul(self.q(x), self.k(x).transpose(-1, -2))

    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 8, 16)
    plain = pt2q.quantize(model, pt2q.FP8Config(), [(x,)], progress=False)
    opted = pt2q.quantize(model, pt2q.FP8Config(quantize_attention_matmul=True), [(x,)], progress=False)
    assert count_of(plain, QUANTIZE_FP8) == 1  # the shared input of q and k (one observer)
    matmul = nodes_of(opted, torch.ops.aten.matmul.default)[0]
    assert all(arg.target is DEQUANTIZE_FP8 for arg in matmul.args)
    assert rel_error(call(opted, (x,)), model(x).detach()) < 0.08


def test_set_local_keeps_a_layer_float_and_gives_another_its_own_config(zoo):
    zm = zoo("mlp")
    config = pt2q.FP8Config().set_local("0", None).set_local("4", pt2q.FP8Config(dtype="e5m2"))
    qmodel = quantize(zm, config)
    assert pt2q.count_quantized_layers(qmodel) == 2
    dtypes = [n.args[2] for n in nodes_of(qmodel, QUANTIZE_FP8)]
    assert dtypes == [torch.float8_e4m3fn, torch.float8_e5m2]


def test_the_model_is_untouched(zoo):
    zm = zoo("bert")
    snapshot = ModelSnapshot(zm.model)
    quantize(zm, pt2q.FP8Config())
    snapshot.assert_unchanged()


def test_convert_without_calibration_names_the_input():
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    prepared = pt2q.prepare(model, pt2q.FP8Config(), (x,))
    with pytest.raises(pt2q.CalibrationError, match="never observed"):
        pt2q.convert(prepared)


@pytest.mark.parametrize("fields, match", [
    ({"dtype": "e3m4"}, "'e4m3' .*'e5m2'"),
    ({"dtype": torch.int8}, "not an FP8 format"),
    ({"scale_method": "maxabs_pts"}, "'unit', 'maxabs', 'maxabs_pow2', 'maxabs_hw'"),
    ({"device": "gaudi1"}, "'gaudi2', 'gaudi3', 'generic'"),
    ({"device": "generic"}, "maxabs_hw.*needs device"),
    ({"activation": "per_token"}, "'static', 'dynamic'"),
    ({"weight_backoff": 0}, "weight_backoff"),
    ({"dtpye": "e4m3"}, "did you mean 'dtype'"),
])
def test_bad_configs_list_the_choices(fields, match):
    with pytest.raises(pt2q.ConfigError, match=match):
        pt2q.FP8Config(**fields)


def test_set_local_must_keep_the_device():
    with pytest.raises(pt2q.ConfigError, match="device 'gaudi3' differs"):
        pt2q.FP8Config().set_local("fc", pt2q.FP8Config(device="gaudi3"))
    with pytest.raises(pt2q.ConfigError, match="another FP8Config or None"):
        pt2q.FP8Config().set_local("fc", pt2q.StaticQuantConfig())


def test_save_load_round_trip(zoo, tmp_path):
    zm = zoo("mlp")
    qmodel = quantize(zm, pt2q.FP8Config())
    pt2q.save(qmodel, tmp_path / "fp8.pt2")
    loaded = pt2q.load(tmp_path / "fp8.pt2")
    assert torch.equal(call(loaded, zm.args), call(qmodel, zm.args))
    assert count_of(loaded, QUANTIZE_FP8) == 3

"""X86Quantizer: a torchao Quantizer usable with torchao's own prepare_pt2e / convert_pt2e."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

import pt2q
from pt2q import ConfigError, X86Quantizer
from pt2q.graph import get_constant
from tests.conftest import (
    CHOOSE_QPARAMS, DQ_PER_CHANNEL, DQ_PER_TENSOR, DQ_PER_TENSOR_DYN, Q_PER_TENSOR, Q_PER_TENSOR_DYN,
    ModelSnapshot, call, count_of, nodes_of, rel_error,
)

aten = torch.ops.aten


def torchao_flow(model, args, kwargs, quantizer):
    prepared = prepare_pt2e(pt2q.capture(model, args, kwargs), quantizer)
    with torch.no_grad():
        prepared(*args, **kwargs)
    return convert_pt2e(prepared)


def test_is_a_torchao_quantizer():
    assert issubclass(X86Quantizer, Quantizer)
    assert X86Quantizer.activation_dtype is torch.uint8


def test_torchao_prepare_convert_on_mlp(zoo):
    zm = zoo("mlp")  # Linear, ReLU, Linear, GELU, Linear
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, X86Quantizer().set_global(X86Quantizer.static_scheme()))
    assert count_of(converted, Q_PER_TENSOR) == 3  # one per linear input
    assert count_of(converted, DQ_PER_TENSOR) == 3
    assert count_of(converted, DQ_PER_CHANNEL) == 3  # one per weight
    assert count_of(converted, CHOOSE_QPARAMS, Q_PER_TENSOR_DYN) == 0
    assert pt2q.count_quantized_layers(converted) == 3
    assert rel_error(call(converted, zm.args), zm.run()) < 0.03


def test_torchao_prepare_convert_on_bert(zoo):
    zm = zoo("bert")
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, X86Quantizer().set_global(X86Quantizer.static_scheme()))
    assert pt2q.count_quantized_layers(converted) == zm.num_quantizable == 13
    assert count_of(converted, DQ_PER_CHANNEL) == 13
    assert rel_error(zm.output_fn(call(converted, zm.args, zm.kwargs)), zm.run()) < 0.03


def test_activations_are_uint8_full_range(zoo):
    zm = zoo("mlp")
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, X86Quantizer().set_global(X86Quantizer.static_scheme()))
    for node in nodes_of(converted, Q_PER_TENSOR, DQ_PER_TENSOR):
        _, scale, zero_point, quant_min, quant_max, dtype = node.args
        assert (quant_min, quant_max, dtype) == (0, 255, torch.uint8)
        assert isinstance(scale, float) and scale > 0 and 0 <= zero_point <= 255
    # the first input is centred random data: an affine zero point near the middle
    first = nodes_of(converted, Q_PER_TENSOR)[0]
    assert 96 <= first.args[2] <= 160
    # after relu the range starts at 0: zero point 0
    relu = nodes_of(converted, aten.relu.default)[0]
    assert [u for u in relu.users][0].args[2] == 0


def test_weights_int8_per_channel_symmetric(zoo):
    zm = zoo("mlp")
    full_range = X86Quantizer.static_scheme(saturation_guard="off")  # "auto" narrows them where int8 saturates
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, X86Quantizer().set_global(full_range))
    linears = nodes_of(converted, aten.linear.default)
    for linear, layer in zip(linears, [zm.model[0], zm.model[2], zm.model[4]]):
        dequant = linear.args[1]
        assert dequant.target is DQ_PER_CHANNEL
        q_weight, scale, zero_point, axis, quant_min, quant_max, dtype = dequant.args
        assert (axis, quant_min, quant_max, dtype) == (0, -128, 127, torch.int8)
        int_weight = get_constant(converted, q_weight)
        scales, zero_points = get_constant(converted, scale), get_constant(converted, zero_point)
        assert int_weight.dtype == torch.int8 and int_weight.shape == layer.weight.shape
        assert scales.shape == (layer.out_features,)
        assert torch.count_nonzero(zero_points) == 0  # symmetric
        expected = layer.weight.detach().abs().amax(dim=1) / 127.5
        torch.testing.assert_close(scales, expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(int_weight.float() * scales[:, None], layer.weight.detach(),
                                   atol=scales.max().item(), rtol=0)


def test_per_tensor_weights():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    quantizer = X86Quantizer().set_global(X86Quantizer.static_scheme(per_channel=False, saturation_guard="off"))
    converted = torchao_flow(model, (torch.randn(2, 8),), {}, quantizer)
    assert count_of(converted, DQ_PER_CHANNEL) == 0
    weight_dq = nodes_of(converted, aten.linear.default)[0].args[1]
    assert weight_dq.target is DQ_PER_TENSOR
    assert weight_dq.args[2:] == (0, -128, 127, torch.int8)
    assert pt2q.count_quantized_layers(converted) == 1


def test_conv_weights_per_output_channel():
    model = nn.Sequential(nn.Conv2d(3, 6, 3)).eval()
    converted = torchao_flow(model, (torch.randn(1, 3, 8, 8),), {},
                             X86Quantizer().set_global(X86Quantizer.static_scheme()))
    dequant = nodes_of(converted, aten.conv2d.default)[0].args[1]
    assert dequant.target is DQ_PER_CHANNEL and dequant.args[3] == 0
    assert get_constant(converted, dequant.args[1]).shape == (6,)


def test_dynamic_scheme(zoo):
    zm = zoo("mlp")
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, X86Quantizer().set_global(X86Quantizer.dynamic_scheme()))
    assert count_of(converted, CHOOSE_QPARAMS) == 3
    assert count_of(converted, Q_PER_TENSOR_DYN) == 3 and count_of(converted, DQ_PER_TENSOR_DYN) == 3
    assert count_of(converted, Q_PER_TENSOR, DQ_PER_TENSOR) == 0  # no calibrated activation scale
    assert count_of(converted, DQ_PER_CHANNEL) == 3  # weights are still static int8
    for choose in nodes_of(converted, CHOOSE_QPARAMS):
        assert choose.args[1:3] == (0, 255) and choose.args[-1] == torch.uint8
    assert rel_error(call(converted, zm.args), zm.run()) < 0.03
    assert X86Quantizer.dynamic_scheme().is_dynamic and not X86Quantizer.static_scheme().is_dynamic


def test_no_global_means_nothing_quantized(zoo):
    zm = zoo("mlp")
    prepared = prepare_pt2e(pt2q.capture(zm.model, zm.args), X86Quantizer())
    assert not any(n.op == "call_module" and "activation_post_process" in n.target for n in prepared.graph.nodes)


# -- precedence -------------------------------------------------------------------------------------
def _annotated_linears(quantizer, zm):
    prepare_pt2e(pt2q.capture(zm.model, zm.args), quantizer)
    return sorted(name for name, rule in quantizer.annotated_nodes.items() if rule == "linear")


def test_set_op_type_beats_set_global(zoo):
    zm = zoo("mlp")
    static = X86Quantizer.static_scheme()
    quantizer = X86Quantizer().set_global(static).set_op_type(nn.Linear, None)
    assert _annotated_linears(quantizer, zm) == []
    quantizer = X86Quantizer().set_global(static).set_op_type(aten.linear.default, None)
    assert _annotated_linears(quantizer, zm) == []
    quantizer = X86Quantizer().set_global(None).set_op_type(aten.linear, static)
    assert _annotated_linears(quantizer, zm) == ["linear", "linear_1", "linear_2"]


def test_set_module_name_beats_set_op_type(zoo):
    zm = zoo("mlp")
    static = X86Quantizer.static_scheme()
    quantizer = X86Quantizer().set_global(static).set_op_type(nn.Linear, None).set_module_name("2", static)
    assert _annotated_linears(quantizer, zm) == ["linear_1"]
    quantizer = X86Quantizer().set_global(static).set_module_name("2", None).set_op_type(nn.Linear, static)
    assert _annotated_linears(quantizer, zm) == ["linear", "linear_2"]


def test_later_rules_of_the_same_kind_win(zoo):
    zm = zoo("mlp")
    static = X86Quantizer.static_scheme()
    quantizer = X86Quantizer().set_global(static).set_module_name("[024]", None).set_module_name("4", static)
    assert _annotated_linears(quantizer, zm) == ["linear_2"]


def test_module_rule_picks_the_scheme(zoo):
    zm = zoo("mlp")
    quantizer = X86Quantizer().set_global(X86Quantizer.static_scheme()).set_module_name(
        "0", X86Quantizer.dynamic_scheme())
    converted = torchao_flow(zm.model, zm.args, zm.kwargs, quantizer)
    assert count_of(converted, CHOOSE_QPARAMS) == 1 and count_of(converted, Q_PER_TENSOR) == 2


def test_configuration_errors():
    quantizer = X86Quantizer()
    with pytest.raises(ConfigError, match="not a valid regex"):
        quantizer.set_module_name("([", None)
    with pytest.raises(ConfigError, match="ATen op or an nn.Module subclass"):
        quantizer.set_op_type("linear", None)
    with pytest.raises(ConfigError, match="QuantScheme"):
        quantizer.set_global(pt2q.StaticQuantConfig())
    with pytest.raises(ConfigError, match="unknown activation observer"):
        X86Quantizer.static_scheme(observer="percentile")


def test_validate_rejects_integer_inputs_annotated_by_someone_else(zoo):
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    zm = zoo("bert")
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs)
    embedding = next(n for n in gm.graph.nodes if n.target is aten.embedding.default)
    ids = embedding.args[1]
    embedding.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={ids: X86Quantizer.static_scheme().activation}, _annotated=True)
    with pytest.raises(ConfigError, match=f"input {ids.name} is not a float tensor"):
        X86Quantizer().set_global(X86Quantizer.static_scheme()).validate(gm)


# -- GPT-2: addmm -> linear -------------------------------------------------------------------------
def test_gpt2_addmm_is_rewritten_and_quantized(zoo):
    zm = zoo("gpt2")
    snap = ModelSnapshot(zm.model)
    weights = {name: p for name, p in zm.model.named_parameters() if name.endswith("c_attn.weight")}
    assert all(w.shape == (32, 96) for w in weights.values())  # Conv1D stores [in, out]
    captured = pt2q.capture(zm.model, zm.args, zm.kwargs)
    assert count_of(captured, aten.addmm.default) == zm.num_quantizable == 8
    assert count_of(captured, aten.linear.default) == 0

    quantizer = X86Quantizer().set_global(X86Quantizer.static_scheme())
    transformed = quantizer.transform_for_annotation(pt2q.capture(zm.model, zm.args, zm.kwargs))
    assert count_of(transformed, aten.addmm.default) == 0
    assert count_of(transformed, aten.linear.default) == 8

    converted = torchao_flow(zm.model, zm.args, zm.kwargs, quantizer)
    assert list(quantizer.annotated_nodes.values()).count("linear") == 8
    assert count_of(converted, aten.addmm.default) == 0
    assert pt2q.count_quantized_layers(converted) == 8
    for linear in nodes_of(converted, aten.linear.default):
        dequant = linear.args[1]
        assert get_constant(converted, dequant.args[0]).shape[0] == get_constant(converted, dequant.args[1]).numel()
    assert rel_error(zm.output_fn(call(converted, zm.args, zm.kwargs)), zm.run()) < 0.03
    snap.assert_unchanged()  # the user's Conv1D weights: same tensors, same [in, out] values
    assert all(w.shape == (32, 96) for w in weights.values())


def test_weight_only_never_quantizes_activations(zoo):
    """Pooling/flatten propagation must not hand a weight-only layer's weight spec to activations
    (the CNN's relu -> pool -> flatten -> head chain once got per-channel int8 activations)."""
    zm = zoo("cnn")
    qmodel = pt2q.quantize(zm.model, pt2q.WeightOnlyQuantConfig(), example_inputs=zm.args, progress=False)
    quantize_ops = [n for n in qmodel.graph.nodes if n.op == "call_function" and "quantize_per" in str(n.target)
                    and "dequantize" not in str(n.target)]
    assert quantize_ops == []  # weights are folded to int8 constants; nothing quantizes at run time
    assert pt2q.count_quantized_layers(qmodel) == zm.num_quantizable

"""XPUQuantizer: signed int8 activations, otherwise the X86 rules (run here by CPU emulation)."""
from __future__ import annotations

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

import pt2q
from pt2q import X86Quantizer, XPUQuantizer
from pt2q.graph import get_constant
from tests.conftest import (
    CHOOSE_QPARAMS, DQ_PER_CHANNEL, DQ_PER_TENSOR, Q_PER_TENSOR, Q_PER_TENSOR_DYN, call, count_of, nodes_of,
    rel_error,
)


def torchao_flow(zm, quantizer):
    prepared = prepare_pt2e(pt2q.capture(zm.model, zm.args, zm.kwargs), quantizer)
    with torch.no_grad():
        prepared(*zm.args, **zm.kwargs)
    return convert_pt2e(prepared)


def test_is_a_torchao_quantizer():
    assert issubclass(XPUQuantizer, Quantizer)
    assert XPUQuantizer.activation_dtype is torch.int8
    assert XPUQuantizer.static_scheme().activation.dtype == torch.int8


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert"])
def test_activations_int8_full_range(zoo, name):
    zm = zoo(name)
    converted = torchao_flow(zm, XPUQuantizer().set_global(XPUQuantizer.static_scheme()))
    activations = nodes_of(converted, Q_PER_TENSOR, DQ_PER_TENSOR)
    assert activations
    for node in activations:
        _, scale, zero_point, quant_min, quant_max, dtype = node.args
        assert (quant_min, quant_max, dtype) == (-128, 127, torch.int8)
        assert scale > 0 and -128 <= zero_point <= 127
    assert pt2q.count_quantized_layers(converted) == zm.num_quantizable
    assert rel_error(zm.output_fn(call(converted, zm.args, zm.kwargs)), zm.run()) < 0.03


def test_same_structure_as_x86(zoo):
    zm = zoo("cnn")
    xpu = torchao_flow(zm, XPUQuantizer().set_global(XPUQuantizer.static_scheme()))
    # full range on both: "auto" would narrow x86's ranges on a CPU whose int8 kernels saturate
    x86 = torchao_flow(zm, X86Quantizer().set_global(X86Quantizer.static_scheme(saturation_guard="off")))
    assert [n.target for n in xpu.graph.nodes] == [n.target for n in x86.graph.nodes]
    # same ranges, shifted zero point: scales agree, zero points differ by 128
    for a, b in zip(nodes_of(xpu, Q_PER_TENSOR), nodes_of(x86, Q_PER_TENSOR)):
        assert a.args[1] == pytest.approx(b.args[1]) and a.args[2] == b.args[2] - 128


def test_weights_int8_per_channel_symmetric(zoo):
    zm = zoo("mlp")
    converted = torchao_flow(zm, XPUQuantizer().set_global(XPUQuantizer.static_scheme()))
    dequants = nodes_of(converted, DQ_PER_CHANNEL)
    assert len(dequants) == 3
    for dequant in dequants:
        assert dequant.args[3:] == (0, -128, 127, torch.int8)
        assert torch.count_nonzero(get_constant(converted, dequant.args[2])) == 0


def test_dynamic_scheme_int8(zoo):
    zm = zoo("mlp")
    converted = torchao_flow(zm, XPUQuantizer().set_global(XPUQuantizer.dynamic_scheme()))
    chooses = nodes_of(converted, CHOOSE_QPARAMS)
    assert len(chooses) == 3 and all(c.args[1:3] == (-128, 127) and c.args[-1] == torch.int8 for c in chooses)
    assert count_of(converted, Q_PER_TENSOR_DYN) == 3 and count_of(converted, Q_PER_TENSOR) == 0


def test_config_backend_xpu(zoo):
    zm = zoo("mlp")
    qmodel = pt2q.quantize(zm.model, pt2q.StaticQuantConfig(backend="xpu"), [zm.args], progress=False)
    assert all(n.args[-1] == torch.int8 for n in nodes_of(qmodel, Q_PER_TENSOR))
    assert pt2q.count_quantized_layers(qmodel) == 3

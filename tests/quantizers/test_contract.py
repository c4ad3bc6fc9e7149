"""The annotation contract of torchao's X86 Inductor flow, held by our quantizers.

torchao's passes and its Inductor lowering read more than the input specs: `_annotated` on every node
of a fused pattern, `_is_output_of_quantized_pattern` on the node whose value may be int8, and shared
observers around int8-in, int8-out ops. Each case below builds its own small model, runs torchao's
prepare_pt2e / convert_pt2e with our quantizer and checks what is annotated and how many Q/DQ nodes the
converted graph holds. (tools/torchao_x86_suite.py runs torchao's own test file against us.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.pt2e import ObserverBase
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from pt2q.quantizers import X86Quantizer, XPUQuantizer
from pt2q.quantizers.base import PatternAnnotation, TrainedRangeFakeQuantize
from tests.conftest import (CHOOSE_QPARAMS, DQ_PER_CHANNEL, DQ_PER_TENSOR, DQ_PER_TENSOR_DYN, Q_PER_TENSOR,
                            Q_PER_TENSOR_DYN, count_of, nodes_of, rel_error)

aten = torch.ops.aten
KEY = "quantization_annotation"
CONVERT_ELEMENT_TYPE = torch.ops.quantized_decomposed.convert_element_type.no_fuse


def run(model, args, quantizer, *, qat=False, strict=True):
    """export -> prepare(_qat)_pt2e -> one batch -> convert_pt2e; returns (prepared, converted)."""
    model = model.train() if qat else model.eval()
    exported = torch.export.export(model, args, strict=strict).module()
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, quantizer)
    prepared(*args)
    prepared_nodes = {n.name: n for n in prepared.graph.nodes}
    converted = convert_pt2e(prepared)
    return prepared_nodes, converted


def static(cls=X86Quantizer, **options):
    return cls(**options).set_global(cls.static_scheme(saturation_guard="off"))


def flags(graph, target):
    """(annotated, output of a quantized pattern) counts over the nodes of `target`."""
    annotations = [n.meta.get(KEY) for n in graph.graph.nodes if n.target == target]
    return (sum(bool(a and a._annotated) for a in annotations),
            sum(bool(getattr(a, "_is_output_of_quantized_pattern", False)) for a in annotations))


def qdq(graph):
    return count_of(graph, Q_PER_TENSOR), count_of(graph, DQ_PER_TENSOR), count_of(graph, DQ_PER_CHANNEL)


# -- conv and its post-ops ----------------------------------------------------------------------------
class ConvThenPool(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 5, 3, padding=1), act

    def forward(self, x):
        return F.max_pool2d(self.act(self.conv(x)), 2)


@pytest.mark.parametrize("act, op", [
    (nn.ReLU(), aten.relu.default), (nn.ReLU(inplace=True), aten.relu_.default),
    (nn.ReLU6(), aten.hardtanh.default), (nn.Hardtanh(0.0, 6.0), aten.hardtanh.default),
    (nn.Hardswish(), aten.hardswish.default), (nn.SiLU(), aten.silu.default)])
def test_conv_unary_then_pool_runs_the_pool_in_int8(act, op):
    _, converted = run(ConvThenPool(act), (torch.randn(2, 3, 8, 8),), static())
    # conv input; pool input and output (one observer: the pool's int8 in, int8 out)
    assert qdq(converted) == (3, 3, 1)
    assert flags(converted, aten.conv2d.default) == (1, 0)  # the chain continues past the conv
    assert flags(converted, op) == (1, 1)
    pool = nodes_of(converted, aten.max_pool2d.default)[0]
    assert pool.args[0].target is DQ_PER_TENSOR and pool.args[0].args[0].args[0].target is op  # q after the unary
    (after,) = pool.users
    assert after.target is Q_PER_TENSOR and after.args[1:3] == pool.args[0].args[1:3]


class ConvAdd(nn.Module):
    def __init__(self, both: bool, relu: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.both, self.relu = both, relu

    def forward(self, x):
        y = self.a(x) + (self.b(x) if self.both else torch.sigmoid(x))
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("both", [False, True])
def test_conv_add_quantizes_the_extra_input(both, relu):
    _, converted = run(ConvAdd(both, relu), (torch.randn(2, 4, 6, 6),), static())
    # input (shared by both convs) + the add's extra input; one DQ per conv input and one for the add
    assert qdq(converted) == (2, 3 if both else 2, 2 if both else 1)
    add = nodes_of(converted, aten.add.Tensor)[0]
    assert add.args[0].target is aten.conv2d.default and add.args[1].target is DQ_PER_TENSOR
    assert flags(converted, aten.add.Tensor) == (1, 0 if relu else 1)
    if relu:
        assert flags(converted, aten.relu.default) == (1, 1)
    # the conv whose output is the extra input is a pattern of its own, ending in int8
    assert flags(converted, aten.conv2d.default) == ((2, 1) if both else (1, 0))


def test_a_conv_with_two_users_leaves_the_add_to_the_next_conv():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return y + self.b(y)

    _, converted = run(Chain(), (torch.randn(1, 4, 6, 6),), static())
    add = nodes_of(converted, aten.add.Tensor)[0]
    first, second = nodes_of(converted, aten.conv2d.default)
    assert add.args[1] is second and add.args[0].target is DQ_PER_TENSOR  # b fused; a's output quantized
    assert qdq(converted) == (2, 3, 2)


# -- linear and its post-ops --------------------------------------------------------------------------
@pytest.mark.parametrize("act, op", [(nn.ReLU(), aten.relu.default), (nn.LeakyReLU(), aten.leaky_relu.default),
                                     (nn.Tanh(), aten.tanh.default), (nn.GELU(), aten.gelu.default),
                                     (nn.GELU("tanh"), aten.gelu.default)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_linear_unary(act, op, dynamic):
    quantizer = X86Quantizer().set_global(X86Quantizer.dynamic_scheme() if dynamic else X86Quantizer.static_scheme())
    _, converted = run(nn.Sequential(nn.Linear(6, 6), act), (torch.randn(3, 6),), quantizer)
    quant, dequant = (Q_PER_TENSOR_DYN, DQ_PER_TENSOR_DYN) if dynamic else (Q_PER_TENSOR, DQ_PER_TENSOR)
    assert (count_of(converted, quant), count_of(converted, dequant), count_of(converted, DQ_PER_CHANNEL)) == (1, 1, 1)
    assert count_of(converted, CHOOSE_QPARAMS) == int(dynamic)
    assert flags(converted, aten.linear.default) == (1, 0) and flags(converted, op) == (1, 1)


class LinearAdd(nn.Module):
    def __init__(self, both: bool, relu: bool):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.both, self.relu = both, relu

    def forward(self, x):
        y = self.a(x) + (self.b(x) if self.both else x)
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("both", [False, True])
def test_linear_add_keeps_the_extra_input_in_fp32(both, relu):
    _, converted = run(LinearAdd(both, relu), (torch.randn(2, 8),), static())
    assert qdq(converted) == (1, 2 if both else 1, 2 if both else 1)  # inputs only, never the add's
    assert flags(converted, aten.add.Tensor) == (1, 0 if relu else 1)
    assert flags(converted, aten.linear.default) == ((2, 1) if both else (1, 0))


def test_a_reused_layer_is_annotated_plainly_at_each_call_site():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            for _ in range(2):
                x = torch.relu(self.linear(x))
            return x

    _, converted = run(Loop(), (torch.randn(2, 8),), static(), strict=False)
    assert qdq(converted) == (2, 2, 2)
    assert flags(converted, aten.linear.default) == (2, 2) and flags(converted, aten.relu.default) == (0, 0)


# -- int8-in, int8-out recipes -------------------------------------------------------------------------
def observer_of(prepared_nodes, node_name, arg=0):
    return prepared_nodes[node_name].args[arg]


@pytest.mark.parametrize("pool, op", [(lambda y: F.max_pool2d(y, 2), aten.max_pool2d.default),
                                      (lambda y: F.avg_pool2d(y, 2), aten.avg_pool2d.default),
                                      (lambda y: F.adaptive_avg_pool2d(y, 1), aten.adaptive_avg_pool2d.default)])
def test_pooling_shares_one_observer_between_input_and_output(pool, op):
    class ConvPoolPow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return pool(self.conv(x)) ** 2  # pow takes fp32: a DQ after the int8 pool

    model = ConvPoolPow().eval()
    exported = torch.export.export(model, (torch.randn(1, 3, 9, 9),)).module()
    prepared = prepare_pt2e(exported, static())
    pool_node = next(n for n in prepared.graph.nodes if n.target is op)
    conv_node = next(n for n in prepared.graph.nodes if n.target is aten.conv2d.default)
    into, out_of = (getattr(prepared, pool_node.args[0].target), getattr(prepared, next(iter(pool_node.users)).target))
    assert isinstance(into, ObserverBase) and into is out_of
    assert getattr(prepared, conv_node.args[0].target) is not into
    prepared(torch.randn(1, 3, 9, 9))
    assert qdq(convert_pt2e(prepared)) == (3, 3, 1)


@pytest.mark.parametrize("inputs", ["two", "same", "single"])
def test_cat_shares_one_observer(inputs):
    class ConvCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            a = self.a(x)
            parts = {"two": [a, self.b(x)], "same": [a, a], "single": [a]}[inputs]
            return torch.cat(parts, dim=1)

    exported = torch.export.export(ConvCat().eval(), (torch.randn(1, 3, 5, 5),)).module()
    prepared = prepare_pt2e(exported, static())
    cat = next(n for n in prepared.graph.nodes if n.target is aten.cat.default)
    observers = {id(getattr(prepared, i.target)) for i in cat.args[0]}
    observers.add(id(getattr(prepared, next(iter(cat.users)).target)))
    assert len(observers) == 1


def test_flatten_runs_in_int8_only_before_a_quantized_op():
    class ConvFlatten(nn.Module):
        def __init__(self, then_linear: bool):
            super().__init__()
            self.conv, self.fc, self.then_linear = nn.Conv2d(3, 2, 3), nn.Linear(2 * 3 * 3, 4), then_linear

        def forward(self, x):
            y = torch.flatten(self.conv(x), 1)
            return self.fc(y) if self.then_linear else y.transpose(0, 1)

    _, to_linear = run(ConvFlatten(True), (torch.randn(2, 3, 5, 5),), static())
    assert flags(to_linear, aten.flatten.using_ints) == (1, 1)
    _, to_transpose = run(ConvFlatten(False), (torch.randn(2, 3, 5, 5),), static())
    assert flags(to_transpose, aten.flatten.using_ints) == (0, 0) and qdq(to_transpose) == (1, 1, 1)


# -- opt-in ops through set_op_type ------------------------------------------------------------------
def test_mul_of_two_activations_is_opt_in_through_set_op_type():
    class Mul(nn.Module):
        def forward(self, x, y):
            return x * y, x * 2.0

    args = (torch.randn(4, 4), torch.randn(4, 4))
    _, off = run(Mul(), args, static())
    assert qdq(off) == (0, 0, 0)
    quantizer = static().set_op_type(aten.mul.Tensor, X86Quantizer.static_scheme())
    _, on = run(Mul(), args, quantizer)
    assert qdq(on) == (2, 2, 0)  # x * y only: x * 2.0 has no second activation
    assert flags(on, aten.mul.Tensor) == (1, 1)


def test_attention_matmul_turns_on_through_set_op_type():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)), -1)

    quantizer = static().set_op_type(aten.matmul.default, X86Quantizer.static_scheme())
    _, converted = run(Scores(), (torch.randn(2, 5, 8),), quantizer)
    matmul = nodes_of(converted, aten.matmul.default)[0]
    assert all(a.target is DQ_PER_TENSOR for a in matmul.args)
    assert flags(converted, aten.matmul.default) == (1, 1)


# -- fp16 weights -------------------------------------------------------------------------------------
def test_float16_weights_for_linear_layers_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2))
    quantizer = X86Quantizer().set_global(X86Quantizer.float16_weight_scheme())
    _, converted = run(model, (torch.randn(2, 3, 5, 5),), quantizer)
    assert count_of(converted, CONVERT_ELEMENT_TYPE) == 4  # to fp16 and back, for each linear weight
    assert qdq(converted) == (0, 0, 0)
    conv = nodes_of(converted, aten.conv2d.default)[0]
    assert conv.args[1].op == "get_attr"  # the conv keeps its fp32 weight
    x = torch.randn(2, 3, 5, 5)
    assert rel_error(converted(x), model(x)) < 1e-3  # fp16 rounding only


# -- mixed configs in one model -----------------------------------------------------------------------
def test_static_dynamic_fp16_and_fp32_layers_in_one_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 4))
    quantizer = (X86Quantizer().set_global(X86Quantizer.static_scheme())
                 .set_module_name("2", X86Quantizer.dynamic_scheme())
                 .set_module_name("4", X86Quantizer.float16_weight_scheme())
                 .set_module_name("6", None))
    x = torch.randn(16, 8)
    _, converted = run(model, (x,), quantizer)
    linears = nodes_of(converted, aten.linear.default)
    assert linears[0].args[0].target is DQ_PER_TENSOR and linears[0].args[1].target is DQ_PER_CHANNEL
    assert linears[1].args[0].target is DQ_PER_TENSOR_DYN and count_of(converted, CHOOSE_QPARAMS) == 1
    assert linears[2].args[1].target is CONVERT_ELEMENT_TYPE
    assert linears[3].args[0].target is aten.relu.default and linears[3].args[1].op == "get_attr"
    assert rel_error(converted(x), model(x)) < 0.03


# -- QAT ----------------------------------------------------------------------------------------------
class ConvBn(nn.Module):
    def __init__(self, tail: str):
        super().__init__()
        self.conv, self.bn, self.tail = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), tail

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.tail == "relu":
            y = torch.relu(y)
        elif self.tail == "add":
            y = y + torch.sigmoid(x)
        elif self.tail == "add_relu":
            y = torch.relu(y + torch.sigmoid(x))
        return y


@pytest.mark.parametrize("cls", [X86Quantizer, XPUQuantizer])
@pytest.mark.parametrize("tail, expected", [("none", (2, 2, 1)), ("relu", (2, 2, 1)), ("add", (3, 3, 1)),
                                            ("add_relu", (3, 3, 1))])
def test_qat_conv_bn_is_folded_and_its_output_quantized(cls, tail, expected):
    quantizer = cls().set_global(cls.qat_scheme(saturation_guard="off"))
    prepared, converted = run(ConvBn(tail), (torch.randn(2, 3, 6, 6),), quantizer, qat=True)
    assert not [n for n in converted.graph.nodes if "batch_norm" in str(n.target)]
    assert qdq(converted) == expected  # input, extra input of the add, and the chain's output


def test_qat_schemes_use_fake_quantization():
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    def fake_quant_types(scheme):
        quantizer = X86Quantizer().set_global(scheme)
        exported = torch.export.export(nn.Sequential(nn.Linear(4, 4)).train(), (torch.randn(2, 4),)).module()
        prepared = prepare_qat_pt2e(exported, quantizer)
        return sorted({type(m).__name__ for m in prepared.modules()
                       if isinstance(m, (FakeQuantize, LearnableFakeQuantize))})

    assert fake_quant_types(X86Quantizer.qat_scheme()) == ["TrainedRangeFakeQuantize"]
    assert fake_quant_types(X86Quantizer.qat_scheme(ranges="learnable")) == [
        "LearnableFakeQuantize", "TrainedRangeFakeQuantize"]
    assert fake_quant_types(X86Quantizer.qat_scheme(dynamic=True)) == ["FakeQuantize", "TrainedRangeFakeQuantize"]
    assert X86Quantizer.qat_scheme().qat and not X86Quantizer.static_scheme().qat
    assert issubclass(TrainedRangeFakeQuantize, FusedMovingAvgObsFakeQuantize)


@pytest.mark.parametrize("granularity", [True, False])
def test_converted_qat_model_computes_exactly_what_the_fake_quantized_one_did(granularity):
    """torchao converts a fake quant with qparams recomputed from its observer, which for symmetric int8
    weights is a different grid (max / 127.5) from the one training used (max / 127)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = 3.0  # the largest weight: clipped on the observer's grid
    x = torch.randn(16, 8)
    quantizer = X86Quantizer().set_global(X86Quantizer.qat_scheme(per_channel=granularity, saturation_guard="off"))
    prepared = prepare_qat_pt2e(torch.export.export(model.train(), (x,)).module(), quantizer)
    prepared(x)
    for module in prepared.modules():
        if isinstance(module, FakeQuantizeBase):
            module.disable_observer()
    expected = prepared(x)
    assert torch.equal(convert_pt2e(prepared)(x), expected)


def test_pattern_annotations_are_torchao_annotations():
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    annotation = PatternAnnotation(_annotated=True, _is_output_of_quantized_pattern=True)
    assert isinstance(annotation, QuantizationAnnotation) and annotation.input_qspec_map == {}


# -- what Inductor makes of it (one small compile per quantizer) ---------------------------------------
class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.bn(self.stem(x))), 2)
        y = torch.relu(self.conv_b(torch.relu(self.conv_a(y))) + y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_inductor_lowers_our_graph_to_the_kernels_it_picks_for_torchaos():
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from pt2q.backends import inductor

    torch.manual_seed(0)
    model, x = SmallResNet().eval(), torch.randn(2, 3, 16, 16)
    theirs = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    kernels = {}
    for name, quantizer in (("pt2q", static()), ("torchao", theirs)):
        _, converted = run(model, (x,), quantizer)
        kernels[name] = inductor.compile(converted, (x,)).int8_kernels
    assert kernels["pt2q"] == kernels["torchao"]
    assert sum(count for kernel, count in kernels["pt2q"].items() if kernel.startswith("qconv")) == 3
    assert any(kernel.startswith("qlinear") for kernel in kernels["pt2q"])

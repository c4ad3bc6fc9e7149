"""The pattern table (rules.py) and what each rule does to a graph, for both backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

import pt2q
from pt2q.graph import get_constant, is_float_tensor
from pt2q.quantizers import RULES, Role, X86Quantizer, XPUQuantizer, weighted_ops
from pt2q.quantizers.rules import ADD, CONV_OPS, FUSIONS, LINEAR_OPS, RULE_BY_OP
from tests.conftest import DQ_PER_CHANNEL, DQ_PER_TENSOR, Q_PER_TENSOR, call, count_of, nodes_of, rel_error

aten = torch.ops.aten
BACKENDS = [X86Quantizer, XPUQuantizer]


def quantize_with(quantizer_cls, model, args, *, dynamic=False, **options):
    """pt2q capture + torchao's own prepare_pt2e / convert_pt2e with a pt2q quantizer."""
    model.eval()
    quantizer = quantizer_cls(**options)
    quantizer.set_global(quantizer_cls.dynamic_scheme() if dynamic else quantizer_cls.static_scheme())
    prepared = prepare_pt2e(pt2q.capture(model, args), quantizer)
    with torch.no_grad():
        prepared(*args)
    return convert_pt2e(prepared), quantizer


def only(nodes):
    assert len(nodes) == 1, nodes
    return nodes[0]


def qparams(node):
    """(scale, zero_point, quant_min, quant_max, dtype) of a static Q or DQ node."""
    return tuple(node.args[1:6])


# -- the table ----------------------------------------------------------------------------------------
def test_every_op_has_exactly_one_rule():
    seen = {}
    for rule in RULES:
        for op in rule.ops:
            assert isinstance(op, torch._ops.OpOverload), (rule.name, op)
            assert op not in seen, f"{op} is in rules {seen[op]!r} and {rule.name!r}"
            seen[op] = rule.name
    assert set(RULE_BY_OP) == set(seen)


def test_weighted_ops_are_linear_and_every_conv():
    assert weighted_ops() == LINEAR_OPS | CONV_OPS
    assert {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding} <= weighted_ops()
    for op in weighted_ops():
        rule = RULE_BY_OP[op]
        assert rule.role is Role.WEIGHTED and rule.weight_arg == 1 and rule.activation_args == (0,)


def test_rule_roles():
    assert RULE_BY_OP[aten.matmul.default].opt_in == "quantize_attention_matmul"
    assert RULE_BY_OP[aten.bmm.default].role is Role.ACTIVATIONS
    assert RULE_BY_OP[aten.mul.Tensor].opt_in == "quantize_mul" and RULE_BY_OP[aten.mul.Tensor].same_shape
    for op in (aten.max_pool2d.default, aten.adaptive_avg_pool2d.default, aten.flatten.using_ints, aten.cat.default):
        assert RULE_BY_OP[op].role is Role.PROPAGATE
    # post-ops are steps of fusions, not rules of their own
    for op in (aten.relu.default, aten.gelu.default, aten.silu.default, aten.hardswish.default, aten.add.Tensor):
        assert op not in RULE_BY_OP


def test_fusion_table():
    names = [fusion.name for fusion in FUSIONS]
    assert len(names) == len(set(names))
    for fusion in FUSIONS:
        assert fusion.anchor in (CONV_OPS, LINEAR_OPS) and fusion.post_ops
        # only a conv's add takes an int8 extra input (oneDNN's sum post-op)
        assert fusion.quantize_extra_input == (fusion.is_binary and fusion.anchor is CONV_OPS)
        # only the QAT conv-bn chains observe their output (bn is folded at convert)
        assert fusion.quantize_output == (fusion.name.startswith("conv_bn"))
    # longer chains of one anchor come first: the first match wins
    for earlier, later in zip(FUSIONS, FUSIONS[1:]):
        if earlier.anchor is later.anchor and earlier.name.startswith("conv_bn") == later.name.startswith("conv_bn"):
            assert len(earlier.post_ops) >= len(later.post_ops)
    assert any(step is ADD for step in next(f for f in FUSIONS if f.name == "linear_add").post_ops)


# -- weighted layers --------------------------------------------------------------------------------
class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same")
        self.c3 = nn.Conv3d(4, 4, 1)

    def forward(self, x1, x2, x3):
        return self.c1(x1).sum() + self.c2(x2).sum() + self.c3(x3).sum()


@pytest.mark.parametrize("quantizer_cls", BACKENDS)
def test_conv_variants_are_quantized(quantizer_cls):
    args = (torch.randn(2, 4, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 3, 3, 3))
    converted, quantizer = quantize_with(quantizer_cls, Convs(), args)
    targets = {n.target for n in converted.graph.nodes}
    assert {aten.conv1d.default, aten.conv2d.padding, aten.conv3d.default} <= targets
    assert pt2q.count_quantized_layers(converted) == 3
    assert sorted(quantizer.annotated_nodes.values()) == ["conv"] * 3


def test_runtime_weight_stays_fp32_and_a_constant_computed_one_is_folded():
    class Runtime(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x, gain):
            return F.linear(x, self.weight * gain)

    converted, quantizer = quantize_with(X86Quantizer, Runtime(), (torch.randn(2, 4), torch.tensor(2.0)))
    assert quantizer.annotated_nodes == {}
    assert count_of(converted, Q_PER_TENSOR, DQ_PER_CHANNEL) == 0

    class Computed(Runtime):
        def forward(self, x):
            return F.linear(x, self.weight * 2)     # computed from constants only: folded, then quantized

    converted, quantizer = quantize_with(X86Quantizer, Computed(), (torch.randn(2, 4),))
    assert list(quantizer.annotated_nodes.values()) == ["linear"]
    assert count_of(converted, DQ_PER_CHANNEL) == 1


# -- unary activations after conv ---------------------------------------------------------------------
class ConvActConv(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), act

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


ACTIVATIONS = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
               "relu_inplace": nn.ReLU(inplace=True)}


@pytest.mark.parametrize("quantizer_cls", BACKENDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_quantize_lands_after_the_activation(quantizer_cls, act):
    x = torch.randn(2, 3, 12, 12)
    converted, _ = quantize_with(quantizer_cls, ConvActConv(ACTIVATIONS[act]), (x,))
    first, second = nodes_of(converted, aten.conv2d.default)
    (act_node,) = first.users  # conv -> activation directly, no Q/DQ in between
    assert act_node.op == "call_function" and act_node.target not in (Q_PER_TENSOR, DQ_PER_TENSOR)
    (quant,) = act_node.users  # the activation's output is what gets quantized
    assert quant.target is Q_PER_TENSOR
    dequant = second.args[0]
    assert dequant.target is DQ_PER_TENSOR and dequant.args[0] is quant
    assert pt2q.count_quantized_layers(converted) == 2


def test_no_quantize_after_the_activation_when_nothing_quantized_follows():
    class ConvRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.relu(self.c(x))

    converted, _ = quantize_with(X86Quantizer, ConvRelu(), (torch.randn(2, 3, 8, 8),))
    assert count_of(converted, Q_PER_TENSOR) == 1  # the conv input only
    relu = only(nodes_of(converted, aten.relu.default))
    assert [u.op for u in relu.users] == ["output"]


# -- residual add ---------------------------------------------------------------------------------------
class ConvResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        identity = torch.relu(self.c1(x))
        return self.c3(torch.relu(self.c2(identity) + identity))


@pytest.mark.parametrize("quantizer_cls", BACKENDS)
def test_conv_residual_add_dequantizes_the_extra_input(quantizer_cls):
    converted, quantizer = quantize_with(quantizer_cls, ConvResidual(), (torch.randn(2, 8, 8, 8),))
    add = only(nodes_of(converted, aten.add.Tensor))
    conv_in, extra = add.args
    assert conv_in.target is aten.conv2d.default  # the conv output itself stays fp32 into the add
    assert extra.target is DQ_PER_TENSOR  # Inductor's qconv + binary pattern
    assert quantizer.annotated_nodes[add.name] == "conv_add_relu"
    assert quantizer.annotated_nodes[only(list(add.users)).name] == "conv_add_relu"
    # the residual's qparams are those of the same tensor feeding c2
    c2_input = nodes_of(converted, aten.conv2d.default)[1].args[0]
    assert qparams(c2_input) == qparams(extra)
    # relu after the add feeds the next quantized conv through a quantize
    relu = [n for n in add.users][0]
    assert only(list(relu.users)).target is Q_PER_TENSOR


def test_residual_add_after_dynamic_conv_is_left_alone():
    converted, quantizer = quantize_with(X86Quantizer, ConvResidual(), (torch.randn(2, 8, 8, 8),), dynamic=True)
    add = only(nodes_of(converted, aten.add.Tensor))
    assert add.args[1].target is aten.relu.default  # the post-ops fuse, but activations stay dynamic
    assert not any(a.target in (DQ_PER_TENSOR, Q_PER_TENSOR) for a in add.args)


def test_linear_residual_add_is_not_quantized():
    class LinearResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x) + x)

    converted, quantizer = quantize_with(X86Quantizer, LinearResidual(), (torch.randn(2, 8),))
    add = only(nodes_of(converted, aten.add.Tensor))
    assert [a.target for a in add.args] == [aten.linear.default, "x"]
    assert quantizer.annotated_nodes[add.name] == "linear_add"  # fused, its extra input fp32


# -- propagation: pooling, flatten, cat ---------------------------------------------------------------
class PoolCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        pooled = F.max_pool2d(a, 2)
        b = F.hardswish(self.b(pooled))
        return self.c(torch.cat([pooled, b], dim=1))


@pytest.mark.parametrize("quantizer_cls", BACKENDS)
def test_maxpool_and_cat_run_in_int8_with_shared_qparams(quantizer_cls):
    x = torch.randn(2, 3, 16, 16)
    model = PoolCat().eval()
    converted, quantizer = quantize_with(quantizer_cls, model, (x,))
    assert {"pooling", "concat"} <= set(quantizer.annotated_nodes.values())

    pool = only(nodes_of(converted, aten.max_pool2d.default))
    pool_in = pool.args[0]
    assert pool_in.target is DQ_PER_TENSOR
    pool_out_q = [u for u in pool.users if u.target is Q_PER_TENSOR]
    assert len(pool_out_q) == 1 and len(pool.users) == 1
    assert qparams(pool_in) == qparams(pool_out_q[0])  # int8 in, int8 out, same scale / zero point

    cat = only(nodes_of(converted, aten.cat.default))
    cat_inputs = cat.args[0]
    assert all(i.target is DQ_PER_TENSOR for i in cat_inputs)
    (cat_out_q,) = cat.users
    assert cat_out_q.target is Q_PER_TENSOR
    assert len({qparams(i) for i in cat_inputs} | {qparams(cat_out_q)}) == 1
    assert rel_error(call(converted, (x,)), call(model, (x,))) < 0.05


def test_pool_and_flatten_before_linear_share_qparams():
    from tests.models import ResidualCNN

    converted, quantizer = quantize_with(X86Quantizer, ResidualCNN(), (torch.randn(2, 3, 16, 16),))
    pool = only(nodes_of(converted, aten.adaptive_avg_pool2d.default))
    flatten = only(nodes_of(converted, aten.flatten.using_ints))
    linear = only(nodes_of(converted, aten.linear.default))
    assert flatten.args[0].target is DQ_PER_TENSOR and flatten.args[0].args[0].args[0] is pool
    assert linear.args[0].target is DQ_PER_TENSOR and linear.args[0].args[0].args[0] is flatten
    assert pool.args[0].target is DQ_PER_TENSOR
    assert qparams(pool.args[0]) == qparams(flatten.args[0]) == qparams(linear.args[0])


def test_pooling_after_a_quantized_conv_runs_in_int8_even_at_the_end():
    """torchao's recipe: an int8-in, int8-out op fed by a quantized pattern runs in int8 (Inductor's
    qconv writes int8 and qmaxpool2d reads it); after an op with no int8 output it stays fp32."""
    class ConvPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.max_pool2d(self.c(x), 2), F.max_pool2d(torch.sigmoid(self.c(x)), 2)

    converted, quantizer = quantize_with(X86Quantizer, ConvPool(), (torch.randn(1, 3, 8, 8),))
    int8_pool, fp32_pool = nodes_of(converted, aten.max_pool2d.default)
    assert int8_pool.args[0].target is DQ_PER_TENSOR
    (out_q,) = int8_pool.users
    assert out_q.target is Q_PER_TENSOR and qparams(out_q) == qparams(int8_pool.args[0])
    assert fp32_pool.args[0].target is aten.sigmoid.default
    assert list(quantizer.annotated_nodes.values()).count("pooling") == 1


# -- attention matmul (opt-in) -----------------------------------------------------------------------
class Scores(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.matmul(self.q(x), self.k(x).transpose(-1, -2))


@pytest.mark.parametrize("quantizer_cls", BACKENDS)
def test_attention_matmul_is_opt_in(quantizer_cls):
    x = torch.randn(2, 5, 8)
    off, quantizer = quantize_with(quantizer_cls, Scores(), (x,))
    matmul = only(nodes_of(off, aten.matmul.default))
    assert [a.target for a in matmul.args] == [aten.linear.default, aten.transpose.int]
    assert "attention_matmul" not in quantizer.annotated_nodes.values()

    on, quantizer = quantize_with(quantizer_cls, Scores(), (x,), quantize_attention_matmul=True)
    matmul = only(nodes_of(on, aten.matmul.default))
    assert all(a.target is DQ_PER_TENSOR for a in matmul.args)
    assert list(quantizer.annotated_nodes.values()).count("attention_matmul") == 1
    assert count_of(on, Q_PER_TENSOR) == count_of(off, Q_PER_TENSOR) + 2


def test_config_flag_turns_attention_matmul_on():
    x = torch.randn(2, 5, 8)
    model = Scores().eval()
    on = pt2q.quantize(model, pt2q.StaticQuantConfig(quantize_attention_matmul=True), [(x,)], progress=False)
    off = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,)], progress=False)
    assert all(a.target is DQ_PER_TENSOR for a in only(nodes_of(on, aten.matmul.default)).args)
    assert not any(a.target is DQ_PER_TENSOR for a in only(nodes_of(off, aten.matmul.default)).args)


# -- integer tensors are never observed ----------------------------------------------------------------
@pytest.mark.parametrize("quantizer_cls", BACKENDS)
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "t5_encoder"])
def test_integer_inputs_are_never_observed(zoo, quantizer_cls, name):
    zm = zoo(name)
    quantizer = quantizer_cls().set_global(quantizer_cls.static_scheme())
    prepared = prepare_pt2e(pt2q.capture(zm.model, zm.args, zm.kwargs), quantizer)
    observed = [n.args[0] for n in prepared.graph.nodes if n.op == "call_module" and "activation_post_process" in
                str(n.target)]
    assert observed and all(is_float_tensor(a) for a in observed)
    for node in prepared.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if annotation is not None:
            assert all(is_float_tensor(a) for a in annotation.input_qspec_map)
    with torch.no_grad():
        prepared(*zm.args, **zm.kwargs)
    converted = convert_pt2e(prepared)
    quantizes = nodes_of(converted, Q_PER_TENSOR)
    assert quantizes
    for quant in quantizes:
        source = quant.args[0]
        if source.op == "get_attr":  # a folded constant
            assert get_constant(converted, source).is_floating_point()
        else:
            assert is_float_tensor(source), f"{quant.name} quantizes {source.name}"
    for placeholder in (n for n in converted.graph.nodes if n.op == "placeholder"):
        if placeholder.meta["val"].dtype in (torch.int64, torch.int32, torch.bool):
            assert not any(u.target is Q_PER_TENSOR for u in placeholder.users), placeholder.name

"""SmoothQuantGroups: which consumers share an input and who absorbs the scale, on real and hand-made graphs.

Each group is summarised as (kind, module of the producer -- or of the root for explicit-mul groups --,
consumer module names); "explicit" marks a group that needs an explicit `mul`.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pt2q
import pt2q.passes.smooth_quant_groups as sq_groups
from pt2q.graph import get_constant, module_fqn
from pt2q.passes import MatmulToLinear
from pt2q.passes.manager import PassManager
from pt2q.passes.smooth_quant_groups import Absorb, SmoothQuantGroups, constant_value
from pt2q.smooth_quant import SmoothQuantConfig, insert
from tests.models import build

aten = torch.ops.aten


def _groups(model, args=(), kwargs=None):
    """The groups `insert` finds (conv+bn folded first, as prepare does)."""
    gm = pt2q.capture(model, args, kwargs or {})
    plan = insert(gm, SmoothQuantConfig(skip_if_worse=False))
    return gm, plan.groups


def _summary(group):
    kind = group.absorber.name if group.absorbed else "explicit"
    where = module_fqn(group.producer) if group.absorbed else module_fqn(group.root)
    return kind, where, tuple(group.consumer_names)


def _by_consumer(groups, suffix):
    found = [g for g in groups if any(name.endswith(suffix) for name in g.consumer_names)]
    assert len(found) == 1, (suffix, [g.consumer_names for g in found])
    return found[0]


def _blocking_node(gm, group):
    match = re.search(r"also feeds (\w+), which cannot take the scale", group.reason)
    assert match, group.reason
    return next(n for n in gm.graph.nodes if n.name == match.group(1))


# -- transformers ---------------------------------------------------------------------------------
def test_bert_post_ln_groups_need_explicit_muls():
    zm = build("bert")
    gm, groups = _groups(zm.model, zm.args, zm.kwargs)
    expected = [("explicit", "embeddings.LayerNorm", tuple(f"encoder.layer.0.attention.self.{p}"
                                                        for p in ("query", "key", "value")))]
    for i in range(2):
        layer = f"encoder.layer.{i}"
        expected += [
            ("explicit", None, (f"{layer}.attention.output.dense",)),
            ("explicit", f"{layer}.attention.output.LayerNorm", (f"{layer}.intermediate.dense",)),
            ("explicit", f"{layer}.intermediate.intermediate_act_fn", (f"{layer}.output.dense",)),
        ]
        if i == 0:
            expected.append(("explicit", "encoder.layer.0.output.LayerNorm",
                             tuple(f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value"))))
    expected.append(("explicit", "pooler", ("pooler.dense",)))
    summaries = [_summary(g) for g in groups]
    assert [(k, c) for k, _, c in summaries] == [(k, c) for k, _, c in expected]
    for (_, where, _), (_, expected_where, _) in zip(summaries, expected):
        if expected_where is not None:
            assert where == expected_where
    assert not any(g.skipped for g in groups)

    # post-LN: every LayerNorm output also feeds a residual add, which blocks absorption
    for group in groups:
        if group.root.target is aten.layer_norm.default:
            assert _blocking_node(gm, group).target is aten.add.Tensor, group.reason
    # GELU outputs cannot take a per-channel scale
    gelu_groups = [g for g in groups if g.root.target is aten.gelu.default]
    assert len(gelu_groups) == 2
    assert all("cannot absorb" in g.reason for g in gelu_groups)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_llama_style_rmsnorm_swiglu_and_grouped_query_attention(name):
    zm = build(name)
    gm, groups = _groups(zm.model, zm.args, zm.kwargs)
    expected = []
    for i in range(2):
        layer = f"model.layers.{i}"
        expected += [
            ("rms_norm_mul", f"{layer}.input_layernorm",
             tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv")),
            ("explicit", None, (f"{layer}.self_attn.o_proj",)),
            ("rms_norm_mul", f"{layer}.post_attention_layernorm", (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj")),
            ("swiglu_up", f"{layer}.mlp", (f"{layer}.mlp.down_proj",)),
        ]
    expected.append(("rms_norm_mul", "model.norm", ("lm_head",)))
    summaries = [_summary(g) for g in groups]
    assert [(k, c) for k, _, c in summaries] == [(k, c) for k, _, c in expected]
    for (_, where, _), (_, expected_where, _) in zip(summaries, expected):
        if expected_where is not None:
            assert where == expected_where

    modules = dict(zm.model.named_modules())
    for group in groups:
        if group.absorbed and group.absorber.name == "rms_norm_mul":
            # the decomposed RMSNorm `mul(weight, x)`: the constant operand is the norm's weight
            assert group.absorber.how is Absorb.CONSTANT_OPERAND
            norm = modules[module_fqn(group.producer)]
            constants = [constant_value(gm, a) for a in group.producer.args[:2]]
            assert any(c is not None and torch.equal(c, norm.weight) for c in constants)
        if group.absorbed and group.absorber.name == "swiglu_up":
            # act(gate) * up: the scale goes into up_proj's rows
            assert group.absorber.how is Absorb.LINEAR_OPERAND
            assert module_fqn(group.absorb_target).endswith("mlp.up_proj")
            assert group.absorb_target.target is aten.linear.default

    # grouped-query attention: k/v have fewer output rows than q but share q's input and its scale
    qkv = groups[0]
    rows = [tuple(get_constant(gm, c.args[1]).shape) for c in qkv.consumers]
    q_rows, k_rows, v_rows = (r[0] for r in rows)
    assert k_rows == v_rows == q_rows // 2
    assert {r[1] for r in rows} == {qkv.channels} == {32}
    assert len({c.args[0] for c in qkv.consumers}) == 1


def test_vit_pre_ln_layernorm_is_absorbed():
    zm = build("vit")
    _, groups = _groups(zm.model, zm.args, zm.kwargs)
    expected = [("explicit", "", ("embeddings.patch_embeddings.projection",))]
    for i in range(2):
        layer = f"layers.{i}"
        expected += [
            ("layer_norm", f"{layer}.layernorm_before", tuple(f"{layer}.attention.{p}_proj" for p in "qkv")),
            ("explicit", None, (f"{layer}.attention.o_proj",)),
            ("layer_norm", f"{layer}.layernorm_after", (f"{layer}.mlp.fc1",)),
            ("explicit", f"{layer}.mlp.activation_fn", (f"{layer}.mlp.fc2",)),
        ]
    expected.append(("explicit", "pooler", ("pooler.dense",)))
    summaries = [_summary(g) for g in groups]
    assert [(k, c) for k, _, c in summaries] == [(k, c) for k, _, c in expected]
    for (_, where, _), (_, expected_where, _) in zip(summaries, expected):
        if expected_where is not None:
            assert where == expected_where
    patch = groups[0]
    assert patch.root.op == "placeholder" and "graph input" in patch.reason
    assert (patch.channel_dim, patch.channels) == (1, 3)
    for group in groups:
        if group.absorbed:
            assert group.absorber.how is Absorb.AFFINE_ARGS and group.channel_dim == -1


# -- conv nets ------------------------------------------------------------------------------------
class PreActivation(nn.Module):
    """BatchNorm before a conv (pre-activation style), with and without a ReLU between."""

    def __init__(self, relu: bool):
        super().__init__()
        self.relu = relu
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        h = self.bn(x)
        return self.conv(torch.relu(h) if self.relu else h)


class ConvReluConv(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class ReluFeedsResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return h + self.conv2(h)


def _settled(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_before_conv_is_absorbed_into_the_norm(relu):
    torch.manual_seed(0)
    model = _settled(PreActivation(relu))
    _, groups = _groups(model, (torch.randn(2, 4, 8, 8),))
    assert [_summary(g) for g in groups] == [("batch_norm", "bn", ("conv",))]
    group = groups[0]
    assert group.producer.target is aten.batch_norm.default
    assert group.absorber.scaled_args == (1, 2)  # weight and bias
    assert (group.channel_dim, group.channels) == (1, 4)
    assert [p.target for p in group.path] == ([aten.relu.default] if relu else [])


def test_conv_relu_conv_absorbed_into_first_conv_rows():
    torch.manual_seed(0)
    _, groups = _groups(ConvReluConv().eval(), (torch.randn(2, 3, 8, 8),))
    assert [_summary(g) for g in groups] == [("explicit", "", ("conv1",)), ("conv", "conv1", ("conv2",))]
    assert groups[0].root.op == "placeholder"
    absorbed = groups[1]
    assert absorbed.absorber.how is Absorb.OUTPUT_ROWS
    assert [p.target for p in absorbed.path] == [aten.relu.default]
    assert (absorbed.channel_dim, absorbed.channels) == (1, 8)


def test_conv_bn_relu_conv_absorbed_into_the_folded_conv():
    torch.manual_seed(0)
    model = _settled(ConvReluConv(bn=True))
    gm, groups = _groups(model, (torch.randn(2, 3, 8, 8),))
    assert not [n for n in gm.graph.nodes if n.target is aten.batch_norm.default]  # folded by insert()
    assert [_summary(g) for g in groups][1] == ("conv", "conv1", ("conv2",))
    folded = groups[1].producer
    assert folded.args[2] is not None  # the fold gave conv1 (bias=False) a bias, which takes 1/s too


def test_relu_feeding_a_residual_add_needs_an_explicit_mul():
    torch.manual_seed(0)
    gm, groups = _groups(ReluFeedsResidual().eval(), (torch.randn(2, 3, 8, 8),))
    group = _by_consumer(groups, "conv2")
    assert not group.absorbed and group.root.target is aten.relu.default
    assert _blocking_node(gm, group).target is aten.add.Tensor


def test_relu_whose_input_has_other_users_is_not_absorbed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(torch.relu(h)) + h

    _, groups = _groups(Model().eval(), (torch.randn(2, 8),))
    group = _by_consumer(groups, "fc2")
    assert not group.absorbed and "feeds relu and other ops" in group.reason


def test_depthwise_conv_is_not_a_consumer_and_linear_conv_sharing_an_input_is_skipped():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.pw = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.pw(self.dw(x))

    _, groups = _groups(Model().eval(), (torch.randn(1, 4, 6, 6),))
    assert [g.consumer_names for g in groups] == [["pw"]]  # the grouped conv is not smoothed
    assert not groups[0].absorbed  # and a grouped conv cannot absorb rows either

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.conv(x) + self.fc(x)

    mixed, x = Mixed().eval(), torch.randn(1, 4, 6, 6)
    _, groups = _groups(mixed, (x,))
    (group,) = groups
    assert group.skipped and group.reason == "linear and conv consumers share one input"
    report = pt2q.smooth_quant(mixed, [(x,)], progress=False)[1]
    assert report.groups == [] and [s.reason for s in report.skipped] == [group.reason]


# -- the pass itself --------------------------------------------------------------------------------
def test_analysis_pass_does_not_change_the_graph():
    zm = build("llama")
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs)
    PassManager([MatmulToLinear()])(gm)
    before = gm.code
    analysis = SmoothQuantGroups()
    result = analysis.call(gm)
    assert result.modified is False and gm.code == before
    assert len(analysis.report) == 9


def test_constant_operand_search_is_linear_in_depth(monkeypatch):
    """The walk for RMSNorm's constant operand used to revisit every residual diamond: 80k calls at 2
    layers, 6M at 3, never finishing on a real model. Now it is memoised and stops at the first
    non-constant input."""
    import transformers

    from tests.models import _DECODER_CONFIG, _token_inputs

    calls = 0
    original = sq_groups.constant_value

    def counting(gm, node, *rest):
        nonlocal calls
        calls += 1
        if calls > 20_000:
            raise AssertionError("constant_value walks the graph exponentially")
        return original(gm, node, *rest)

    monkeypatch.setattr(sq_groups, "constant_value", counting)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_DECODER_CONFIG,
                                                                      "num_hidden_layers": 6})).eval()
    kwargs = _token_inputs()
    _, groups = _groups(model, (), kwargs)
    assert sum(g.absorbed and g.absorber.name == "rms_norm_mul" for g in groups) == 2 * 6 + 1
    assert calls < 2_000, calls

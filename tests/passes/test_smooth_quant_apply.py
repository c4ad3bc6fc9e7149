"""SmoothQuantApply: the scale formula, the folded constants, explicit muls and the observer fix-up.

    s_j = max|X_j|^alpha / max_j|[W1; W2]|^(1 - alpha)   (weight max clipped at 1e-5; s_j = 1 where max|X_j| = 0)
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

import pt2q
from pt2q.api import SMOOTH_QUANT_PLAN_KEY
from pt2q.graph import get_constant, module_fqn
from pt2q.passes.insert_channel_recorders import ChannelRecorder
from tests.conftest import call, rel_error
from tests.models import build

aten = torch.ops.aten

LN_WEIGHT = [2.0, 0.5, 0.0, 1.0]   # channel 2: weight and bias 0, so that input channel is all zero
LN_BIAS = [0.1, -0.2, 0.0, 0.3]
A_WEIGHT = [[0.5, 0.0, 1.0, -0.25],
            [-2.0, 0.0, 0.5, 0.125],
            [1.0, 0.0, -3.0, 0.5]]
B_WEIGHT = [[0.25, 0.0, 0.5, -4.0],   # column 3's max comes from this second consumer
            [-0.5, 0.0, 1.0, 2.0]]     # column 1 is zero in both: its max is clipped at 1e-5
X = [[1.0, 2.0, 3.0, 4.0],
     [-1.0, 0.5, 2.0, -3.0],
     [0.0, 0.0, 1.0, 0.0]]


class LayerNormTwoLinears(nn.Module):
    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(4)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor(LN_WEIGHT))
            self.norm.bias.copy_(torch.tensor(LN_BIAS))
            self.a.weight.copy_(torch.tensor(A_WEIGHT))
            self.a.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
            self.b.weight.copy_(torch.tensor(B_WEIGHT))

    def forward(self, x):
        h = self.norm(x)
        out = self.b(h)
        return self.a(h), out + h[..., :2] if self.residual else out


def expected_scales(alpha: float) -> torch.Tensor:
    """The formula, by hand, in float64."""
    x = torch.tensor(X, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-5) * torch.tensor(LN_WEIGHT, dtype=torch.float64) \
        + torch.tensor(LN_BIAS, dtype=torch.float64)
    act = h.abs().amax(0)
    weight = torch.cat([torch.tensor(A_WEIGHT), torch.tensor(B_WEIGHT)]).double().abs().amax(0).clamp(min=1e-5)
    scales = act ** alpha / weight ** (1 - alpha)
    return torch.where(act > 0, scales, torch.ones_like(scales))


def _smooth(model, alpha, **options):
    x = torch.tensor(X)
    return pt2q.smooth_quant(model, [(x,)], alpha=alpha, skip_if_worse=False, progress=False, **options)


def _node(gm, target, index=0):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target][index]


def _linears(gm) -> dict:
    """Module name -> linear node."""
    return {module_fqn(n): n for n in gm.graph.nodes if n.target is aten.linear.default}


@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.0, 1.0])
def test_scales_follow_the_formula_and_fold_into_layernorm_and_consumers(alpha):
    model = LayerNormTwoLinears().eval()
    gm, report = _smooth(model, alpha)
    assert len(report.groups) == 1 and not report.skipped
    group = report.groups[0]
    scale = group.scale
    assert group.absorbed and group.alpha == alpha
    assert scale.shape == (4,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), expected_scales(alpha), rtol=1e-6, atol=0)
    assert scale[2] == 1.0  # all-zero input channel
    if alpha < 1:
        assert scale[1] > 1e3 ** (1 - alpha)  # zero weight column: divided by the clipped 1e-5

    # the new constants, exactly: LayerNorm weight/bias / s, consumer weights * s (columns)
    norm = _node(gm, aten.layer_norm.default)
    assert torch.equal(get_constant(gm, norm.args[2]), model.norm.weight / scale)
    assert torch.equal(get_constant(gm, norm.args[3]), model.norm.bias / scale)
    linear_a, linear_b = _linears(gm)["a"], _linears(gm)["b"]
    assert torch.equal(get_constant(gm, linear_a.args[1]), model.a.weight * scale)
    assert torch.equal(get_constant(gm, linear_b.args[1]), model.b.weight * scale)
    assert torch.equal(get_constant(gm, linear_a.args[2]), model.a.bias)  # consumer bias unchanged
    # no mul inserted, and the function is kept
    assert not [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    x = torch.tensor(X)
    for actual, expected in zip(call(gm, (x,)), call(model, (x,))):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # the user's model keeps its parameters
    assert torch.equal(model.norm.weight, torch.tensor(LN_WEIGHT))


def test_explicit_mul_when_the_norm_output_also_feeds_a_residual():
    model = LayerNormTwoLinears(residual=True).eval()
    gm, report = _smooth(model, 0.5)
    (group,) = report.groups
    assert not group.absorbed and group.producer.startswith("explicit mul")
    scale = group.scale
    torch.testing.assert_close(scale.double(), expected_scales(0.5), rtol=1e-6, atol=0)
    norm = _node(gm, aten.layer_norm.default)
    assert torch.equal(get_constant(gm, norm.args[2]), model.norm.weight)  # the norm is untouched
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert mul.args[0] is norm
    assert torch.equal(get_constant(gm, mul.args[1]), (1.0 / scale).reshape(1, 4))
    for linear in _linears(gm).values():
        assert linear.args[0] is mul
    residual = _node(gm, aten.slice.Tensor)
    assert residual.args[0] is norm  # the residual still reads the unscaled output
    x = torch.tensor(X)
    for actual, expected in zip(call(gm, (x,)), call(model, (x,))):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_absorbed_rows_of_a_linear_through_relu_and_swiglu_up_rows():
    zm = build("t5_encoder")  # DenseReluDense: wi -> relu -> wo, absorbed into wi's rows
    gm, report = pt2q.smooth_quant(zm.model, [(zm.args, zm.kwargs)], alpha=0.5, skip_if_worse=False,
                                   progress=False)
    group = next(g for g in report.groups if g.consumers == ["encoder.block.0.layer.1.DenseReluDense.wo"])
    assert group.absorbed and group.producer.startswith("linear:")
    linears = _linears(gm)
    wi, wo = linears["encoder.block.0.layer.1.DenseReluDense.wi"], linears["encoder.block.0.layer.1.DenseReluDense.wo"]
    dense = zm.model.encoder.block[0].layer[1].DenseReluDense
    # wi is also a consumer (of the RMSNorm group before it): its columns * s_norm, then its rows / s
    norm_group = next(g for g in report.groups if g.consumers == ["encoder.block.0.layer.1.DenseReluDense.wi"])
    assert torch.equal(get_constant(gm, wi.args[1]),
                       dense.wi.weight * norm_group.scale / group.scale.reshape(-1, 1))
    assert torch.equal(get_constant(gm, wo.args[1]), dense.wo.weight * group.scale)

    zm = build("llama")
    gm, report = pt2q.smooth_quant(zm.model, [(zm.args, zm.kwargs)], alpha=0.5, skip_if_worse=False,
                                   progress=False)
    group = next(g for g in report.groups if g.consumers == ["model.layers.0.mlp.down_proj"])
    assert group.absorbed and group.producer.startswith("swiglu_up:")
    mlp = zm.model.model.layers[0].mlp
    by_module = _linears(gm)
    # up_proj: columns * s of its input group (post_attention_layernorm), then rows / s of down_proj's
    norm_group = next(g for g in report.groups if "model.layers.0.mlp.gate_proj" in g.consumers)
    assert torch.equal(get_constant(gm, by_module["model.layers.0.mlp.up_proj"].args[1]),
                       mlp.up_proj.weight * norm_group.scale / group.scale.reshape(-1, 1))
    assert torch.equal(get_constant(gm, by_module["model.layers.0.mlp.down_proj"].args[1]),
                       mlp.down_proj.weight * group.scale)
    # gate_proj is scaled only by its own input group, never by 1/s rows
    assert torch.equal(get_constant(gm, by_module["model.layers.0.mlp.gate_proj"].args[1]),
                       mlp.gate_proj.weight * norm_group.scale)
    # the RMSNorm weight / s
    norm = zm.model.model.layers[0].post_attention_layernorm
    muls = [n for n in gm.graph.nodes
            if n.target is aten.mul.Tensor and module_fqn(n) == "model.layers.0.post_attention_layernorm"]
    constants = [get_constant(gm, a) for n in muls for a in n.args[:2]]
    assert any(c is not None and torch.equal(c, norm.weight / norm_group.scale) for c in constants)


# -- on an observed graph: observers -----------------------------------------------------------------
def _prepared(model, calib, **sq_options):
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(skip_if_worse=False, **sq_options))
    prepared = pt2q.prepare(model, config, calib[0])
    pt2q.calibrate(prepared, calib, progress=False)
    return prepared


def test_observers_at_smoothed_inputs_get_the_exact_range_and_weights_are_reobserved():
    torch.manual_seed(0)
    model = LayerNormTwoLinears().eval()
    batches = [(torch.randn(5, 4) * 3,), (torch.randn(5, 4),)]
    prepared = _prepared(model, batches)  # histogram activation observers by default
    plan = prepared.meta[SMOOTH_QUANT_PLAN_KEY]
    report = plan.apply(prepared)
    (group,) = report.groups
    scale = group.scale
    assert not [m for m in prepared.modules() if isinstance(m, ChannelRecorder)]  # removed

    with torch.no_grad():
        h = torch.cat([model.norm(x) for (x,) in batches])
    linears = [n for n in prepared.graph.nodes if n.target is aten.linear.default]
    for linear in linears:
        act = prepared.get_submodule(linear.args[0].target)
        assert type(act) is MinMaxObserver  # was a HistogramObserver
        torch.testing.assert_close(act.min_val, (h.amin(0) / scale).min(), rtol=1e-6, atol=0)
        torch.testing.assert_close(act.max_val, (h.amax(0) / scale).max(), rtol=1e-6, atol=0)
        weight_observer = prepared.get_submodule(linear.args[1].target)
        assert isinstance(weight_observer, PerChannelMinMaxObserver)
        new_weight = get_constant(prepared, linear.args[1].args[0])
        assert torch.equal(weight_observer.min_val, new_weight.amin(1))
        assert torch.equal(weight_observer.max_val, new_weight.amax(1))


class ReluResidualConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[:2] *= 20  # two strong channels: a scale worth applying

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.conv2(h) + h


def test_explicit_mul_does_not_leak_into_a_residual_sharing_the_observer():
    """The conv-residual rule quantizes the add's extra input with the same observer as conv2's input.
    The explicit mul must go to conv2 only: the add keeps the unscaled activation."""
    torch.manual_seed(0)
    model = ReluResidualConv().eval()
    calib = [(torch.randn(2, 3, 8, 8),)]
    plain = pt2q.quantize(model, pt2q.StaticQuantConfig(activation_observer="minmax"), calib, progress=False)
    config = pt2q.StaticQuantConfig(activation_observer="minmax",
                                    smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
    prepared = pt2q.prepare(model, config, calib[0])
    relu = _node(prepared, aten.relu.default)
    shared = [u for u in relu.users if u.op == "call_module" and "activation_post_process" in u.target]
    assert len(shared) == 1 and {u.target for u in shared[0].users} == {aten.conv2d.default, aten.add.Tensor}
    pt2q.calibrate(prepared, calib, progress=False)
    qmodel = pt2q.convert(prepared)
    report = qmodel.meta["pt2q_smooth_quant_report"]
    assert [g.consumers for g in report.groups if not g.absorbed] == [["conv1"], ["conv2"]]

    expected = call(model, calib[0])
    plain_error = rel_error(call(plain, calib[0]), expected)
    error = rel_error(call(qmodel, calib[0]), expected)
    assert error < 2 * plain_error, (error, plain_error)  # was 0.27 vs 0.007 with the add scaled too
    add = _node(qmodel, aten.add.Tensor)
    source = add.args[1]
    while source.target not in (aten.relu.default, aten.mul.Tensor):
        source = source.args[0]
    assert source.target is aten.relu.default


def test_a_linear_called_twice_keeps_its_weight_for_the_other_call():
    """Both calls share one weight observer in the prepared graph; smoothing one call's input must not
    rescale the weight the other call reads."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2, self.proj = nn.LayerNorm(16), nn.LayerNorm(16), nn.Linear(16, 16)
            with torch.no_grad():
                self.norm1.weight[:3] *= 30
                self.norm2.weight[5:8] *= 30

        def forward(self, x):
            return self.proj(self.norm1(x)) + self.proj(self.norm2(2 * x))

    torch.manual_seed(0)
    model = Shared().eval()
    calib = [(torch.randn(4, 8, 16),)]
    config = pt2q.StaticQuantConfig(activation_observer="minmax",
                                    smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
    prepared = pt2q.prepare(model, config, calib[0])
    weight_observers = {n.args[1] for n in prepared.graph.nodes if n.target is aten.linear.default}
    assert len(weight_observers) == 1  # the situation under test: one observer, two users
    pt2q.calibrate(prepared, calib, progress=False)
    qmodel = pt2q.convert(prepared)
    assert qmodel.meta["pt2q_smooth_quant_report"].num_absorbed == 2
    plain = pt2q.quantize(model, pt2q.StaticQuantConfig(activation_observer="minmax"), calib, progress=False)
    expected = call(model, calib[0])
    error, plain_error = rel_error(call(qmodel, calib[0]), expected), rel_error(call(plain, calib[0]), expected)
    assert error < plain_error, (error, plain_error)  # was 1.72 with the first call's weight reused

    smoothed, _ = pt2q.smooth_quant(model, calib, alpha=0.5, skip_if_worse=False, progress=False)
    assert rel_error(call(smoothed, calib[0]), expected) < 1e-5


# -- the skip_if_worse guard ------------------------------------------------------------------------
def test_group_whose_estimated_error_rises_is_left_alone_and_reported():
    zm = build("mlp")  # Linear -> ReLU -> Linear -> GELU -> Linear
    calib = [(zm.args, zm.kwargs)]
    gm, report = pt2q.smooth_quant(zm.model, calib, alpha=0.5, progress=False)
    (skipped,) = report.skipped
    assert skipped.consumers == ["2"] and skipped.alpha == 0.5 and skipped.scale is None
    match = re.fullmatch(r"smoothing with alpha 0\.50 would raise the estimated output error "
                         r"\(([\d.e+-]+) -> ([\d.e+-]+)\)", skipped.reason)
    assert match, skipped.reason
    assert float(match.group(2)) >= float(match.group(1))
    assert "2" not in [c for g in report.groups for c in g.consumers]

    unguarded_gm, unguarded = pt2q.smooth_quant(zm.model, calib, alpha=0.5, skip_if_worse=False, progress=False)
    assert not unguarded.skipped
    assert ["2"] in [g.consumers for g in unguarded.groups]
    # the guarded graph leaves layer "2" and the rows of its producer "0" as they were ("0" is also the
    # consumer of the graph-input group: only its columns change)
    weights = {name: get_constant(gm, n.args[1]) for name, n in _linears(gm).items()}
    assert torch.equal(weights["2"], zm.model[2].weight)
    input_group = next(g for g in report.groups if g.consumers == ["0"])
    assert torch.equal(weights["0"], zm.model[0].weight * input_group.scale)
    assert torch.equal(get_constant(gm, _linears(gm)["0"].args[2]), zm.model[0].bias)

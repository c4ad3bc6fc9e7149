"""FoldConstantWeights: weights computed from constants (weight norm) become constants, and get quantized."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import pt2q
from pt2q.graph import get_constant
from pt2q.passes.fold_constant_weights import FoldConstantWeights
from tests.conftest import call, count_of, rel_error

aten = torch.ops.aten


class SpeechStem(nn.Module):
    """A grouped positional conv under the new weight-norm parametrization, and a linear under the old
    hook-based weight_norm: both rebuild their weight every call."""

    def __init__(self):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), dim=2)
        with pytest.warns(FutureWarning):
            self.proj = nn.utils.weight_norm(nn.Linear(8, 4))

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)).transpose(1, 2))


def test_weight_norm_weights_are_folded_into_constants():
    model = SpeechStem().eval()
    x = torch.randn(2, 8, 10)
    gm = pt2q.capture(model, (x,))
    expected = call(gm, (x,))
    fold = FoldConstantWeights()
    assert fold.call(gm).modified
    assert count_of(gm, aten._weight_norm.default) == 0 and len(fold.report) == 2
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv1d.default)
    weight = get_constant(gm, conv.args[1])
    assert weight is not None and weight.shape == (8, 4, 5)
    torch.testing.assert_close(call(gm, (x,)), expected, rtol=1e-6, atol=1e-6)
    # the parametrization's tensors belong to the user's module and are untouched
    assert model.conv.parametrizations.weight.original1.shape == (8, 4, 5)


def test_a_weight_normed_conv_is_quantized_and_covered():
    model = SpeechStem().eval()
    x = torch.randn(2, 8, 10)
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,)], progress=False, require_full_coverage=True)
    report = qmodel.meta["pt2q_report"]
    assert report.quantized_layers == 2 and report.share == 1.0
    with torch.no_grad():
        assert rel_error(call(qmodel, (x,)), model(x)) < 0.05


def test_weights_fed_by_an_input_or_only_views_are_left_alone():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))

        def forward(self, x, gain):
            return nn.functional.linear(x, self.w * gain) + nn.functional.linear(x, self.w.view(4, 8))

    gm = pt2q.capture(Dynamic(), (torch.randn(3, 8), torch.tensor(2.0)))
    fold = FoldConstantWeights()
    assert not fold.call(gm).modified and fold.report == []


def test_a_weight_behind_thousands_of_nodes_does_not_exhaust_the_stack():
    """The constant check walks a weight's producers: 1500 adds from an input (a deep residual stream)."""
    class Deep(nn.Module):
        def forward(self, x, y):
            for _ in range(1500):
                y = y + 1.0
            return torch.matmul(x, y)

    gm = pt2q.capture(Deep(), (torch.randn(4, 4), torch.randn(4, 4)))
    assert not FoldConstantWeights.applies(gm)
    qmodel = pt2q.quantize(Deep(), pt2q.StaticQuantConfig(), [(torch.randn(4, 4), torch.randn(4, 4))], progress=False)
    assert qmodel.meta["pt2q_report"].float_layers == []     # an activation "weight": not a weighted op

"""MatmulToLinear: addmm / mm with a constant weight -> linear with the weight as [out, in]."""
from __future__ import annotations

import torch
from torch import nn

import pt2q
from pt2q.graph import get_constant
from pt2q.passes import MatmulToLinear, PassResult
from tests.conftest import call, count_of, nodes_of

aten = torch.ops.aten


class AddMM(nn.Module):
    """GPT-2 Conv1D style: weight stored as [in, out]."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 10))
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


class MM(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 10))

    def forward(self, x):
        return torch.mm(x, self.weight)


class MMTransposed(nn.Module):
    """Weight stored as [out, in] and transposed in forward: no copy needed."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 6))

    def forward(self, x):
        return torch.mm(x, self.weight.t())


class TwoActivations(nn.Module):
    def forward(self, x, y):
        return torch.mm(x, y)


def _run_pass(model, *args):
    gm = pt2q.capture(model, args)
    expected = call(gm, args)
    graph_pass = MatmulToLinear()
    result = graph_pass.call(gm)
    assert isinstance(result, PassResult)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return gm, result, graph_pass, expected


def test_addmm_becomes_linear_with_transposed_weight():
    model = AddMM()
    weight_before = model.weight.detach().clone()
    x = torch.randn(4, 6)
    gm, result, graph_pass, expected = _run_pass(model, x)
    assert result.modified and result.graph_module is gm
    assert count_of(gm, aten.addmm.default) == 0
    (linear,) = nodes_of(gm, aten.linear.default)
    assert graph_pass.report == [linear.name]
    x_arg, weight_arg, bias_arg = linear.args
    assert x_arg.op == "placeholder" and bias_arg.target == "bias"
    new_weight = get_constant(gm, weight_arg)
    assert new_weight.shape == (10, 6) and new_weight.is_contiguous()
    assert torch.equal(new_weight, model.weight.detach().t())
    assert weight_arg.meta["val"].shape == (10, 6)
    torch.testing.assert_close(call(gm, (x,)), expected, rtol=1e-6, atol=1e-6)
    # the user's parameter: untouched, and not aliased by the new constant
    assert torch.equal(model.weight.detach(), weight_before) and model.weight.shape == (6, 10)
    assert new_weight.data_ptr() != model.weight.data_ptr()


def test_mm_without_bias():
    x = torch.randn(3, 6)
    gm, result, _, expected = _run_pass(MM(), x)
    assert result.modified
    assert count_of(gm, aten.mm.default) == 0
    (linear,) = nodes_of(gm, aten.linear.default)
    assert linear.args[2] is None
    assert get_constant(gm, linear.args[1]).shape == (10, 6)
    torch.testing.assert_close(call(gm, (x,)), expected, rtol=1e-6, atol=1e-6)


def test_already_transposed_weight_is_used_as_stored():
    model = MMTransposed()
    x = torch.randn(3, 6)
    gm, result, _, expected = _run_pass(model, x)
    assert result.modified
    (linear,) = nodes_of(gm, aten.linear.default)
    assert linear.args[1].op == "get_attr" and linear.args[1].target == "weight"
    assert get_constant(gm, linear.args[1]) is model.weight  # no copy
    assert count_of(gm, aten.t.default, aten.transpose.int, aten.permute.default) == 0  # old transpose erased
    torch.testing.assert_close(call(gm, (x,)), expected, rtol=1e-6, atol=1e-6)


def test_mm_between_activations_is_left_alone():
    x, y = torch.randn(3, 6), torch.randn(6, 10)
    gm = pt2q.capture(TwoActivations(), (x, y))
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    graph_pass = MatmulToLinear()
    result = graph_pass.call(gm)
    assert not result.modified and graph_pass.report == []
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before
    assert count_of(gm, aten.mm.default) == 1


def test_report_is_reset_between_calls():
    graph_pass = MatmulToLinear()
    graph_pass.call(pt2q.capture(AddMM(), (torch.randn(2, 6),)))
    assert len(graph_pass.report) == 1
    graph_pass.call(pt2q.capture(TwoActivations(), (torch.randn(2, 6), torch.randn(6, 3))))
    assert graph_pass.report == []


def test_gpt2_every_conv1d_is_rewritten(zoo):
    zm = zoo("gpt2")
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs)
    expected = zm.output_fn(call(gm, zm.args, zm.kwargs))
    graph_pass = MatmulToLinear()
    result = graph_pass.call(gm)
    gm.recompile()
    assert result.modified and len(graph_pass.report) == 8
    assert count_of(gm, aten.addmm.default) == 0 and count_of(gm, aten.linear.default) == 8
    torch.testing.assert_close(zm.output_fn(call(gm, zm.args, zm.kwargs)), expected, rtol=1e-5, atol=1e-5)


class Spellings(nn.Module):
    """One linear written seven ways, with weights stored [out, in] (w) and [in, out] (u)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.u = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return (x @ self.w.T, torch.matmul(x, self.w.t()), torch.matmul(x, self.u), x @ self.w.transpose(0, 1),
                torch.einsum("bsi,oi->bso", x, self.w), torch.einsum("...i,io->...o", x, self.u),
                nn.functional.linear(x, self.w))


def test_every_spelling_of_a_constant_matmul_becomes_a_linear():
    x = torch.randn(2, 3, 16)
    gm, result, graph_pass, expected = _run_pass(Spellings(), x)
    assert result.modified and len(graph_pass.report) == 6
    assert count_of(gm, aten.linear.default) == 7
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        aten.matmul.default, aten.einsum.default, aten.numpy_T.default, aten.t.default, aten.transpose.int)]
    for weights in (linear.args[1] for linear in nodes_of(gm, aten.linear.default)):
        assert get_constant(gm, weights).shape == (8, 16)
    for got, want in zip(call(gm, (x,)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_constant_matmul_is_quantized_and_covered():
    x = torch.randn(2, 3, 16)
    qmodel = pt2q.quantize(Spellings().eval(), pt2q.StaticQuantConfig(), [(x,)], progress=False,
                           require_full_coverage=True)
    report = qmodel.meta["pt2q_report"]
    assert report.quantized_layers == 7 and report.share == 1.0


class NotLinears(nn.Module):
    """einsums and matmuls that are not a linear on x's last dimension: left alone."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.table = nn.Parameter(torch.randn(3, 16))

    def forward(self, x, y):
        return (torch.einsum("bsi,ij->bsj", x, y[0]),               # both operands activations
                torch.einsum("bsi,si->bs", x, self.table),          # contracts with a position table
                torch.matmul(self.w, x.transpose(1, 2)))            # the constant on the left


def test_matmuls_that_are_not_linears_are_left_alone():
    model = NotLinears()
    gm, result, graph_pass, expected = _run_pass(model, torch.randn(2, 3, 16), torch.randn(2, 16, 16))
    assert not result.modified and count_of(gm, aten.linear.default) == 0

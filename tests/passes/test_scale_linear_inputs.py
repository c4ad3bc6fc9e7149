"""ScaleLinearInputs: `linear(x, W)` -> `linear(x * c, W)` for groups of linears, one `mul` per distinct input
of a group, inserted where the input is defined before every reader (AWQ's explicit input scales)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pt2q
from pt2q.graph import get_constant, module_fqn
from pt2q.passes.manager import PassManager
from pt2q.passes.scale_linear_inputs import ScaleLinearInputs
from tests.conftest import call, count_of, nodes_of

aten = torch.ops.aten


class Fanout(nn.Module):
    """q/k/v-like: three linears read `x`; `other` reads `y`; `late` reads a value computed after q."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 4)
        self.v = nn.Linear(8, 4, bias=False)
        self.other = nn.Linear(8, 3)
        self.late = nn.Linear(8, 5)

    def forward(self, x, y):
        q = self.q(x)
        return q, self.k(x), self.v(x), self.other(y), self.late(torch.relu(q))


@pytest.fixture
def fanout():
    torch.manual_seed(0)
    model = Fanout().eval()
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    gm = pt2q.capture(model, inputs)
    linears = {module_fqn(n): n.name for n in nodes_of(gm, aten.linear.default)}
    return model, inputs, gm, linears


def _factor(seed: int) -> torch.Tensor:
    return torch.rand(8, generator=torch.Generator().manual_seed(seed)) + 0.5


def _expected(model, x, y, factors: dict[str, torch.Tensor]) -> tuple:
    """Eager `linear(input * c, W, b)` for the scaled modules, the plain module elsewhere."""
    def lin(name, inp):
        module = getattr(model, name)
        scaled = inp * factors[name] if name in factors else inp
        return F.linear(scaled, module.weight, module.bias)

    with torch.no_grad():
        q = lin("q", x)
        return q, lin("k", x), lin("v", x), lin("other", y), lin("late", torch.relu(q))


def _assert_outputs(gm, model, inputs, factors):
    actual = call(gm, inputs)
    expected = _expected(model, *inputs, factors)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_one_mul_for_linears_sharing_an_input(fanout):
    model, inputs, gm, linears = fanout
    c = _factor(0)
    graph_pass = ScaleLinearInputs({(linears["q"], linears["k"], linears["v"]): c})
    gm, records = PassManager([graph_pass])(gm)
    assert records[0].modified
    muls = nodes_of(gm, aten.mul.Tensor)
    assert len(muls) == 1 and graph_pass.report == [muls[0].name]
    (mul,) = muls
    assert mul.args[0].op == "placeholder" and mul.args[0].name == "x"
    assert torch.equal(get_constant(gm, mul.args[1]), c)
    assert {u.name for u in mul.users} == {linears["q"], linears["k"], linears["v"]}
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name[linears["other"]].args[0].name == "y"       # untouched
    assert mul.meta["val"].shape == (3, 8)
    assert module_fqn(mul) == "q"                               # the first consumer's module
    _assert_outputs(gm, model, inputs, {"q": c, "k": c, "v": c})


def test_one_mul_per_distinct_input(fanout):
    model, inputs, gm, linears = fanout
    c = _factor(1)
    graph_pass = ScaleLinearInputs({(linears["k"], linears["other"]): c})
    PassManager([graph_pass])(gm)
    muls = nodes_of(gm, aten.mul.Tensor)
    assert len(graph_pass.report) == 2 and sorted(graph_pass.report) == sorted(m.name for m in muls)
    assert sorted(m.args[0].name for m in muls) == ["x", "y"]
    # q and v read x too but are not in the group: they keep the unscaled x
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name[linears["q"]].args[0].name == "x" and by_name[linears["v"]].args[0].name == "x"
    _assert_outputs(gm, model, inputs, {"k": c, "other": c})


def test_an_input_computed_after_the_groups_first_linear(fanout):
    """`late` reads relu(q(x)), defined after q: its mul must come after that input, not before q."""
    model, inputs, gm, linears = fanout
    c = _factor(2)
    graph_pass = ScaleLinearInputs({(linears["q"], linears["late"]): c})
    PassManager([graph_pass])(gm)   # lints the graph
    assert count_of(gm, aten.mul.Tensor) == 2
    _assert_outputs(gm, model, inputs, {"q": c, "late": c})


def test_several_groups(fanout):
    model, inputs, gm, linears = fanout
    c1, c2 = _factor(3), _factor(4)
    graph_pass = ScaleLinearInputs({(linears["q"], linears["k"]): c1, (linears["other"],): c2})
    PassManager([graph_pass])(gm)
    assert count_of(gm, aten.mul.Tensor) == 2 == len(graph_pass.report)
    _assert_outputs(gm, model, inputs, {"q": c1, "k": c1, "other": c2})


def test_constant_is_a_float32_copy(fanout):
    model, inputs, gm, linears = fanout
    c = _factor(5).double()
    PassManager([ScaleLinearInputs({(linears["q"],): c})])(gm)
    (mul,) = nodes_of(gm, aten.mul.Tensor)
    stored = get_constant(gm, mul.args[1])
    assert stored.dtype == torch.float32 and stored.data_ptr() != c.data_ptr()
    c.mul_(100)  # editing the caller's tensor afterwards changes nothing
    _assert_outputs(gm, model, inputs, {"q": (c / 100).float()})


def test_no_factors_is_not_a_modification(fanout):
    _, _, gm, _ = fanout
    graph_pass = ScaleLinearInputs({})
    assert not graph_pass.call(gm).modified and graph_pass.report == []


def test_non_linear_consumer_is_rejected(fanout):
    _, _, gm, _ = fanout
    (relu,) = nodes_of(gm, aten.relu.default)
    with pytest.raises(ValueError, match="are not all linears"):
        ScaleLinearInputs({(relu.name,): _factor(0)}).call(gm)

"""PackWeights: `linear(x, W)` -> `linear(x, pt2q.dequantize_weight(packed, scale, zero_point, table, ...))`,
the float weight dropped, the graph computing exactly what the dequantized weight computes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pt2q
from pt2q import meta
from pt2q.algorithms.rtn import WeightFormat, rtn_quantize
from pt2q.graph import get_constant
from pt2q.ops import DEQUANTIZE_WEIGHT, unpack_codes
from pt2q.passes.manager import PassManager
from pt2q.passes.pack_weights import PackWeights
from tests.conftest import call, count_of, nodes_of

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 24)          # 40 inputs: a last, shorter group with group_size 16
        self.fc2 = nn.Linear(24, 16, bias=False)
        self.fc3 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Shared(nn.Module):
    """One weight read by two linears."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def _state(gm) -> dict[str, torch.Tensor]:
    return dict(gm.named_parameters()) | dict(gm.named_buffers())


def _value(gm, arg):
    return get_constant(gm, arg) if isinstance(arg, torch.fx.Node) else arg


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 40)
    return model, x


def _quantized(gm, fmt: WeightFormat, only=None) -> dict:
    return {node.name: rtn_quantize(get_constant(gm, node.args[1]), fmt)
            for node in nodes_of(gm, aten.linear.default) if only is None or node.name in only}


def _substituted(model, x, gm, quantized) -> torch.fx.GraphModule:
    """A capture of a copy of `model` whose quantized layers hold their dequantized weight as a float parameter."""
    ref_model = copy.deepcopy(model)
    ref = pt2q.capture(ref_model, (x,))
    by_name = {n.name: n for n in ref.graph.nodes}
    with torch.no_grad():
        for name, qweight in quantized.items():
            get_constant(ref, by_name[name].args[1]).copy_(qweight.dequantize())
    return ref


FORMATS = {
    "int4_g16": WeightFormat(bits=4, group_size=16),
    "int3_asym_g8": WeightFormat(bits=3, group_size=8, sym=False),
    "int8_per_channel": WeightFormat(bits=8, group_size=-1),
    "nf4_g8": WeightFormat(bits=4, group_size=8, dtype="nf4"),
    "fp4_g8_dim0": WeightFormat(bits=4, group_size=8, dtype="fp4", group_dim=0),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pack_every_linear(fmt, mlp):
    fmt = FORMATS[fmt]
    model, x = mlp
    gm = pt2q.capture(model, (x,))
    get_attrs_before = sum(n.op == "get_attr" for n in gm.graph.nodes)
    assert count_of(gm, aten.linear.default) == 3 and count_of(gm, DEQUANTIZE_WEIGHT) == 0
    quantized = _quantized(gm, fmt)
    weights = {name: node.args[1].target for name, node in
               ((n.name, n) for n in nodes_of(gm, aten.linear.default))}
    reference = _substituted(model, x, gm, quantized)

    pack = PackWeights(quantized)
    gm, records = PassManager([pack])(gm)
    assert records[0].modified

    # node counts: one dequantize per linear, linears unchanged; per layer the float weight's get_attr
    # replaced by packed + scale (+ zero point) (+ code table)
    assert count_of(gm, aten.linear.default) == 3 and count_of(gm, DEQUANTIZE_WEIGHT) == 3
    per_layer = 2 + (not fmt.sym) + (fmt.dtype != "int")
    assert sum(n.op == "get_attr" for n in gm.graph.nodes) == get_attrs_before + 3 * (per_layer - 1)
    state = _state(gm)
    for name, linear in ((n.name, n) for n in nodes_of(gm, aten.linear.default)):
        dequantize = linear.args[1]
        assert dequantize.target is DEQUANTIZE_WEIGHT and list(dequantize.users) == [linear]
        qweight = quantized[name]
        packed, scale, zero_point, table = (_value(gm, a) for a in dequantize.args[:4])
        assert dequantize.args[4:] == (fmt.bits, fmt.group_size, list(qweight.shape), fmt.group_dim)
        assert packed.dtype == torch.uint8 and torch.equal(unpack_codes(packed, fmt.bits), qweight.codes.to(torch.int64))
        assert torch.equal(scale, qweight.scale)
        assert (zero_point is None) == fmt.sym and (table is None) == (fmt.dtype == "int")
        if zero_point is not None:
            assert zero_point.dtype == torch.uint8 and torch.equal(zero_point, qweight.zero_point)
        # metadata the backends read
        assert dequantize.meta["val"].shape == qweight.shape and dequantize.meta["val"].dtype == torch.float32
        assert dequantize.meta[meta.WEIGHT_FORMAT] == fmt
        assert dequantize.meta["nn_module_stack"] == linear.meta["nn_module_stack"]
        # the float weight is gone from the module (the bias stays)
        assert weights[name] not in state
    assert {"fc1.bias", "fc3.bias"} <= set(state) and not any(k.endswith(".weight") for k in state)

    # numerics: exactly the graph with each dequantized weight substituted
    for probe in (x, torch.randn(3, 40)):
        assert torch.equal(call(gm, (probe,)), call(reference, (probe,)))
    # the user's model keeps its weights
    assert model.fc1.weight.shape == (24, 40)


def test_report(mlp):
    model, x = mlp
    gm = pt2q.capture(model, (x,))
    fmt = WeightFormat(bits=4, group_size=16, sym=False)
    quantized = _quantized(gm, fmt)
    pack = PackWeights(quantized)
    PassManager([pack])(gm)
    report = pack.report
    assert list(report.layers) == list(quantized)
    shapes = {"fc1": (24, 40), "fc2": (16, 24), "fc3": (8, 16)}
    for info, (out, cols) in zip(report.layers.values(), shapes.values()):
        groups = -(-cols // 16)
        padded = groups * 16
        packed = out * padded * 4 // 8
        assert info == {"bits": 4, "group_size": 16, "dtype": "int", "sym": False, "float_bytes": 4 * out * cols,
                        "packed_bytes": packed + out * groups * 4 + out * groups}   # codes, scales, zero points
    assert report.float_bytes == 4 * (24 * 40 + 16 * 24 + 8 * 16)
    assert report.packed_bytes == sum(info["packed_bytes"] for info in report.layers.values())


def test_only_the_named_linears_are_packed(mlp):
    model, x = mlp
    gm = pt2q.capture(model, (x,))
    second = nodes_of(gm, aten.linear.default)[1].name
    quantized = _quantized(gm, WeightFormat(bits=4, group_size=8), only={second})
    reference = _substituted(model, x, gm, quantized)
    PassManager([PackWeights(quantized)])(gm)
    assert count_of(gm, DEQUANTIZE_WEIGHT) == 1
    linears = nodes_of(gm, aten.linear.default)
    assert [n.args[1].target is DEQUANTIZE_WEIGHT for n in linears] == [False, True, False]
    state = _state(gm)
    assert "fc1.weight" in state and "fc3.weight" in state and "fc2.weight" not in state
    assert torch.equal(call(gm, (x,)), call(reference, (x,)))


def test_a_shared_weight_stays_while_another_linear_reads_it():
    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(2, 16)
    gm = pt2q.capture(model, (x,))
    first, second = nodes_of(gm, aten.linear.default)
    assert first.args[1] is second.args[1]          # one get_attr, two readers
    fmt = WeightFormat(bits=4, group_size=8)
    qweight = rtn_quantize(model.fc.weight, fmt)
    PassManager([PackWeights({first.name: qweight})])(gm)
    assert first.args[1].target is DEQUANTIZE_WEIGHT and second.args[1].op == "get_attr"
    assert "fc.weight" in _state(gm)
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(x, qweight.dequantize(), model.fc.bias))
        expected = nn.functional.linear(hidden, model.fc.weight, model.fc.bias)
    torch.testing.assert_close(call(gm, (x,)), expected, rtol=1e-6, atol=1e-6)


def test_nothing_to_pack_is_not_a_modification(mlp):
    model, x = mlp
    gm = pt2q.capture(model, (x,))
    result = PackWeights({}).call(gm)
    assert not result.modified and count_of(gm, DEQUANTIZE_WEIGHT) == 0


def test_unknown_node_name(mlp):
    model, x = mlp
    gm = pt2q.capture(model, (x,))
    qweight = rtn_quantize(model.fc1.weight, WeightFormat())
    with pytest.raises(KeyError, match="pack_weights: no node 'linear_42' in the graph"):
        PackWeights({"linear_42": qweight}).call(gm)

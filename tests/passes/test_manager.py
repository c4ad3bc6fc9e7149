"""PassManager: order, timing records, observers and linting."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pt2q
from pt2q.passes import MatmulToLinear, PassManager, PassRecord, PassResult

aten = torch.ops.aten


class Recording:
    """A pass that records when it ran and optionally changes nothing."""

    def __init__(self, name, log, modified=False):
        self.name, self.log, self.modified = name, log, modified
        self.report = {"ran": name}

    def call(self, gm):
        self.log.append(self.name)
        return PassResult(gm, self.modified)


class ReplaceReluWithSigmoid:
    name = "relu_to_sigmoid"

    def call(self, gm):
        modified = False
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                node.target = aten.sigmoid.default
                modified = True
        return PassResult(gm, modified)


class BreakTopologicalOrder:
    """Moves the first call_function before its own inputs: an invalid graph."""

    name = "breaker"

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        first = next(iter(gm.graph.nodes))
        first.prepend(node)
        return PassResult(gm, True)


class ReturnsNewModule:
    name = "new_module"

    def __init__(self, replacement):
        self.replacement = replacement

    def call(self, gm):
        return PassResult(self.replacement, False)


def _gm():
    return pt2q.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))


def test_runs_passes_in_order_and_records_them():
    log = []
    passes = [Recording("a", log), Recording("b", log, modified=True), Recording("c", log)]
    gm, records = PassManager(passes)(_gm())
    assert log == ["a", "b", "c"]
    assert [r.name for r in records] == ["a", "b", "c"]
    assert [r.modified for r in records] == [False, True, False]
    assert all(isinstance(r, PassRecord) and r.seconds >= 0 for r in records)
    assert [r.report for r in records] == [{"ran": "a"}, {"ran": "b"}, {"ran": "c"}]


def test_timings_are_measured():
    class Slow(Recording):
        def call(self, gm):
            import time
            time.sleep(0.02)
            return super().call(gm)

    _, records = PassManager([Slow("slow", [])])(_gm())
    assert records[0].seconds >= 0.015


def test_modified_graph_is_recompiled():
    gm = _gm()
    x = torch.randn(2, 4)
    out, _ = PassManager([ReplaceReluWithSigmoid()])(gm)
    assert "sigmoid" in out.code
    result = out(x)
    assert (result > 0).all() and (result < 1).all()


def test_observers_see_every_intermediate_graph():
    seen = []

    def observer(name, gm, record):
        seen.append((name, "sigmoid" in gm.code, record.modified))

    manager = PassManager([Recording("before", []), ReplaceReluWithSigmoid(), Recording("after", [])])
    manager.add_observer(observer)
    manager.add_observer(lambda name, gm, record: seen.append(("second observer", name)))
    manager(_gm())
    assert seen == [("before", False, False), ("second observer", "before"),
                    ("relu_to_sigmoid", True, True), ("second observer", "relu_to_sigmoid"),
                    ("after", True, False), ("second observer", "after")]


def test_lints_modified_graphs():
    with pytest.raises(RuntimeError, match="used before it has been defined"):
        PassManager([BreakTopologicalOrder()])(_gm())


def test_next_pass_gets_the_returned_module():
    replacement = _gm()
    received = []

    class Probe:
        name = "probe"

        def call(self, gm):
            received.append(gm)
            return PassResult(gm, False)

    out, _ = PassManager([ReturnsNewModule(replacement), Probe()])(_gm())
    assert received == [replacement] and out is replacement


def test_with_the_real_pass():
    class Conv1DLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))
            self.bias = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    gm, records = PassManager([MatmulToLinear()])(pt2q.capture(Conv1DLike(), (torch.randn(2, 4),)))
    assert records[0].name == "matmul_to_linear" and records[0].modified
    assert records[0].report == [n.name for n in gm.graph.nodes if n.target is aten.linear.default]
    assert "linear" in gm.code and "addmm" not in gm.code

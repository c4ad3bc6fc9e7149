"""DynamicQparamsIncludeZero: dynamic int8 qparams as the op computes them, also under Inductor."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q.passes.dynamic_qparams_include_zero import CHOOSE_QPARAMS, DynamicQparamsIncludeZero
from pt2q.passes.manager import PassManager
from tests.conftest import call, count_of, rel_error


class PooledHead(torch.nn.Module):
    """A linear after a mean: its dynamic activation is all positive when the input is."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, h):
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    model, h = PooledHead().eval(), torch.randn(2, 16, 8, 8).abs()
    return model, h, pt2q.quantize(model, pt2q.DynamicQuantConfig(), example_inputs=(h,), progress=False)


def test_upstream_decomposition_still_leaves_zero_out_of_the_range():
    # When this fails, Inductor's decomposition includes 0 as the op does and the pass can go.
    from torch._inductor.decomposition import choose_qparams_tensor as inductor_choose_qparams

    x = torch.rand(64) + 1.0  # all positive
    eager_scale, eager_zero = CHOOSE_QPARAMS(x, 0, 255, 2 ** -12, torch.uint8)
    inductor_scale, inductor_zero = inductor_choose_qparams(x, 0, 255, 2 ** -12, torch.uint8)
    assert eager_zero.item() == inductor_zero.item() == 0
    assert inductor_scale.item() < 0.6 * eager_scale.item()


@pytest.mark.parametrize("shift", [1.0, 0.0, -3.0])  # all positive, mixed, all negative
def test_the_rewritten_graph_computes_the_ops_qparams(head, shift):
    model, h, qmodel = head
    rewritten = torch.fx.GraphModule(qmodel, qmodel.graph.__deepcopy__())
    rewritten, _ = PassManager([DynamicQparamsIncludeZero()])(rewritten)
    assert count_of(qmodel, CHOOSE_QPARAMS) == 1 and count_of(rewritten, CHOOSE_QPARAMS) == 0
    probe = h + shift
    assert torch.equal(call(rewritten, (probe,)), call(qmodel, (probe,)))


def test_compiled_dynamic_int8_matches_its_qdq_graph_for_positive_activations(head):
    from pt2q.backends import inductor

    model, h, qmodel = head
    compiled = inductor.compile(qmodel, (h,))
    assert compiled.int8_kernels  # still oneDNN's int8 linear
    with torch.no_grad():
        assert rel_error(compiled(h), call(qmodel, (h,))) < 1e-4  # was 0.42 with Inductor's decomposition
        assert rel_error(compiled(h), model(h)) < 0.02
    assert count_of(qmodel, CHOOSE_QPARAMS) == 1  # the caller's graph is not rewritten

"""The coverage report: weighted ops left in float, why, and the quantized share of weight elements."""
import logging

import pytest
import torch

import pt2q
from pt2q import CoverageError
from pt2q.coverage import SET_LOCAL, TIED


class Mixed(torch.nn.Module):
    """A linear, a linear kept float by name, and a batched matmul with a constant weight (no rule)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.kept = torch.nn.Linear(32, 32)
        self.experts = torch.nn.Parameter(torch.randn(4, 32, 8))     # [experts, in, out]

    def forward(self, x):
        h = self.kept(torch.relu(self.first(x)))                    # [4, n, 32]
        return torch.bmm(h, self.experts)


def quantize(model, config, **options):
    x = torch.randn(4, 6, 16)
    return pt2q.quantize(model, config, [(x,)], progress=False, **options)


def test_report_lists_float_ops_with_reasons_and_the_element_share(caplog):
    config = pt2q.StaticQuantConfig()
    config.set_local(r"kept", None)
    with caplog.at_level(logging.WARNING, logger="pt2q"):
        qmodel = quantize(Mixed().eval(), config)
    report = qmodel.meta["pt2q_report"]
    reasons = {layer.node: layer.reason for layer in report.float_layers}
    assert reasons == {"linear_1": SET_LOCAL, "bmm": "rule 'attention_matmul' is opt-in and off (the config "
                       "option 'quantize_attention_matmul' turns it on)"}
    assert report.quantized_layers == 1 and report.quantized_elements == 16 * 32
    assert report.float_elements == 32 * 32 + 4 * 32 * 8
    assert report.share == pytest.approx(512 / (512 + 1024 + 1024))
    assert [layer.op for layer in report.unexpected] == ["aten.bmm.default"]
    # one warning line for what nobody asked for; the set_local layer is not in it
    warnings = [r.getMessage() for r in caplog.records if "left in float" in r.getMessage()]
    assert len(warnings) == 1 and "bmm" in warnings[0] and "kept" not in warnings[0].split(":")[1]


def test_require_full_coverage_names_the_first_uncovered_op():
    model = Mixed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = pt2q.StaticQuantConfig()
    config.set_local(r"kept", None)
    with pytest.raises(CoverageError, match=r"weighted op 'bmm' .* is left in float: rule 'attention_matmul' is opt-in"):
        quantize(model, config, require_full_coverage=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_full_model_passes_require_full_coverage_and_a_removed_rule_shows_in_the_report(monkeypatch):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Two().eval()
    full = quantize(model, pt2q.StaticQuantConfig(), require_full_coverage=True)
    assert full.meta["pt2q_report"].share == 1.0 and not full.meta["pt2q_report"].float_layers
    from pt2q.quantizers import base

    monkeypatch.delitem(base.RULE_BY_OP, torch.ops.aten.linear.default)   # the linear rule removed
    missing = quantize(model, pt2q.StaticQuantConfig())
    report = missing.meta["pt2q_report"]
    assert report.share == 0.0 and len(report.unexpected) == 2
    assert all(layer.reason.startswith("no quantizer rule for aten.linear") for layer in report.unexpected)


def test_weight_only_reasons_and_tied_heads_are_not_counted():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 32)
            self.body = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    ids = torch.randint(0, 50, (2, 5))
    qmodel = pt2q.quantize(Tied().eval(), pt2q.RTNConfig(bits=4, group_size=32), [(ids,)], progress=False)
    report = qmodel.meta["pt2q_report"]
    assert report.quantized_layers == 1 and report.share == 1.0
    assert [layer.reason for layer in report.float_layers] == [TIED]


def test_a_weight_computed_at_run_time_is_reported(monkeypatch):
    from torch.nn.utils import parametrizations

    from pt2q.coverage import COMPUTED
    from pt2q.passes.fold_constant_weights import FoldConstantWeights

    monkeypatch.setattr(FoldConstantWeights, "applies", staticmethod(lambda graph_module: False))  # as in QAT
    model = torch.nn.Sequential(parametrizations.weight_norm(torch.nn.Conv1d(4, 4, 3)), torch.nn.Conv1d(4, 4, 1))
    qmodel = pt2q.quantize(model.eval(), pt2q.StaticQuantConfig(), [(torch.randn(2, 4, 9),)], progress=False)
    report = qmodel.meta["pt2q_report"]
    assert [(layer.reason, layer.elements) for layer in report.float_layers] == [(COMPUTED, 4 * 4 * 3)]
    assert report.share == pytest.approx(16 / (16 + 48))

"""pt2q.pipeline: the stages each config declares, run by the one pass manager and seen by observers."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import meta, pipeline
from pt2q.passes.manager import PassManager, PassResult, observe_passes

from .models import build


@pytest.mark.parametrize("config, algorithms", [
    (pt2q.StaticQuantConfig(), ["int8"]),
    (pt2q.DynamicQuantConfig(), ["int8"]),
    (pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5)), ["smooth_quant", "int8"]),
    (pt2q.RTNConfig(bits=4, group_size=32), ["weight_only"]),
    (pt2q.GPTQConfig(bits=4, group_size=32), ["weight_only"]),
    (pt2q.SmoothQuantConfig(alpha=0.5), ["smooth_quant"]),
])
def test_each_config_declares_its_algorithms_and_stages(config, algorithms):
    built = pipeline.build(config)
    assert [a.name for a in built.algorithms] == algorithms
    assert built.stage_names() == [*(f"{a}.plan" for a in algorithms), "calibrate",
                                   *(f"{a}.apply" for a in algorithms)]
    sequential = isinstance(config, pt2q.GPTQConfig)
    assert [a.name for a in built.sequential] == (["weight_only"] if sequential else [])


def test_build_refuses_what_is_not_a_config():
    with pytest.raises(pt2q.ConfigError, match="config must be a StaticQuantConfig"):
        pipeline.build({"bits": 4})


def _observed_run(config, zm):
    seen = []
    with observe_passes(lambda name, gm, record: seen.append((name, record.depth, record.composite))):
        qmodel = pt2q.quantize(zm.model, config, [(zm.args, zm.kwargs)], progress=False)
    return qmodel, seen


def test_quantize_runs_the_declared_stages_through_the_pass_manager():
    zm = build("llama")
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5))
    qmodel, seen = _observed_run(config, zm)
    stages = [name for name, depth, _ in seen if depth == 0]
    assert stages == pipeline.build(config).stage_names()
    inner = [name for name, depth, _ in seen if depth > 0]
    # the algorithms' own passes ran inside the stages, in order, and the observers saw them
    for expected in ("smooth_quant_groups", "insert_channel_recorders", "prepare_pt2e", "smooth_quant_apply",
                     "convert_pt2e"):
        assert expected in inner
    assert inner.index("prepare_pt2e") < inner.index("smooth_quant_apply") < inner.index("convert_pt2e")
    # a stage that grouped passes is composite; the calibration stage is a graph step of its own
    assert {name: composite for name, depth, composite in seen if depth == 0} == {
        "smooth_quant.plan": True, "int8.plan": True, "calibrate": False, "smooth_quant.apply": True,
        "int8.apply": True}
    assert meta.PIPELINE not in qmodel.meta and meta.QUANTIZED in qmodel.meta


def test_weight_only_runs_its_stages_and_the_prepared_model_carries_the_pipeline():
    zm = build("llama")
    config = pt2q.GPTQConfig(bits=4, group_size=16)
    prepared = pt2q.prepare(zm.model, config, (zm.args, zm.kwargs))
    assert isinstance(prepared.meta[meta.PIPELINE], pipeline.Pipeline)
    assert pt2q.calibrate(prepared, [(zm.args, zm.kwargs)] * 3, progress=False) == 3
    qmodel = pt2q.convert(prepared)
    assert meta.PIPELINE not in qmodel.meta and meta.WEIGHT_ONLY_REPORT in qmodel.meta
    with pytest.raises(pt2q.NotPreparedError):
        pt2q.calibrate(prepared, [(zm.args, zm.kwargs)], progress=False)


def test_smooth_quant_runs_the_smooth_quant_pipeline_and_returns_an_fp32_graph():
    zm = build("llama")
    seen = []
    with observe_passes(lambda name, gm, record: seen.append(name) if record.depth == 0 else None):
        smoothed, report = pt2q.smooth_quant(zm.model, [(zm.args, zm.kwargs)], alpha=0.5, progress=False)
    assert seen == pipeline.build(pt2q.SmoothQuantConfig()).stage_names()
    assert report.groups and meta.QUANTIZED not in smoothed.meta and meta.CONFIG not in smoothed.meta


class _Grouping:
    name, groups_passes, report = "grouping", True, None

    def __init__(self, inner):
        self.inner = inner

    def call(self, graph_module):
        PassManager(self.inner)(graph_module)
        return PassResult(graph_module, True)


class _Touch:
    report = None

    def __init__(self, name):
        self.name = name

    def call(self, graph_module):
        return PassResult(graph_module, False)


def test_pass_records_say_depth_inner_count_and_composite():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    seen = []
    with observe_passes(lambda name, _gm, record: seen.append((name, record.depth, record.inner, record.composite))):
        PassManager([_Touch("first"), _Grouping([_Touch("a"), _Grouping([_Touch("b")])]), _Grouping([])])(gm)
    assert seen == [("first", 0, 0, False), ("a", 1, 0, False), ("b", 2, 0, False), ("grouping", 1, 1, True),
                    ("grouping", 0, 3, True), ("grouping", 0, 0, False)]


def test_calibrate_counts_the_batches_a_local_gptq_rule_used():
    zm = build("llama")
    config = pt2q.RTNConfig(bits=4, group_size=16).set_local(r".*mlp.*", pt2q.GPTQConfig(bits=4, group_size=16,
                                                                                          n_samples=2))
    prepared = pt2q.prepare(zm.model, config, (zm.args, zm.kwargs))
    assert pt2q.calibrate(prepared, [(zm.args, zm.kwargs)] * 3, progress=False) == 2

"""pt2q.autotune: search order, first pass wins, max_trials / timeout_s, fallbacks ranked by the dump
tool's per-node SQNR (and really float in the graph), bad eval_fn, the user's objects untouched,
save / load of the tuned model, TuningConfig checks and the config-set helpers."""
from __future__ import annotations

import math
import re
import sys
import warnings

import pytest
import torch

import pt2q
from pt2q import pipeline
from pt2q.graph import get_constant, module_fqn
from tests.conftest import ModelSnapshot
from tests.models import build

autotune_module = sys.modules["pt2q.autotune"]  # pt2q.autotune is the function
config_summary = autotune_module.config_summary


def mlp():
    """The zoo MLP (3 linears named '0', '2', '4'), with 4 calibration batches."""
    zoo_model = build("mlp")
    generator = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 32, generator=generator),) for _ in range(4)]
    return zoo_model, calib


def output_fidelity(zoo_model):
    """eval_fn: 1 - relative error of the model's output against the fp32 model's on the example. fp32
    scores exactly 1; every quantized layer lowers it."""
    with torch.no_grad():
        reference = zoo_model.model(*zoo_model.args)

    def eval_fn(model):
        with torch.no_grad():
            output = model(*zoo_model.args)
        return 1.0 - ((output - reference).norm() / reference.norm()).item()

    return eval_fn


class ScoreByConfig:
    """eval_fn with chosen scores: the fp32 model scores 1.0, a quantized model the score of its config's
    class (from its pt2q_config meta). Records what it scored, in order."""

    def __init__(self, scores: dict[type, float]):
        self.scores, self.seen = scores, []

    def __call__(self, model):
        config = getattr(model, "meta", {}).get("pt2q_config")
        self.seen.append(type(config) if config is not None else "fp32")
        return 1.0 if config is None else self.scores[type(config)]


def autotune_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("pt2q.autotune")]


def float_layers(qmodel) -> set[str]:
    """Module names of the linears of `qmodel` that are not quantized; each must read a float32 constant."""
    quantized = {node.name for node in pipeline.quantized_layer_nodes(qmodel)}
    found = set()
    for node in qmodel.graph.nodes:
        if node.target is torch.ops.aten.linear.default and node.name not in quantized:
            weight = get_constant(qmodel, node.args[1])
            assert weight is not None and weight.dtype == torch.float32, f"{node.name}: weight from {node.args[1]}"
            found.add(module_fqn(node))
    return found


# -- the search ---------------------------------------------------------------------------------------------
def test_stops_at_the_first_passing_config_and_later_configs_never_run(recwarn):
    zoo_model, calib = mlp()
    eval_fn = ScoreByConfig({pt2q.RTNConfig: 0.5, pt2q.StaticQuantConfig: 0.995, pt2q.DynamicQuantConfig: 1.0})
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(bits=4, group_size=8), pt2q.StaticQuantConfig(),
                                           pt2q.DynamicQuantConfig()], tolerable_loss=0.01)
    result = pt2q.autotune(zoo_model.model, tuning, eval_fn, calib, verbose=False)
    # RTN fails, then its fallbacks (1 and 2 of its 3 layers float) fail, then static passes: dynamic never runs.
    assert eval_fn.seen == ["fp32", pt2q.RTNConfig, pt2q.RTNConfig, pt2q.RTNConfig, pt2q.StaticQuantConfig]
    assert [(t.config_index, len(t.kept_float), t.passed) for t in result.trials] == \
        [(0, 0, False), (0, 1, False), (0, 2, False), (1, 0, True)]
    assert result.passed and result.stop_reason == "passed" and result.best is result.trials[-1]
    assert result.best.loss == pytest.approx(0.005) and result.fp32_score == 1.0
    assert pipeline.count_quantized_layers(result.model) == 3
    assert isinstance(result.model.meta["pt2q_config"], pt2q.StaticQuantConfig)
    assert autotune_warnings(recwarn) == []  # a pass is not warned about


def test_without_fallbacks_the_next_config_comes_at_once():
    zoo_model, calib = mlp()
    eval_fn = ScoreByConfig({pt2q.RTNConfig: 0.5, pt2q.StaticQuantConfig: 0.995})
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(), pt2q.StaticQuantConfig()], fallback_layers=())
    result = pt2q.autotune(zoo_model.model, tuning, eval_fn, calib, verbose=False)
    assert eval_fn.seen == ["fp32", pt2q.RTNConfig, pt2q.StaticQuantConfig] and len(result.trials) == 2


def test_fallback_after_all_configs_tries_every_config_first_then_the_best_ones_fallbacks():
    zoo_model, calib = mlp()
    eval_fn = ScoreByConfig({pt2q.RTNConfig: 0.5, pt2q.StaticQuantConfig: 0.9})
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(), pt2q.StaticQuantConfig()], fallback_after="all_configs",
                               fallback_layers=(1,))
    with pytest.warns(UserWarning, match="every config and fallback was tried"):
        result = pt2q.autotune(zoo_model.model, tuning, eval_fn, calib, verbose=False)
    assert [(t.config_index, len(t.kept_float)) for t in result.trials] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert result.stop_reason == "exhausted" and result.best.config_index == 1


def test_lower_is_better_scores_count_a_rise_as_loss():
    zoo_model, calib = mlp()
    perplexity = {pt2q.RTNConfig: 10.2, pt2q.StaticQuantConfig: 10.05}

    def eval_fn(model):
        config = getattr(model, "meta", {}).get("pt2q_config")
        return 10.0 if config is None else perplexity[type(config)]

    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(), pt2q.StaticQuantConfig()], higher_is_better=False,
                               fallback_layers=())
    result = pt2q.autotune(zoo_model.model, tuning, eval_fn, calib, verbose=False)
    assert [t.loss for t in result.trials] == [pytest.approx(0.02), pytest.approx(0.005)]
    assert [t.passed for t in result.trials] == [False, True]


def test_respects_max_trials():
    zoo_model, calib = mlp()
    eval_fn = ScoreByConfig({pt2q.RTNConfig: 0.5, pt2q.StaticQuantConfig: 0.6})
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(), pt2q.StaticQuantConfig()], max_trials=2)
    with pytest.warns(UserWarning, match=r"stopped at max_trials=2"):
        result = pt2q.autotune(zoo_model.model, tuning, eval_fn, calib, verbose=False)
    assert len(result.trials) == 2 and eval_fn.seen == ["fp32", pt2q.RTNConfig, pt2q.RTNConfig]
    assert result.stop_reason == "max_trials" and not result.passed


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_respects_timeout_s_no_new_trial_once_the_budget_is_spent(monkeypatch):
    zoo_model, calib = mlp()
    clock = FakeClock()
    monkeypatch.setattr(autotune_module, "_clock", clock)
    scores = ScoreByConfig({pt2q.RTNConfig: 0.5})

    def slow_eval(model):  # every evaluation "takes" 10 s
        clock.now += 10
        return scores(model)

    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig()], timeout_s=25)
    with pytest.warns(UserWarning, match=r"timeout_s=25 used up"):
        result = pt2q.autotune(zoo_model.model, tuning, slow_eval, calib, verbose=False)
    # fp32 at t=10, trial 1 starts at 10 and ends at 20, trial 2 starts at 20 (< 25) and ends at 30: no third.
    assert len(result.trials) == 2 and result.stop_reason == "timeout_s"
    assert result.seconds == 30 and [t.seconds for t in result.trials] == [10, 10]


def test_no_trial_in_the_budget_returns_the_fp32_capture_with_a_warning(monkeypatch):
    zoo_model, calib = mlp()
    clock = FakeClock()
    monkeypatch.setattr(autotune_module, "_clock", clock)

    def slow_eval(model):
        clock.now += 10
        return 1.0

    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig()], timeout_s=5)
    with pytest.warns(UserWarning, match="no trial ran .*returned the fp32 capture"):
        result = pt2q.autotune(zoo_model.model, tuning, slow_eval, calib, verbose=False)
    assert result.trials == [] and result.best is None and not result.passed
    assert pipeline.count_quantized_layers(result.model) == 0
    with torch.no_grad():
        assert torch.equal(result.model(*zoo_model.args), zoo_model.model(*zoo_model.args))


def test_nothing_passes_warns_and_returns_the_best_fallback_with_its_layers_really_float(tmp_path):
    zoo_model, calib = mlp()
    # A user rule naming every layer: the fallback's keep-float rules come later and must still win.
    config = pt2q.RTNConfig(bits=2, group_size=8).set_local(r"[0-9]", pt2q.RTNConfig(bits=2, group_size=8))
    tuning = pt2q.TuningConfig(config_set=[config], tolerable_loss=0.0)
    with pytest.warns(UserWarning, match=r"no trial within the tolerable loss \(every config and fallback was tried"):
        result = pt2q.autotune(zoo_model.model, tuning, output_fidelity(zoo_model), calib, verbose=False)
    assert [len(t.kept_float) for t in result.trials] == [0, 1, 2] and result.stop_reason == "exhausted"
    assert result.best is max(result.trials, key=lambda t: t.score) and result.best.kept_float
    # Each fallback keeps the worst layers of the same ranking; they are real module names.
    first, second = result.trials[1].kept_float, result.trials[2].kept_float
    assert second[:1] == first and set(second) <= {"0", "2", "4"}
    # The ranking is the dump tool's: lowest per-node SQNR first on the example inputs.
    dumped = pt2q.debug.dump_pipeline(zoo_model.model, config, calib, out_dir=tmp_path / "dump", compile=False,
                                      html=False, progress=False)
    assert [row.module for row in dumped.numeric][:2] == list(second)
    # In the returned graph those layers are float and the others quantized.
    assert float_layers(result.model) == set(result.best.kept_float)
    assert pipeline.count_quantized_layers(result.model) == 3 - len(result.best.kept_float)
    assert "1: " in result.table() and "+1 set_local" in result.table()


def test_the_table_is_printed_and_kept_on_the_model(capsys):
    zoo_model, calib = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(bits=8, group_size=-1)], tolerable_loss=0.05)
    result = pt2q.autotune(zoo_model.model, tuning, output_fidelity(zoo_model), calib)
    printed = capsys.readouterr().out
    assert printed.strip() == result.table() and "RTNConfig(bits=8, group_size=-1)" in printed
    assert re.search(r"^\s+1\s+RTNConfig\(bits=8, group_size=-1\)\s+-\s+0\.99\d+\s+0\.\d+%\s+\d+\.\d\s+yes <$",
                     printed, re.M), printed
    record = result.model.meta["pt2q_tuning"]
    assert record["chosen_trial"] == 1 and record["trials"][0]["passed"] and record["table"] == result.table()


# -- bad input ----------------------------------------------------------------------------------------------
def test_eval_fn_raising_on_the_baseline_names_it_and_chains_the_error():
    zoo_model, calib = mlp()
    snapshot = ModelSnapshot(zoo_model.model)

    def broken(model):
        raise ValueError("no labels")

    with pytest.raises(pt2q.TuningError, match=r"eval_fn raised on the fp32 model .*ValueError: no labels") as info:
        pt2q.autotune(zoo_model.model, pt2q.TuningConfig(config_set=[pt2q.RTNConfig()]), broken, calib)
    assert info.value.trial is None and isinstance(info.value.__cause__, ValueError)
    snapshot.assert_unchanged()


def test_eval_fn_raising_on_a_trial_names_the_trial_and_its_config():
    zoo_model, calib = mlp()
    snapshot = ModelSnapshot(zoo_model.model)
    config = pt2q.RTNConfig(bits=3, group_size=8)

    def fails_on_quantized(model):
        if isinstance(model, torch.fx.GraphModule):
            raise RuntimeError("shape mismatch")
        return 1.0

    with pytest.raises(pt2q.TuningError, match=re.escape("eval_fn raised on trial 1 (RTNConfig(bits=3, group_size=8))")
                       + ".*RuntimeError: shape mismatch") as info:
        pt2q.autotune(zoo_model.model, pt2q.TuningConfig(config_set=[config]), fails_on_quantized, calib)
    assert info.value.trial == 1 and isinstance(info.value.__cause__, RuntimeError)
    snapshot.assert_unchanged()
    assert config.local_rules == []


@pytest.mark.parametrize("bad, message", [
    (math.nan, "returned nan on trial 1"),
    (math.inf, "returned inf on trial 1"),
    ("0.9", "returned '0.9' \\(str\\) on trial 1 .*must return one number"),
    (None, "returned None \\(NoneType\\) on trial 1"),
    (torch.tensor([0.9, 0.8]), "returned tensor.* on trial 1"),
])
def test_eval_fn_returning_a_non_number_names_the_trial(bad, message):
    zoo_model, calib = mlp()
    snapshot = ModelSnapshot(zoo_model.model)

    def eval_fn(model):
        return bad if isinstance(model, torch.fx.GraphModule) else 1.0

    with pytest.raises(pt2q.TuningError, match=message) as info:
        pt2q.autotune(zoo_model.model, pt2q.TuningConfig(config_set=[pt2q.RTNConfig()]), eval_fn, calib)
    assert info.value.trial == 1
    snapshot.assert_unchanged()


def test_eval_fn_nan_on_the_baseline_and_a_zero_baseline_are_errors():
    zoo_model, calib = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig()])
    with pytest.raises(pt2q.TuningError, match="returned nan on the fp32 model"):
        pt2q.autotune(zoo_model.model, tuning, lambda model: math.nan, calib)
    with pytest.raises(pt2q.TuningError, match="scored the fp32 model 0"):
        pt2q.autotune(zoo_model.model, tuning, lambda model: 0.0, calib)


def test_a_one_element_tensor_score_is_a_number():
    zoo_model, calib = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig(bits=8, group_size=-1)], tolerable_loss=0.5)
    result = pt2q.autotune(zoo_model.model, tuning, lambda model: torch.tensor(0.75), calib, verbose=False)
    assert result.trials[0].score == 0.75 and result.passed


def test_a_failing_quantization_is_raised_as_it_is_with_a_note_naming_the_trial():
    zoo_model, _ = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.GPTQConfig()])  # GPTQ needs calibration data
    with pytest.raises(pt2q.CalibrationError) as info:
        pt2q.autotune(zoo_model.model, tuning, lambda model: 1.0, example_inputs=zoo_model.args)
    assert any("raised while quantizing trial 1 (GPTQConfig())" in note for note in info.value.__notes__)


def test_the_users_model_and_configs_are_unchanged():
    zoo_model, calib = mlp()
    snapshot = ModelSnapshot(zoo_model.model)
    configs = [pt2q.RTNConfig(bits=2, group_size=8), pt2q.StaticQuantConfig().set_local(r"4", None)]
    rules_before = [list(c.local_rules) for c in configs]
    tuning = pt2q.TuningConfig(config_set=list(configs), tolerable_loss=0.0, fallback_layers=(1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pt2q.autotune(zoo_model.model, tuning, output_fidelity(zoo_model), calib, verbose=False)
    assert len(result.trials) == 4
    snapshot.assert_unchanged()
    assert tuning.config_set == configs and all(a is b for a, b in zip(tuning.config_set, configs))
    assert [c.local_rules for c in configs] == rules_before
    assert all(t.config is not configs[t.config_index] for t in result.trials)
    # The user's own rule is in the trial configs, the fallback rule after it.
    static_fallback = result.trials[3]
    assert static_fallback.config.local_rules[0] == (r"4", None) and len(static_fallback.config.local_rules) == 2


def test_the_tuned_model_saves_and_loads_with_its_table(tmp_path):
    zoo_model, calib = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.StaticQuantConfig()], tolerable_loss=0.0, fallback_layers=(1,))
    with pytest.warns(UserWarning, match="no trial within"):
        result = pt2q.autotune(zoo_model.model, tuning, output_fidelity(zoo_model), calib, verbose=False)
    assert result.best.kept_float  # a fallback model: one layer float, the others int8
    path = tmp_path / "tuned.pt2"
    pt2q.save(result.model, path)
    loaded = pt2q.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*zoo_model.args), result.model(*zoo_model.args))
    assert loaded.meta["pt2q_tuning"] == result.model.meta["pt2q_tuning"]
    assert pipeline.count_quantized_layers(loaded) == 2


# -- TuningConfig -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"config_set": []}, "config_set must be a non-empty list"),
    ({"config_set": pt2q.RTNConfig()}, "config_set must be a non-empty list"),
    ({"config_set": [pt2q.SmoothQuantConfig()]}, r"config_set\[0\] is a SmoothQuantConfig.*smooth_quant="),
    ({"config_set": [pt2q.RTNConfig(), "static"]}, r"config_set\[1\] is a str"),
    ({"tolerable_loss": -0.1}, "tolerable_loss=-0.1 is not valid"),
    ({"tolerable_loss": "0.01"}, "tolerable_loss='0.01' is not valid"),
    ({"tolerable_loss": math.nan}, "tolerable_loss=nan is not valid"),
    ({"max_trials": 0}, "max_trials=0 is not valid"),
    ({"max_trials": 2.5}, "max_trials=2.5 is not valid"),
    ({"max_trials": True}, "max_trials=True is not valid"),
    ({"timeout_s": 0}, "timeout_s=0 is not valid"),
    ({"timeout_s": -5.0}, "timeout_s=-5.0 is not valid"),
    ({"higher_is_better": "yes"}, "higher_is_better must be True or False"),
    ({"fallback_layers": (2, 1)}, r"fallback_layers=\(2, 1\) is not valid"),
    ({"fallback_layers": (0,)}, r"fallback_layers=\(0,\) is not valid"),
    ({"fallback_layers": 3}, "fallback_layers=3 is not valid"),
    ({"fallback_after": "never"}, "fallback_after='never' is not valid; valid: 'each_config', 'all_configs'"),
    ({"tolerance": 0.01}, "TuningConfig has no field 'tolerance'"),
])
def test_tuning_config_fields_are_checked(fields, message):
    fields = {"config_set": [pt2q.RTNConfig()], **fields}
    with pytest.raises(pt2q.ConfigError, match=message):
        pt2q.TuningConfig(**fields)


def test_fields_assigned_later_are_checked_when_autotune_starts():
    zoo_model, calib = mlp()
    tuning = pt2q.TuningConfig(config_set=[pt2q.RTNConfig()])
    tuning.max_trials = 0
    with pytest.raises(pt2q.ConfigError, match="max_trials=0"):
        pt2q.autotune(zoo_model.model, tuning, lambda model: 1.0, calib)
    with pytest.raises(pt2q.ConfigError, match="takes a pt2q.TuningConfig"):
        pt2q.autotune(zoo_model.model, [pt2q.RTNConfig()], lambda model: 1.0, calib)
    with pytest.raises(pt2q.ConfigError, match="eval_fn must be a callable"):
        pt2q.autotune(zoo_model.model, pt2q.TuningConfig(config_set=[pt2q.RTNConfig()]), 0.9, calib)


def test_tuning_config_is_not_a_quantization_config():
    from pt2q.config import CONFIG_KINDS

    assert pt2q.TuningConfig not in CONFIG_KINDS.values()


# -- the helpers --------------------------------------------------------------------------------------------
def test_int8_tuning_config():
    tuning = pt2q.get_int8_tuning_config(tolerable_loss=0.02, max_trials=7)
    assert tuning.tolerable_loss == 0.02 and tuning.max_trials == 7
    configs = tuning.config_set
    assert configs[0] == pt2q.StaticQuantConfig()
    alphas = [c.smooth_quant.alpha for c in configs if getattr(c, "smooth_quant", None) is not None]
    assert alphas[:2] == [0.5, "auto"]
    # the summary that names each trial tells the SmoothQuant entries apart, the default alpha included
    assert config_summary(configs[1]) == "StaticQuantConfig(smooth_quant=SmoothQuantConfig(alpha=0.5))"
    assert any(getattr(c, "activation_observer", None) == "minmax" for c in configs)
    assert isinstance(configs[-1], pt2q.DynamicQuantConfig)
    assert all(c.backend == "xpu" for c in pt2q.get_int8_tuning_config(backend="xpu").config_set)


def test_woq_tuning_config_in_increasing_cost():
    from pt2q import config as config_module

    tuning = pt2q.get_woq_tuning_config(bits=3, group_size=32, timeout_s=600)
    names = [type(c).__name__ for c in tuning.config_set]
    assert names[:2] == ["RTNConfig", "RTNConfig"] and tuning.config_set[1].mse_clip
    assert names.index("AWQConfig") < names.index("GPTQConfig")
    for optional in ("TEQConfig", "AutoRoundConfig"):  # trained per block: after GPTQ, when this pt2q has them
        if hasattr(config_module, optional):
            assert names.index(optional) > names.index("GPTQConfig")
    if hasattr(config_module, "HQQConfig"):
        assert names.index("RTNConfig") < names.index("HQQConfig") < names.index("AWQConfig")
    assert all((c.bits, c.group_size) == (3, 32) for c in tuning.config_set) and tuning.timeout_s == 600

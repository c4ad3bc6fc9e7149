"""`pt2q.autotune`: try quantization configs in order until one keeps the user's metric close to fp32's.

    tuning = pt2q.TuningConfig(config_set=[pt2q.StaticQuantConfig(), ...], tolerable_loss=0.01)
    result = pt2q.autotune(model, tuning, eval_fn, calib_data, example_inputs)
    result.model        # the first model that passed (or the best one, with a warning)
    print(result)       # every trial: config, layers kept float, score, loss, seconds, passed

`eval_fn(model) -> float` scores a model (the fp32 one once, then each trial's quantized GraphModule).
A trial passes when its relative loss against the fp32 score is at most `tolerable_loss`.

When a config fails, its fallbacks quantize it again with its most damaged layers kept float
(`set_local(<module name>, None)` on a copy of the config). The layers are ranked by the dump tool's
numeric comparison (pt2q.debug: per-node SQNR of the quantized graph against fp32 on the example
inputs, lowest first), and the k worst are kept float for k = 1, 2, 4, ... (TuningConfig.fallback_layers).

The search never changes the user's model or configs: the model is captured once (the capture owns its
tensors) and every trial quantizes a copy of that capture with a copy of its config.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.fx import GraphModule

from . import api, config as config_module, meta, pipeline
from .calibration import check_batches_iterable
from .capture import normalize_inputs
from .config import (AWQConfig, DynamicQuantConfig, GPTQConfig, RTNConfig, SmoothQuantConfig, StaticQuantConfig,
                     TuningConfig)
from .errors import ConfigError, TuningError
from .graph import module_fqn

log = logging.getLogger(__name__)

_clock = time.monotonic  # the budget's clock (tests replace it to spend time without waiting)

__all__ = ["Trial", "TuningResult", "autotune", "config_summary", "get_int8_tuning_config", "get_woq_tuning_config"]


# -- the record ---------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One quantization trial: the config it quantized with (a copy, fallback rules included), the layers
    its fallback kept float (module names, most damaged first), the eval_fn score and relative loss."""

    index: int                       # 1-based, in the order the trials ran
    config_index: int                # position of its config in TuningConfig.config_set
    config: Any
    kept_float: tuple[str, ...]
    score: float
    loss: float
    seconds: float                   # quantize + eval_fn
    passed: bool

    @property
    def summary(self) -> str:
        return config_summary(self.config, skip_rules=len(self.kept_float))

    def as_dict(self) -> dict:
        return {"trial": self.index, "config_index": self.config_index, "config": self.summary,
                "kept_float": list(self.kept_float), "score": self.score, "loss": self.loss,
                "seconds": round(self.seconds, 3), "passed": self.passed}


@dataclass
class TuningResult:
    """What autotune found. `model`: the first trial's model that passed; when none passed, the best
    trial's (highest score, or lowest when lower is better); when no trial ran, the fp32 capture of the
    model (nothing quantized). `best`: the trial `model` came from (None when no trial ran). `stop_reason`:
    "passed", "exhausted" (every config and fallback tried), "max_trials" or "timeout_s"."""

    model: GraphModule | None
    best: Trial | None
    trials: list[Trial]
    fp32_score: float
    tuning_config: TuningConfig
    stop_reason: str
    seconds: float
    fp32_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.best is not None and self.best.passed

    def table(self) -> str:
        """The trial table as text (what autotune prints)."""
        tuning = self.tuning_config
        direction = "higher" if tuning.higher_is_better else "lower"
        lines = [f"pt2q.autotune: fp32 score {self.fp32_score:.6g} ({direction} is better, "
                 f"eval {self.fp32_seconds:.1f} s), tolerable loss {tuning.tolerable_loss:.2%}",
                 f"{'#':>3}  {'config':<46}  {'kept float':<40}  {'score':>10}  {'loss':>8}  {'seconds':>7}  passed"]
        for trial in self.trials:
            marker = " <" if trial is self.best else ""
            lines.append(f"{trial.index:>3}  {_clip(trial.summary, 46):<46}  {_clip(_float_text(trial), 40):<40}  "
                         f"{trial.score:>10.6g}  {trial.loss:>8.3%}  {trial.seconds:>7.1f}  "
                         f"{'yes' if trial.passed else 'no'}{marker}")
        if not self.trials:
            lines.append("    (no trial ran)")
        lines.append(self.outcome())
        return "\n".join(lines)

    def outcome(self) -> str:
        """One line: which trial was chosen and why the search stopped."""
        tuning = self.tuning_config
        stopped = {"exhausted": "every config and fallback was tried",
                   "max_trials": f"stopped at max_trials={tuning.max_trials}",
                   "timeout_s": f"stopped: timeout_s={tuning.timeout_s} used up"}.get(self.stop_reason,
                                                                                     self.stop_reason)
        took = f"{len(self.trials)} trial(s) in {self.seconds:.1f} s"
        if self.passed:
            return f"chosen: trial {self.best.index}, the first within the tolerable loss ({took})"
        if self.best is None:
            return f"no trial ran ({stopped}): returned the fp32 capture of the model, nothing quantized"
        return (f"no trial within the tolerable loss ({stopped}; {took}): returned the best, trial "
                f"{self.best.index} (loss {self.best.loss:.3%})")

    def as_dict(self) -> dict:
        """JSON data: the trials, the choice, and the table text (what autotune attaches to the model)."""
        return {"fp32_score": self.fp32_score, "tolerable_loss": self.tuning_config.tolerable_loss,
                "higher_is_better": self.tuning_config.higher_is_better, "stop_reason": self.stop_reason,
                "passed": self.passed, "chosen_trial": self.best.index if self.best else None,
                "seconds": round(self.seconds, 3), "trials": [trial.as_dict() for trial in self.trials],
                "table": self.table()}

    def __str__(self) -> str:
        return self.table()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _float_text(trial: Trial) -> str:
    if not trial.kept_float:
        return "-"
    return f"{len(trial.kept_float)}: {', '.join(trial.kept_float)}"


# Fields named in a config's summary even at their default value: what tells the entries of a set apart.
_ALWAYS_SHOWN = {"SmoothQuantConfig": ("alpha",)}


def config_summary(config, skip_rules: int = 0) -> str:
    """A short name for a config: its class and the fields that differ from the defaults, e.g.
    `StaticQuantConfig(smooth_quant=SmoothQuantConfig(alpha='auto'))`; `+N set_local` counts its rules
    (the last `skip_rules` are left out: autotune's own fallback rules, shown apart)."""
    always = _ALWAYS_SHOWN.get(type(config).__name__, ())
    try:
        defaults = type(config)()
    except Exception:  # noqa: BLE001 - a config class without defaults: list every field
        defaults = None
    parts = []
    for config_field in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
        if not config_field.init:
            continue
        value = getattr(config, config_field.name)
        if defaults is not None and value == getattr(defaults, config_field.name, object()) \
                and config_field.name not in always:
            continue
        shown = config_summary(value) if dataclasses.is_dataclass(value) else repr(value)
        parts.append(f"{config_field.name}={shown}")
    rules = len(getattr(config, "local_rules", ())) - skip_rules
    if rules > 0:
        parts.append(f"+{rules} set_local")
    return f"{type(config).__name__}({', '.join(parts)})"


# -- the search ---------------------------------------------------------------------------------------------
def autotune(model: torch.nn.Module, tuning_config: TuningConfig, eval_fn: Callable[[Any], float],
             calib_data: Iterable | None = None, example_inputs: Any = None, *, verbose: bool = True) -> TuningResult:
    """Quantize `model` with each config of `tuning_config.config_set` in order, and with fallbacks that
    keep each failing config's most damaged layers float, until `eval_fn` scores one within
    `tolerable_loss` of the fp32 score; see the module docstring and `TuningConfig`.

    `calib_data`: calibration batches as for `pt2q.quantize`, iterated once per trial (a generator is read
    into a list first). `example_inputs`: defaults to the first batch; the per-node SQNR that ranks layers
    for the fallbacks is measured on it. Returns a `TuningResult`, whose table is printed (`verbose=False`
    silences it) and attached to the model as `model.meta["pt2q_tuning"]` (JSON data: `pt2q.save` keeps it).
    When no trial passes, the best trial's model is returned with a warning; when no trial could run
    (timeout_s spent by the fp32 evaluation), the fp32 capture of the model is, with a warning.

    Raises TuningError when eval_fn raises or returns something other than one finite number (naming the
    trial and its config, or the fp32 baseline); errors of a quantization itself are raised as they are,
    with a note naming the trial. The model and the configs are never changed.
    """
    start = _clock()
    if not isinstance(tuning_config, TuningConfig):
        raise ConfigError(f"autotune() takes a pt2q.TuningConfig (config_set=[...], tolerable_loss=...) as its "
                          f"second argument; got {type(tuning_config).__name__}")
    tuning_config.validate()
    if not callable(eval_fn):
        raise ConfigError(f"autotune(): eval_fn must be a callable eval_fn(model) -> float, got "
                          f"{type(eval_fn).__name__}")
    batches = None
    if calib_data is not None:
        check_batches_iterable(calib_data)
        batches = list(calib_data)  # every trial calibrates on the same batches
        if not batches:
            raise ConfigError("autotune(): calib_data is empty: give at least one batch, or None for configs that "
                              "need no calibration")
    if example_inputs is None:
        if not batches:
            raise ConfigError("autotune() needs example_inputs when calib_data is not given")
        example_inputs = batches[0]
    search = _Search(tuning_config, eval_fn, batches, example_inputs, start)
    search.fp32_score = search.score_fp32(model)
    # One capture for every trial (and the weight-only SQNR reference); it owns its tensors, so nothing a
    # trial or a comparison runs can reach the user's model.
    search.captured = pipeline.capture_for(model, example_inputs, caller="autotune()")
    result = search.run()
    if result.model is not None:
        result.model.meta[meta.TUNING] = result.as_dict()
    if verbose:
        print(result.table())
    if not result.passed:
        warnings.warn(f"pt2q.autotune: {result.outcome()}; see result.trials", UserWarning, stacklevel=2)
    return result


class _Stop(Exception):
    """The budget is spent (max_trials or timeout_s): no new trial starts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Search:
    def __init__(self, tuning: TuningConfig, eval_fn, batches, example_inputs, start: float):
        self.tuning, self.eval_fn, self.batches, self.example_inputs = tuning, eval_fn, batches, example_inputs
        self.start = start
        self.args, self.kwargs = normalize_inputs(example_inputs)
        self.trials: list[Trial] = []
        self.best: Trial | None = None
        self.best_model: GraphModule | None = None
        self.fp32_score = math.nan
        self.fp32_seconds = 0.0
        self.captured: GraphModule | None = None

    # -- scores
    def score_fp32(self, model) -> float:
        began = _clock()
        score = self._score(model, "the fp32 model (the baseline autotune compares against)", trial=None)
        self.fp32_seconds = _clock() - began
        if score == 0:
            raise TuningError("eval_fn scored the fp32 model 0: the relative loss (fp32 - score) / |fp32| is "
                              "undefined; use a metric that is not 0 for the fp32 model")
        log.info("autotune: fp32 score %.6g (%.1f s)", score, self.fp32_seconds)
        return score

    def _score(self, model, where: str, trial: int | None) -> float:
        try:
            value = self.eval_fn(model)
        except Exception as error:
            raise TuningError(f"eval_fn raised on {where}: {type(error).__name__}: {error}", trial) from error
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TuningError(f"eval_fn returned {_clip(repr(value), 60)} ({type(value).__name__}) on {where}: it "
                              "must return one number, the model's score", trial)
        value = float(value)
        if not math.isfinite(value):
            raise TuningError(f"eval_fn returned {value} on {where}: it must return a finite number (a model "
                              "whose outputs are NaN scores NaN: check eval_fn on that model)", trial)
        return value

    def loss(self, score: float) -> float:
        change = (self.fp32_score - score) if self.tuning.higher_is_better else (score - self.fp32_score)
        return change / abs(self.fp32_score)

    # -- the budget
    def check_budget(self) -> None:
        if self.tuning.max_trials is not None and len(self.trials) >= self.tuning.max_trials:
            raise _Stop("max_trials")
        if self.tuning.timeout_s is not None and _clock() - self.start >= self.tuning.timeout_s:
            raise _Stop("timeout_s")

    # -- trials
    def run(self) -> TuningResult:
        try:
            reason = self._search()
        except _Stop as stop:
            reason = stop.reason
            log.info("autotune: stopped, %s", reason)
        model = self.best_model if self.best is not None else self.captured
        return TuningResult(model, self.best, self.trials, self.fp32_score, self.tuning, reason,
                            _clock() - self.start, self.fp32_seconds)

    def _search(self) -> str:
        """Run the trials in the configured order; "passed" or "exhausted" (or _Stop from the budget)."""
        configs = list(self.tuning.config_set)
        if self.tuning.fallback_after == "each_config":
            for index, config in enumerate(configs):
                trial, ranking = self.base_trial(index, config)
                if trial.passed or self.fallbacks(index, config, ranking):
                    return "passed"
            return "exhausted"
        rankings = {}
        for index, config in enumerate(configs):
            trial, rankings[index] = self.base_trial(index, config)
            if trial.passed:
                return "passed"
        base_trials = sorted(self.trials, key=lambda t: (t.loss, t.index))  # best-scoring config first
        for trial in base_trials:
            if self.fallbacks(trial.config_index, configs[trial.config_index], rankings[trial.config_index]):
                return "passed"
        return "exhausted"

    def base_trial(self, index: int, config) -> tuple[Trial, list[str]]:
        """The config as given; when it fails (and fallbacks are on), its layers ranked worst first."""
        from .debug.pipeline import NumericReference
        from .passes.manager import observe_passes

        self.check_budget()
        reference = NumericReference(self.captured)
        want_ranking = self.tuning.fallback_layers != ()
        with observe_passes(reference) if want_ranking else contextlib.nullcontext():
            trial, qmodel = self.trial(index, _copy_config(config), ())
        ranking = []
        if not trial.passed and want_ranking:
            ranking = self.rank_layers(trial, qmodel, reference)
        return trial, ranking

    def fallbacks(self, index: int, config, ranking: list[str]) -> bool:
        """The config again with its worst k layers float, for each k; True when one passes."""
        for k in _fallback_sizes(self.tuning.fallback_layers, len(ranking)):
            self.check_budget()
            fallback = _copy_config(config)
            for module in ranking[:k]:
                fallback.set_local(re.escape(module), None)
            trial, _ = self.trial(index, fallback, tuple(ranking[:k]))
            if trial.passed:
                return True
        return False

    def trial(self, index: int, config, kept_float: tuple[str, ...]) -> tuple[Trial, GraphModule]:
        number = len(self.trials) + 1
        float_note = f", {len(kept_float)} layer(s) kept float" if kept_float else ""
        where = f"trial {number} ({config_summary(config, skip_rules=len(kept_float))}{float_note})"
        began = _clock()
        try:
            qmodel = api.quantize(self.captured, config, self.batches, example_inputs=self.example_inputs,
                                  progress=False)
        except Exception as error:
            error.add_note(f"pt2q.autotune: raised while quantizing {where}")
            raise
        score = self._score(qmodel, where, number)
        loss = self.loss(score)
        trial = Trial(number, index, config, kept_float, score, loss, _clock() - began,
                      loss <= self.tuning.tolerable_loss)
        self.trials.append(trial)
        log.info("autotune %s: score %.6g, loss %.3f%%, %s in %.1f s", where, score, 100 * loss,
                 "passed" if trial.passed else "failed", trial.seconds)
        if trial.passed or self.best is None or loss < self.best.loss:
            self.best, self.best_model = trial, qmodel
        return trial, qmodel

    def rank_layers(self, trial: Trial, qmodel: GraphModule, reference) -> list[str]:
        """Module names of the quantized layers of `qmodel`, lowest per-node SQNR against fp32 first (the
        dump tool's comparison on the example inputs)."""
        rows, _ = reference.compare(qmodel, self.args, self.kwargs)
        layers = {node.name: module_fqn(node) for node in pipeline.quantized_layer_nodes(qmodel)}
        ranking: list[str] = []
        for row in rows:  # worst first
            module = layers.get(row.node)
            if module and module not in ranking:
                ranking.append(module)
        if not ranking and layers:
            log.warning("autotune: no per-node SQNR of trial %d matched a quantized layer; its config gets no "
                        "fallback", trial.index)
        log.info("autotune: trial %d, most damaged layers: %s", trial.index, ", ".join(ranking[:8]))
        return ranking


def _fallback_sizes(sizes: tuple | None, layer_count: int) -> list[int]:
    """How many layers each fallback keeps float: `sizes` (or 1, 2, 4, ...) below `layer_count`, since
    keeping every quantized layer float is the fp32 model."""
    if sizes is None:
        doubling, k = [], 1
        while k < layer_count:
            doubling.append(k)
            k *= 2
        return doubling
    skipped = [k for k in sizes if k >= layer_count]
    if skipped:
        log.info("autotune: fallback_layers %s skipped: the config quantizes %d layer(s)", skipped, layer_count)
    return [k for k in sizes if k < layer_count]


def _copy_config(config):
    """A copy with its own set_local rule list: the fallback rules go on it, never on the user's config."""
    copied = copy.copy(config)
    copied.local_rules = list(config.local_rules)
    return copied


# -- the usual config sets ------------------------------------------------------------------------------------
def get_int8_tuning_config(backend: str = "x86", **tuning_fields) -> TuningConfig:
    """int8 activations and weights: static with the default histogram observer, then SmoothQuant
    (alpha 0.5, then "auto"), then min/max observers (plain and with auto SmoothQuant), then dynamic
    (no calibration of activations). `tuning_fields` are the other TuningConfig fields."""
    config_set = [
        StaticQuantConfig(backend=backend),
        StaticQuantConfig(backend=backend, smooth_quant=SmoothQuantConfig(alpha=0.5)),
        StaticQuantConfig(backend=backend, smooth_quant=SmoothQuantConfig(alpha="auto")),
        StaticQuantConfig(backend=backend, activation_observer="minmax"),
        StaticQuantConfig(backend=backend, activation_observer="minmax", smooth_quant=SmoothQuantConfig(alpha="auto")),
        DynamicQuantConfig(backend=backend),
    ]
    return TuningConfig(config_set=config_set, **tuning_fields)


# Weight-only algorithms other than RTN / AWQ / GPTQ, by class name, in increasing cost: included when
# pt2q.config defines them (HQQ needs no data; TEQ and AutoRound train per block).
_OPTIONAL_WOQ_CHEAP = ("HQQConfig",)
_OPTIONAL_WOQ_TRAINED = ("TEQConfig", "AutoRoundConfig")


def get_woq_tuning_config(bits: int = 4, group_size: int = 128, **tuning_fields) -> TuningConfig:
    """Weight-only at `bits` bits, groups of `group_size`, in increasing cost: RTN, RTN with MSE clipping,
    [HQQ], AWQ, GPTQ, [TEQ, AutoRound] (the bracketed ones when this pt2q has them). AWQ, GPTQ and the
    trained ones need calib_data. `tuning_fields` are the other TuningConfig fields."""
    shape = {"bits": bits, "group_size": group_size}
    config_set = [RTNConfig(**shape), RTNConfig(**shape, mse_clip=True), *_optional_woq(_OPTIONAL_WOQ_CHEAP, shape),
                  AWQConfig(**shape), GPTQConfig(**shape), *_optional_woq(_OPTIONAL_WOQ_TRAINED, shape)]
    return TuningConfig(config_set=config_set, **tuning_fields)


def _optional_woq(names: tuple[str, ...], shape: dict) -> list:
    configs = []
    for name in names:
        cls = getattr(config_module, name, None)
        if cls is None or cls not in config_module.CONFIG_KINDS.values():
            continue
        try:
            configs.append(cls(**shape))
        except (TypeError, ConfigError) as error:
            log.info("get_woq_tuning_config: %s left out: %s", name, error)
    return configs

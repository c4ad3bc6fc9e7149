"""SmoothQuant on FX graphs: scales absorbed into producers, one calibration pass.

Two ways in:
- `StaticQuantConfig(smooth_quant=SmoothQuantConfig(alpha=...))` with `pt2q.quantize` / `prepare` +
  `convert`. Channel statistics are recorded in the same calibration pass as the quantizer's observers,
  and the scales are folded in at `convert`.
- `pt2q.smooth_quant(model_or_graph, calib_data, example_inputs, alpha=...) -> (graph_module, report)`:
  an fp32 graph with the scales folded in, usable before any quantizer (torchao's flow included).

One calibration pass is enough with min/max activation observers: the range of a smoothed input
follows exactly from its per-channel min/max. The observers at smoothed inputs are therefore exact
min/max observers even when the rest of the model uses histogram observers. A second pass would only be
needed to fit a histogram to the smoothed inputs.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from .config import with_field_check
from .errors import ConfigError
from .passes.insert_channel_recorders import InsertChannelRecorders
from .passes.manager import PassManager
from .passes.matmul_to_linear import MatmulToLinear
from .passes.smooth_quant_apply import GroupReport, SmoothQuantApply, SmoothQuantReport
from .passes.smooth_quant_groups import SmoothQuantGroups

__all__ = ["GroupReport", "SmoothQuantConfig", "SmoothQuantReport", "smooth_quant"]

_CRITERIA = ("min", "max", "mean")
# Elements of the first calibration batch kept per group for the auto-alpha search.
_AUTO_SAMPLE_ELEMENTS = 1 << 18


@dataclass(kw_only=True)
class SmoothQuantConfig:
    """alpha: float in [0, 1]; "auto" (grid search per group on fake-quantized consumer outputs); or a
        dict {module-name regex | nn.Module class | ATen op: float | "auto" | None} (first matching key
        wins, other groups use `default_alpha`; None leaves those layers unsmoothed).
    folding_only: only smooth groups whose producer can absorb the scale (no explicit `mul`).
    auto_grid: the alphas tried by "auto". auto_criterion: how a group's consumers' best alphas combine.
    skip_if_worse: leave a group unsmoothed when smoothing raises its consumers' estimated (fake-quant)
        output error on a calibration sample; the report lists it with both errors.
    """

    alpha: Any = 0.5
    default_alpha: float = 0.5
    folding_only: bool = False
    auto_grid: tuple = tuple(round(i * 0.1, 2) for i in range(11))
    auto_criterion: str = "mean"
    skip_if_worse: bool = True

    def __post_init__(self):
        try:
            self.auto_grid = tuple(float(a) for a in self.auto_grid)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"SmoothQuant auto_grid must be alphas in [0, 1], got {self.auto_grid!r}") from error
        self.validate()

    @staticmethod
    def _check_alpha_value(value, where: str, allow_none: bool = False) -> None:
        if value == "auto" or (allow_none and value is None):
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"SmoothQuant {where} must be a number in [0, 1] or 'auto', got {value!r}")

    def validate(self) -> None:
        if isinstance(self.alpha, dict):
            if not self.alpha:
                raise ConfigError("SmoothQuant alpha dict is empty")
            for key, value in self.alpha.items():
                if not isinstance(key, (str, type, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                    raise ConfigError(f"SmoothQuant alpha key {key!r} must be a module-name regex, an nn.Module "
                                      "class or an ATen op")
                if isinstance(key, str):
                    try:
                        re.compile(key)
                    except re.error as error:
                        raise ConfigError(f"SmoothQuant alpha key {key!r} is not a valid regex: {error}") from error
                self._check_alpha_value(value, f"alpha[{key!r}]", allow_none=True)
        else:
            self._check_alpha_value(self.alpha, "alpha")
        self._check_alpha_value(self.default_alpha, "default_alpha", allow_none=True)
        if self.auto_criterion not in _CRITERIA:
            raise ConfigError(f"SmoothQuant auto_criterion={self.auto_criterion!r}; valid: {_CRITERIA}")
        if not self.auto_grid or any(not 0.0 <= a <= 1.0 for a in self.auto_grid):
            raise ConfigError(f"SmoothQuant auto_grid must be alphas in [0, 1], got {self.auto_grid}")

    @property
    def needs_samples(self) -> bool:
        values = self.alpha.values() if isinstance(self.alpha, dict) else [self.alpha]
        return self.skip_if_worse or any(v == "auto" for v in values)


SmoothQuantConfig = with_field_check(SmoothQuantConfig)


class SmoothQuantPlan:
    """What `insert` found and placed in a graph, waiting for calibration and then `apply`."""

    def __init__(self, config: SmoothQuantConfig, groups, recorders):
        self.config, self.groups, self.recorders = config, groups, recorders

    def apply(self, graph_module: GraphModule, activation_range: tuple[int, int] = (0, 255),
              weight_range: tuple[int, int] = (-128, 127)) -> SmoothQuantReport:
        """Compute and fold the scales; the ranges are the quantizer's, for the error estimates."""
        apply = SmoothQuantApply(self.groups, self.recorders, alpha=self.config.alpha,
                                 default_alpha=self.config.default_alpha, folding_only=self.config.folding_only,
                                 auto_grid=self.config.auto_grid, auto_criterion=self.config.auto_criterion,
                                 skip_if_worse=self.config.skip_if_worse, activation_range=activation_range,
                                 weight_range=weight_range)
        PassManager([apply])(graph_module)
        return apply.report


def insert(graph_module: GraphModule, config: SmoothQuantConfig) -> SmoothQuantPlan:
    """Find the absorb groups of `graph_module` and add channel recorders (modifies it)."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_, _fuse_linear_bn_

    # prepare_pt2e folds BatchNorm into the preceding conv/linear; fold first so the groups found here
    # still exist when the scales are applied to the prepared graph.
    _fuse_conv_bn_(graph_module)
    _fuse_linear_bn_(graph_module)
    analysis = SmoothQuantGroups()
    PassManager([MatmulToLinear(), analysis])(graph_module)
    # An alpha key that matches no layer is a config error: report it now, before calibration.
    SmoothQuantApply(analysis.report, {}, alpha=config.alpha)._validate_alpha_keys(
        [group for group in analysis.report if not group.skipped])
    recorders = InsertChannelRecorders(analysis.report, _AUTO_SAMPLE_ELEMENTS if config.needs_samples else 0)
    PassManager([recorders])(graph_module)
    return SmoothQuantPlan(config, analysis.report, recorders.recorders)


def smooth_quant(model_or_graph: torch.nn.Module, calib_data: Iterable, example_inputs: Any = None, *,
                 alpha: Any = 0.5, progress: bool = True, **options) -> tuple[GraphModule, SmoothQuantReport]:
    """Return an fp32 GraphModule with SmoothQuant scales folded in, and the report.

    `model_or_graph` is an nn.Module (captured here) or a GraphModule from `pt2q.capture`; neither is
    modified. `options` are the other `SmoothQuantConfig` fields.
    """
    from .api import _fresh_copy, run_calibration
    from .capture import EXAMPLE_INPUTS_KEY, capture, normalize_inputs

    config = SmoothQuantConfig(alpha=alpha, **options)
    calib_data = list(calib_data)
    if not calib_data:
        from .errors import CalibrationError
        raise CalibrationError("calib_data is empty: SmoothQuant needs at least one batch")
    if isinstance(model_or_graph, GraphModule) and EXAMPLE_INPUTS_KEY in model_or_graph.meta:
        graph_module = _fresh_copy(model_or_graph)
    else:
        args, kwargs = normalize_inputs(example_inputs if example_inputs is not None else calib_data[0])
        graph_module = capture(model_or_graph, args, kwargs)
    plan = insert(graph_module, config)
    run_calibration(graph_module, calib_data, progress=progress, desc="pt2q smooth_quant")
    report = plan.apply(graph_module)
    return graph_module, report

"""SmoothQuant on FX graphs: scales absorbed into producers, one calibration pass.

Two ways in:
- `StaticQuantConfig(smooth_quant=SmoothQuantConfig(alpha=...))` with `pt2q.quantize` / `prepare` +
  `convert`. Channel statistics are recorded in the same calibration pass as the quantizer's observers,
  and the scales are folded in at `convert`.
- `pt2q.smooth_quant(model_or_graph, calib_data, example_inputs, alpha=...) -> (graph_module, report)`
  (in pt2q/api.py): an fp32 graph with the scales folded in, usable before any quantizer (torchao's flow
  included).

Both run the SmoothQuant algorithm of pt2q/pipeline.py, which calls `insert` (plan) and
`SmoothQuantPlan.apply` (apply) from here.

One calibration pass is enough with min/max activation observers: the range of a smoothed input
follows exactly from its per-channel min/max. The observers at smoothed inputs are therefore exact
min/max observers even when the rest of the model uses histogram observers. A second pass would only be
needed to fit a histogram to the smoothed inputs.
"""
from __future__ import annotations

from torch.fx import GraphModule

# SmoothQuantConfig lives with the other configs; it is re-exported here, where it is used.
from .config import SmoothQuantConfig
from .passes.insert_channel_recorders import InsertChannelRecorders
from .passes.manager import PassManager
from .passes.matmul_to_linear import MatmulToLinear
from .passes.smooth_quant_apply import GroupReport, SmoothQuantApply, SmoothQuantReport
from .passes.smooth_quant_groups import SmoothQuantGroups

__all__ = ["GroupReport", "SmoothQuantConfig", "SmoothQuantPlan", "SmoothQuantReport", "insert"]

# Elements of the first calibration batch kept per group for the auto-alpha search.
_AUTO_SAMPLE_ELEMENTS = 1 << 18




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

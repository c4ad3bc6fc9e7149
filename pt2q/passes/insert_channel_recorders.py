"""Insert a `ChannelRecorder` beside the input of every SmoothQuant group.

A recorder is an identity side node (nothing reads its output) that records, during calibration, the
per-channel min and max of the tensor it sees, and keeps a few of its rows for the auto-alpha search.
It runs in the same calibration pass as the quantizer's observers, so SmoothQuant + static int8 needs
one pass. `SmoothQuantApply` reads and removes the recorders.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from .smooth_quant_groups import AbsorbGroup
from .manager import Pass


class ChannelRecorder(torch.nn.Module):
    """Identity that records per-channel min/max (channel = `channel_dim`) and a sample of its input."""

    _is_impure = True  # keeps torch.fx dead-code elimination from removing this output-less node

    def __init__(self, channel_dim: int, sample_limit: int = 0):
        super().__init__()
        self.channel_dim = channel_dim
        self.sample_limit = sample_limit  # max elements kept from the first batch (0: none)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.non_finite = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = x.detach().movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim]).float()
            low, high = torch.aminmax(rows, dim=0)  # one pass; NaN and Inf show up in the result
            if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
                self.non_finite = True
                return x
            self.min_val = low if self.min_val is None else torch.minimum(self.min_val, low)
            self.max_val = high if self.max_val is None else torch.maximum(self.max_val, high)
            if self.sample_limit and self.sample is None:
                per_item = max(1, x[0].numel())
                self.sample = x.detach()[: max(1, self.sample_limit // per_item)].clone()
        return x

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())


class InsertChannelRecorders(Pass):
    """See the module docstring. After `call`, `recorders` maps each group's root name to its module name."""

    name = "insert_channel_recorders"

    def __init__(self, groups: list[AbsorbGroup], sample_limit: int = 0):
        self.groups = groups
        self.sample_limit = sample_limit
        self.recorders: dict[str, str] = {}
        self.report = self.recorders

    def call(self, graph_module: GraphModule) -> PassResult:
        for index, group in enumerate(g for g in self.groups if not g.skipped):
            name = f"pt2q_channel_recorder_{index}"
            graph_module.add_submodule(name, ChannelRecorder(group.channel_dim, self.sample_limit))
            with graph_module.graph.inserting_after(group.root):
                graph_module.graph.call_module(name, (group.root,))
            self.recorders[group.root.name] = name
        return PassResult(graph_module, bool(self.recorders))


def remove_recorders(graph_module: GraphModule) -> None:
    """Drop every recorder node and module (they have no users)."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), ChannelRecorder):
            graph_module.graph.erase_node(node)
            graph_module.delete_submodule(node.target)
    graph_module.recompile()

"""torchao's `prepare_pt2e` as a pass: annotate with a quantizer, insert observers (and fold conv-bn)."""
from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e


class TorchaoPrepare:
    name = "prepare_pt2e"

    def __init__(self, quantizer) -> None:
        self.quantizer = quantizer
        self.report = None

    def call(self, graph_module: GraphModule) -> PassResult:
        prepared = prepare_pt2e(graph_module, self.quantizer)
        self.report = dict(getattr(self.quantizer, "annotated_nodes", {}))  # node -> rule
        return PassResult(prepared, True)

"""torchao's `prepare_pt2e` as a pass: annotate with a quantizer, insert observers (and fold conv-bn)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

from .manager import Pass


# Unbounded `functools.cache`s keyed by module, in torchao 0.18 and torch 2.13: every module that
# prepare/convert sees (and the user's parameters it shares) would stay alive for the life of the process.
_MODULE_CACHES = (("torchao.utils", "_assert_and_get_unique_device"),
                  ("torch.ao.quantization.fx.utils", "assert_and_get_unique_device"))


def forget_torchao_module_cache() -> None:
    """Empty the module-keyed caches above after each prepare/convert. They only save a walk over the
    parameters to find their device, so emptying them changes nothing else. Pinned by
    tests/passes/test_torchao_passes.py."""
    import importlib

    for module_name, function_name in _MODULE_CACHES:
        function = getattr(importlib.import_module(module_name), function_name, None)
        if hasattr(function, "cache_clear"):
            function.cache_clear()


@dataclass
class AnnotationReport:
    """Which rule of the quantizer annotated each node (node name -> rule name)."""

    rules: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        counts = collections.Counter(self.rules.values())
        return "annotated by the quantizer: " + (", ".join(
            f"{rule} x{count}" for rule, count in sorted(counts.items())) or "nothing")

    def lines(self) -> list[str]:
        return []


class TorchaoPrepare(Pass):
    """prepare_pt2e with our quantizer; `report` is an AnnotationReport. The graph it returns is the
    fp32 model as it will be quantized (conv-bn folded, observers bypassed when they are not run).
    `qat`: prepare_qat_pt2e on a training graph instead (fake quantization; conv-bn simulated as folded)."""

    name = "prepare_pt2e"

    def __init__(self, quantizer, qat: bool = False) -> None:
        self.quantizer = quantizer
        self.qat = qat
        if qat:
            self.name = "prepare_qat_pt2e"
        self.report: AnnotationReport | None = None

    def call(self, graph_module: GraphModule) -> PassResult:
        try:
            prepared = (prepare_qat_pt2e if self.qat else prepare_pt2e)(graph_module, self.quantizer)
        finally:
            forget_torchao_module_cache()
        self.report = AnnotationReport(dict(getattr(self.quantizer, "annotated_nodes", {})))
        return PassResult(prepared, True)

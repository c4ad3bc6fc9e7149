"""torchao's `convert_pt2e` as a pass: observers become quantize/dequantize pairs, weights are stored
in int8 (folded quantize), and the fp32 weights nothing reads any more are dropped."""
from __future__ import annotations

import itertools

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from .torchao_prepare import forget_torchao_module_cache
from .manager import Pass


class TorchaoConvert(Pass):
    name = "convert_pt2e"
    report = None

    def call(self, graph_module: GraphModule) -> PassResult:
        try:
            quantized = convert_pt2e(graph_module)
        finally:
            forget_torchao_module_cache()
        drop_unused_tensors(quantized)
        return PassResult(quantized, True)


def drop_unused_tensors(graph_module: GraphModule) -> None:
    """convert_pt2e leaves the fp32 weights of quantized layers attached though nothing reads them any
    more; drop them so the quantized model (and a file `save` writes) holds only the int8 copies.
    Only this module's attributes go: the user's model and its tensors are untouched."""
    used = {node.target for node in graph_module.graph.nodes if node.op in ("get_attr", "call_module")}
    used_prefixes = tuple(f"{target}." for target in used)
    named = itertools.chain(graph_module.named_parameters(remove_duplicate=False),
                            graph_module.named_buffers(remove_duplicate=False))
    for name in [name for name, _ in named if name not in used and not name.startswith(used_prefixes)]:
        owner, _, attr = name.rpartition(".")
        module = graph_module.get_submodule(owner)
        if hasattr(module, attr):
            delattr(module, attr)

"""Give the nodes of a re-exported Dynamo subgraph the module stack of the Dynamo node they came from.

The torch.compile backend captures each Dynamo subgraph again with torch.export (to get ATen ops), but
the subgraph is one flat GraphModule, so export records no module hierarchy: every node's
`nn_module_stack` names only the wrapper, and rules by module name or class (`set_local`, `skip`,
SmoothQuant alpha keys) would match nothing. Each exported node's `stack_trace` ends in the frame of the
subgraph's generated code, whose source line is `<dynamo node name> = ...`; that name leads back to the
Dynamo node and its `nn_module_stack` (Dynamo's paths: NormalizeModuleNames rewrites them after this).
"""
from __future__ import annotations

import re

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from .manager import Pass

# The last frame of generated FX code in a stack trace, and the node its source line assigns.
_GENERATED_FRAME = re.compile(r'File "<eval_with_key>[^"]*", line \d+, in forward\n\s*(\w+) = ')


class RestoreDynamoModuleStack(Pass):
    name = "restore_dynamo_module_stack"
    report = None

    def __init__(self, dynamo_graph: GraphModule):
        self.stacks = {node.name: node.meta["nn_module_stack"] for node in dynamo_graph.graph.nodes
                       if node.meta.get("nn_module_stack")}

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            frames = _GENERATED_FRAME.findall(node.meta.get("stack_trace") or "")
            stack = self.stacks.get(frames[-1]) if frames else None
            if stack is not None:
                node.meta["nn_module_stack"] = dict(stack)
                modified = True
        return PassResult(graph_module, modified)

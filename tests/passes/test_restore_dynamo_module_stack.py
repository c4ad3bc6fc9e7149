"""RestoreDynamoModuleStack: a re-exported Dynamo subgraph gets its modules back, so name and class rules
match under torch.compile."""
import torch

from pt2q.capture import capture
from pt2q.dynamo_backend import _FrozenSubgraph
from pt2q.graph import module_stack
from pt2q.passes.manager import PassManager
from pt2q.passes.normalize_module_names import NormalizeModuleNames
from pt2q.passes.restore_dynamo_module_stack import RestoreDynamoModuleStack
from tests.passes.test_normalize_module_names import Nested


def test_exported_nodes_get_the_dynamo_nodes_modules():
    model = Nested().eval()
    seen = []

    def keep(graph_module, example_inputs):
        seen.append((graph_module, example_inputs))
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep, dynamic=False)(torch.randn(2, 4))
    torch._dynamo.reset()
    (dynamo_graph, example_inputs), = seen
    frozen = _FrozenSubgraph(dynamo_graph, example_inputs)
    captured = capture(frozen, frozen.runtime_inputs(example_inputs), {})
    linears = [n for n in captured.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [module_stack(n)[-1][0] for n in linears] == ["", "", ""]  # only the wrapper: rules match nothing
    PassManager([RestoreDynamoModuleStack(dynamo_graph), NormalizeModuleNames()])(captured)
    assert [module_stack(n)[-1] for n in linears] == [
        ("blocks.0.0", "torch.nn.modules.linear.Linear"), ("blocks.1.0", "torch.nn.modules.linear.Linear"),
        ("head", "torch.nn.modules.linear.Linear")]
    relus = [n for n in captured.graph.nodes if n.target is torch.ops.aten.relu.default]
    assert [module_stack(n)[-1][0] for n in relus] == ["blocks.0.1", "blocks.1.1"]

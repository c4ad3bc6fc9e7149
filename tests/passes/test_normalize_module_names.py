"""NormalizeModuleNames: Dynamo's module paths become named_modules() names, so name rules work under
torch.compile."""
import pytest
import torch

from pt2q.passes.manager import PassManager
from pt2q.passes.normalize_module_names import NormalizeModuleNames, normalize_module_path


@pytest.mark.parametrize("dynamo_path, name", [
    ("L['self']", ""),
    ("L['self'].fc", "fc"),
    ("L['self'].encoder.layer[0]._modules['fc']", "encoder.layer.0.fc"),
    ("L['self']._modules['blocks']._modules['1'].attn", "blocks.1.attn"),
    ("getattr(L['self'].encoder.layer, '3').output", "encoder.layer.3.output"),
    ("L['mod'].layers[12]", "layers.12"),
    ("encoder.layer.0", "encoder.layer.0"),  # already a module name: unchanged
])
def test_paths(dynamo_path, name):
    assert normalize_module_path(dynamo_path) == name


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
                                           for _ in range(2)])
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_dynamo_graph_gets_named_modules_names():
    model = Nested().eval()
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep, dynamic=False)(torch.randn(2, 4))
    torch._dynamo.reset()
    (graph_module,) = graphs
    linears = [n for n in graph_module.graph.nodes if n.target is torch._C._nn.linear]
    before = [list(n.meta["nn_module_stack"].values())[-1][0] for n in linears]
    assert all(path.startswith("L['self']") for path in before), before  # Dynamo's form
    PassManager([NormalizeModuleNames()])(graph_module)
    after = [list(n.meta["nn_module_stack"].values())[-1][0] for n in linears]
    assert after == ["blocks.0.0", "blocks.1.0", "head"]
    assert set(after) <= {name for name, _ in model.named_modules()}
    PassManager([NormalizeModuleNames()])(graph_module)  # idempotent
    assert [list(n.meta["nn_module_stack"].values())[-1][0] for n in linears] == after

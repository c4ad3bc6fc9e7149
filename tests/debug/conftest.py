"""Small seeded models for the dump tool's tests (deterministic weights and calibration data)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pt2q


class MLP2(nn.Module):
    """Two linear layers: the smallest model with a quantized activation between two int8 layers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TinyConvNet(nn.Module):
    """conv-bn-relu, conv, pooling, flatten, linear head: conv-bn folding and propagation rules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        hidden = torch.relu(self.bn1(self.conv1(images)))
        return self.head(torch.flatten(self.pool(self.conv2(hidden)), 1))


class GeluMLP(nn.Module):
    """Input and GELU feed linears: SmoothQuant smooths both with an explicit mul (nothing absorbs)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def mlp2():
    torch.manual_seed(0)
    model = MLP2().eval()
    generator = torch.Generator().manual_seed(1)
    return model, [(torch.randn(4, 8, generator=generator),) for _ in range(2)]


def tiny_cnn():
    torch.manual_seed(0)
    model = TinyConvNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding changes the conv weights
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    return model, [(torch.randn(2, 3, 8, 8, generator=generator),) for _ in range(2)]


def gelu_mlp():
    torch.manual_seed(0)
    model = GeluMLP().eval()
    generator = torch.Generator().manual_seed(1)
    outliers = torch.tensor([1, 1, 1, 10, 1, 1, 1, 1.0])
    return model, [(torch.randn(4, 8, generator=generator) * outliers,) for _ in range(2)]


def minmax_config(**options):
    """The goldens' config. The saturation guard is pinned: "auto" would make the dumped integer ranges
    depend on the CPU running the test."""
    return pt2q.StaticQuantConfig(activation_observer="minmax", saturation_guard="off", **options)


@pytest.fixture
def dump(tmp_path):
    """`dump(model, calib, config=None, name="dump", **options)` -> DumpResult, no compile by default."""
    from pt2q.debug import dump_pipeline

    def run(model, calib, config=None, name="dump", **options):
        options.setdefault("compile", False)
        options.setdefault("progress", False)
        return dump_pipeline(model, config or minmax_config(), calib, out_dir=tmp_path / name, **options)

    return run

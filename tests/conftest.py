"""Shared fixtures: offline Hugging Face, a session cache of zoo models, and small graph helpers."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything offline: the zoo builds from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import pt2q  # noqa: E402,F401 - registers the quantized_decomposed ops

from tests.models import build  # noqa: E402

# The ISA as oneDNN sees it for this whole process (it reads ONEDNN_MAX_CPU_ISA once, at first use):
# tests that monkeypatch the environment change pt2q's decisions, never the kernels that really run.
PROCESS_ISA = pt2q.isa.detect()

requires_saturating_int8 = pytest.mark.skipif(
    not PROCESS_ISA.int8_saturates,
    reason=f"needs int8 kernels that saturate (no VNNI/AMX); this process uses {PROCESS_ISA.int8_dot_product} "
           "(run `make test-avx2` to emulate an AVX2-only CPU)")
requires_non_saturating_int8 = pytest.mark.skipif(
    PROCESS_ISA.int8_saturates,
    reason="needs VNNI or AMX int8 kernels; this process's int8 kernels saturate (vpmaddubsw)")


@pytest.fixture(scope="session")
def zoo():
    """`zoo(name)` -> a ZooModel built once per session. Tests that mutate the model (flags, config)
    must call `tests.models.build` themselves instead."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


class ModelSnapshot:
    """Everything about a user's model that pt2q promises not to change."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
        self.training = {name: m.training for name, m in model.named_modules()}
        config = getattr(model, "config", None)
        self.use_cache = getattr(config, "use_cache", None)

    def assert_unchanged(self) -> None:
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        for key, before in self.state.items():
            after = state[key]
            assert after.dtype == before.dtype and after.shape == before.shape, key
            assert torch.equal(after, before), f"parameter/buffer {key} was modified"
            assert after.data_ptr() == self.ptrs[key], f"parameter/buffer {key} was replaced"
        assert {n: m.training for n, m in self.model.named_modules()} == self.training
        config = getattr(self.model, "config", None)
        assert getattr(config, "use_cache", None) == self.use_cache


# -- graph inspection helpers (imported by the test modules as `from tests.conftest import ...`) -------
qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

Q_PER_TENSOR = qd.quantize_per_tensor.default
DQ_PER_TENSOR = qd.dequantize_per_tensor.default
DQ_PER_CHANNEL = qd.dequantize_per_channel.default
Q_PER_TENSOR_DYN = qd.quantize_per_tensor.tensor
DQ_PER_TENSOR_DYN = qd.dequantize_per_tensor.tensor
CHOOSE_QPARAMS = qd.choose_qparams.tensor


def nodes_of(gm: torch.fx.GraphModule, *targets) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def count_of(gm: torch.fx.GraphModule, *targets) -> int:
    return len(nodes_of(gm, *targets))


def fp32_weighted_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Names (get_attr targets) of the weights of linear/conv nodes that still read an fp32 weight."""
    from pt2q.quantizers import weighted_ops

    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in weighted_ops():
            weight = node.args[1]
            if weight.op == "get_attr":
                names.append(weight.target)
    return names


def call(gm, args=(), kwargs=None):
    with torch.no_grad():
        return gm(*args, **(kwargs or {}))

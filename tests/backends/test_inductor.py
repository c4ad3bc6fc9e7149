"""Inductor backend: int8 kernels produced, inputs never written, no global config left changed.

Compiles are slow on 2 cores, so each compiled model is built once per module and kept tiny.
"""
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config

import pt2q
from pt2q.backends import inductor
from tests.conftest import PROCESS_ISA
from tests.models import build


class ResidualBlock(torch.nn.Module):
    """x + linear2(relu(linear1(ln(x)))): the shape whose residual add Inductor fuses in place."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = ResidualBlock().eval()
    x = torch.randn(128, 64)  # 2-D: the in-place sum lands directly in the caller's tensor
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,)], progress=False)
    return model, qmodel, x


@pytest.fixture(scope="module")
def compiled_block(block):
    _, qmodel, x = block
    return inductor.compile(qmodel, (x,))


def test_input_unchanged_and_outputs_identical_after_two_calls(block, compiled_block):
    _, _, x = block
    original = x.clone()
    first = compiled_block(x)
    second = compiled_block(x)
    assert torch.equal(x, original), "the compiled model wrote into the caller's input"
    assert torch.equal(first, second)
    assert compiled_block.guarded_inputs == ["x"]


def test_unguarded_compile_shows_the_upstream_in_place_sum(block):
    """Pins the Inductor behaviour the guard exists for. If this starts failing, upstream fixed the
    in-place `sum` post-op on graph inputs and the guard may be relaxed."""
    _, qmodel, x = block
    unguarded = inductor.compile(qmodel, (x,), guard_inputs=False)
    mine = x.clone()
    before = mine.clone()
    unguarded(mine)
    assert not torch.equal(mine, before)


def test_int8_kernels_reported_and_numerics_match_eager_qdq(block, compiled_block):
    model, qmodel, x = block
    kernels = compiled_block.int8_kernels
    assert sum(kernels.values()) == 2, kernels  # both linears run as oneDNN int8 kernels
    assert any("binary" in name for name in kernels), kernels  # the residual add fused as a post-op
    with torch.no_grad():
        assert relative_error(compiled_block(x), qmodel(x)) < 1e-4
        assert relative_error(compiled_block(x), model(x)) < 0.01


def test_no_global_inductor_config_left_changed(compiled_block, block):
    _, _, x = block
    compiled_block(x)
    assert inductor_config.freezing is False
    assert inductor_config.max_autotune is False


def test_dynamic_and_mixed_bf16_compile_to_int8_kernels(block):
    model, _, x = block
    with torch.no_grad():
        expected = model(x)
    for config, tolerance in ((pt2q.DynamicQuantConfig(), 0.01), (pt2q.StaticQuantConfig(mixed_bf16=True), 0.02)):
        qmodel = pt2q.quantize(model, config, [(x,)], progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = inductor.compile(qmodel, (x,))
        emulated = [w for w in caught if "bf16 ops are emulated" in str(w.message)]
        # the warning comes exactly where bf16 would be emulated: mixed bf16 on a CPU without native bf16
        assert len(emulated) == (1 if config.mixed_bf16 and not PROCESS_ISA.native_bf16 else 0), caught
        assert compiled.options["mixed_bf16"] == config.mixed_bf16
        assert sum(compiled.int8_kernels.values()) == 2, (config, compiled.int8_kernels)
        assert relative_error(compiled(x), expected) < tolerance


def test_conv_net_lowers_to_int8_conv_kernels_with_fused_residual():
    zoo = build("cnn")
    qmodel = pt2q.quantize(zoo.model, pt2q.StaticQuantConfig(), [zoo.args], progress=False)
    compiled = inductor.compile(qmodel, zoo.args)
    kernels = compiled.int8_kernels
    conv_kernels = sum(count for name, count in kernels.items() if name.startswith("qconv"))
    linear_kernels = sum(count for name, count in kernels.items() if name.startswith("qlinear"))
    assert (conv_kernels, linear_kernels) == (3, 1), kernels
    assert any(name.startswith("qconv") and "binary" in name for name in kernels), kernels
    with torch.no_grad():
        assert relative_error(compiled(*zoo.args), zoo.model(*zoo.args)) < 0.03


def test_keyword_inputs_the_hugging_face_way():
    """inductor.compile takes a dict of keyword inputs (what tokenizers return) and is called with them."""
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, input_ids=None, attention_mask=None):
            return self.a(input_ids) * attention_mask + self.b(input_ids)

    torch.manual_seed(0)
    model = TwoInputs().eval()
    batch = {"input_ids": torch.randn(8, 16), "attention_mask": torch.ones(8, 16)}
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(), [batch], progress=False)
    compiled = inductor.compile(qmodel, batch)
    assert compiled.num_int8_kernels == 2
    with torch.no_grad():
        assert relative_error(compiled(**batch), qmodel(**batch)) < 1e-4
        assert relative_error(compiled(**batch), model(**batch)) < 0.02

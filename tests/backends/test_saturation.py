"""int8 saturation on CPUs without VNNI: which layers are at risk, the warnings, and what the kernels of
this process really compute (each real-kernel test runs only where its ISA is; `make test-avx2` runs
this file as if on an AVX2-only CPU)."""
from __future__ import annotations

import re

import pytest
import torch

import pt2q
from pt2q.backends import inductor
from pt2q.backends.inductor import Int8SaturationWarning, saturating_layers
from pt2q.backends.inductor.saturation import warn_if_saturating
from tests.conftest import PROCESS_ISA, call, rel_error, requires_non_saturating_int8, requires_saturating_int8


class TwoLayers(torch.nn.Module):
    """Wide enough inputs (64 pairs per output) for saturated pair sums to show."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return TwoLayers().eval(), torch.randn(64, 64)


def quantized(mlp, guard, config_cls=pt2q.StaticQuantConfig):
    model, x = mlp
    return pt2q.quantize(model, config_cls(saturation_guard=guard), [(x,)], progress=False)


@pytest.mark.parametrize("guard, at_risk, dynamic_at_risk", [
    ("off", ["linear", "linear_1"], ["linear", "linear_1"]),
    ("weights7", [], []),
    # a 7-bit activation quantized by a fused int8 GEMM is clamped to 255 by the kernel, not to 127;
    # dynamic activations get their range from the data itself, so theirs holds
    ("activations7", ["linear_1"], []),
])
def test_layers_at_risk_read_from_the_graph(mlp, guard, at_risk, dynamic_at_risk):
    assert saturating_layers(quantized(mlp, guard)) == at_risk
    assert saturating_layers(quantized(mlp, guard, pt2q.DynamicQuantConfig)) == dynamic_at_risk


def test_xpu_signed_activations_are_at_risk_too(mlp):
    """oneDNN shifts signed activations to unsigned: the span, not the sign, sets the bound."""
    model, x = mlp
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(backend="xpu"), [(x,)], progress=False)
    assert saturating_layers(qmodel) == ["linear", "linear_1"]
    assert saturating_layers(pt2q.quantize(model, pt2q.WeightOnlyQuantConfig(), progress=False,
                                           example_inputs=(x,))) == []


def test_warning_only_where_int8_saturates(mlp, monkeypatch):
    qmodel = quantized(mlp, "off")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.warns(Int8SaturationWarning, match=r"2 int8 layer\(s\) \(quantized for CPU capability X\) can "
                                                   r"multiply full-range activations by full-range weights "
                                                   r"\(linear, linear_1\)"):
        assert warn_if_saturating(qmodel, "here", built_on="CPU capability X") == ["linear", "linear_1"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    if pt2q.isa.detect().avx512_vnni:
        assert warn_if_saturating(qmodel, "here") == []  # VNNI: no warning at all (pytest errors on one)


def test_load_warns_when_a_full_range_model_meets_a_saturating_cpu(mlp, monkeypatch, tmp_path, recwarn):
    path = tmp_path / "full_range.pt2"
    pt2q.save(quantized(mlp, "off"), path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.warns(Int8SaturationWarning, match=r"pt2q.load\(.*full_range.pt2'\): 2 int8 layer\(s\) \(quantized "
                                                   f"for {re.escape(PROCESS_ISA.describe())}\\)"):
        loaded = pt2q.load(path)
    assert loaded.meta["pt2q_int8_numerics"]["saturation_guard"] == "off"
    guarded = tmp_path / "guarded.pt2"
    pt2q.save(quantized(mlp, "weights7"), guarded)
    recwarn.clear()
    pt2q.load(guarded)
    assert not [w for w in recwarn if issubclass(w.category, Int8SaturationWarning)]


# -- what the kernels really compute ----------------------------------------------------------------
@requires_saturating_int8
def test_full_range_int8_is_wrong_on_a_saturating_cpu(mlp):
    """The reason the guard exists: compiled full-range int8 is far from its own Q/DQ graph here."""
    _, x = mlp
    qmodel = quantized(mlp, "off")
    with pytest.warns(Int8SaturationWarning):
        compiled = inductor.compile(qmodel, (x,))
    assert rel_error(compiled(x), call(qmodel, (x,))) > 0.05


@requires_saturating_int8
def test_guarded_int8_matches_its_graph_on_a_saturating_cpu(mlp):
    _, x = mlp
    qmodel = quantized(mlp, "auto")
    assert qmodel.meta["pt2q_int8_numerics"]["applied"] == {"weights7": 2}
    assert saturating_layers(qmodel) == []
    compiled = inductor.compile(qmodel, (x,))
    assert compiled.num_int8_kernels == 2
    # no pair can saturate, even for inputs far outside the calibrated range; what is left is fp32
    # rounding of the int32 -> fp32 rescale
    for probe in (x, 3 * x):
        assert rel_error(compiled(probe), call(qmodel, (probe,))) < 1e-4


def test_upstream_fused_output_quantize_ignores_quant_max(mlp):
    """Pins the Inductor behaviour that makes 7-bit activations unreliable (any ISA): the quantize fused
    into the first linear clamps to [0, 255], not to the graph's [0, 127], so inputs outside the
    calibrated range make the compiled model differ from its Q/DQ graph. If this starts failing, the
    fused output clamp honours quant_max and saturation.py may trust narrowed activation ranges."""
    import warnings

    _, x = mlp
    qmodel = quantized(mlp, "activations7")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Int8SaturationWarning)  # on a saturating CPU: linear_1 is at risk
        compiled = inductor.compile(qmodel, (x,))
    assert rel_error(compiled(x), call(qmodel, (x,))) < 1e-4  # inside the calibrated range: the same
    assert rel_error(compiled(3 * x), call(qmodel, (3 * x,))) > 0.05


@requires_non_saturating_int8
def test_full_range_int8_matches_its_graph_with_vnni(mlp):
    _, x = mlp
    qmodel = quantized(mlp, "auto")
    assert qmodel.meta["pt2q_int8_numerics"]["resolved"] == ["off"]  # auto keeps every bit here
    compiled = inductor.compile(qmodel, (x,))
    assert compiled.num_int8_kernels == 2
    assert rel_error(compiled(x), call(qmodel, (x,))) < 1e-4


@requires_saturating_int8
def test_guarded_conv_net_matches_its_graph_on_a_saturating_cpu():
    from tests.models import build

    zoo = build("cnn")
    qmodel = pt2q.quantize(zoo.model, pt2q.StaticQuantConfig(), [zoo.args], progress=False)
    assert qmodel.meta["pt2q_int8_numerics"]["applied"] == {"weights7": 4}
    compiled = inductor.compile(qmodel, zoo.args)
    assert sum(n for k, n in compiled.int8_kernels.items() if k.startswith("qconv")) == 3
    assert rel_error(compiled(*zoo.args), call(qmodel, zoo.args)) < 1e-4

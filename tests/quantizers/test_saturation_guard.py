"""The saturation guard in the quantizers' schemes and the configs: which integer ranges each policy
gives, what "auto" picks on which CPU, and that the choice is recorded on the model."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import ConfigError, X86Quantizer, XPUQuantizer, isa
from pt2q.backends.inductor import saturating_layers
from pt2q.quantizers import RULES, make_scheme
from tests.conftest import CHOOSE_QPARAMS, DQ_PER_CHANNEL, DQ_PER_TENSOR, call, nodes_of, rel_error


@pytest.fixture
def onednn_cap(monkeypatch):
    """Pretend oneDNN is capped (pt2q's decisions only: the kernels of this process do not change)."""
    def set_cap(value: str | None):
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if value is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        return isa.detect()
    return set_cap


def ranges(scheme):
    activation = None if scheme.activation is None else (scheme.activation.quant_min, scheme.activation.quant_max)
    return activation, (scheme.weight.quant_min, scheme.weight.quant_max)


@pytest.mark.parametrize("dtype, guard, expected", [
    (torch.uint8, "off", ((0, 255), (-128, 127))),
    (torch.uint8, "weights7", ((0, 255), (-64, 63))),
    (torch.uint8, "activations7", ((0, 127), (-128, 127))),
    (torch.int8, "off", ((-128, 127), (-128, 127))),
    (torch.int8, "weights7", ((-128, 127), (-64, 63))),
    (torch.int8, "activations7", ((-64, 63), (-128, 127))),
])
def test_scheme_ranges(dtype, guard, expected):
    for dynamic in (False, True):
        for per_channel in (True, False):
            scheme = make_scheme(dtype, dynamic=dynamic, per_channel=per_channel, saturation_guard=guard)
            assert ranges(scheme) == expected
            assert scheme.saturation_guard == guard
            # no u8 x s8 pair sum leaves int16 unless the guard is off
            (a_min, a_max), (w_min, w_max) = expected
            assert isa.pair_sum_saturates(a_max - a_min, max(-w_min, w_max)) is (guard == "off")


def test_weight_only_scheme_needs_no_guard():
    scheme = make_scheme(torch.uint8, weight_only=True, saturation_guard="weights7")
    assert scheme.activation is None and ranges(scheme)[1] == (-128, 127) and scheme.saturation_guard == "off"


def test_make_scheme_takes_only_resolved_guards():
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        make_scheme(torch.uint8, saturation_guard="auto")


@pytest.mark.parametrize("cap, x86_guard", [("AVX2", "weights7"), ("AVX512_CORE", "weights7"), (None, None)])
def test_auto_follows_the_isa_for_x86_and_never_for_xpu(onednn_cap, cap, x86_guard):
    detected = onednn_cap(cap)
    if x86_guard is None:  # this machine, uncapped
        x86_guard = "weights7" if detected.int8_saturates else "off"
    for scheme in (X86Quantizer.static_scheme(), X86Quantizer.dynamic_scheme()):
        assert scheme.saturation_guard == x86_guard
    assert XPUQuantizer.static_scheme().saturation_guard == "off"  # a GPU target: this CPU does not matter
    config_scheme = pt2q.StaticQuantConfig().to_quantizer().global_scheme
    assert config_scheme.saturation_guard == x86_guard


def test_a_gemm_of_two_activations_takes_7bit_activations_instead():
    by_rule = {rule.name: rule for rule in RULES}
    weights7 = make_scheme(torch.uint8, saturation_guard="weights7")
    assert weights7.for_rule(by_rule["linear"]) is weights7 and weights7.for_rule(by_rule["conv"]) is weights7
    matmul = weights7.for_rule(by_rule["attention_matmul"])
    assert (matmul.saturation_guard, ranges(matmul)[0]) == ("activations7", (0, 127))
    off = make_scheme(torch.uint8, saturation_guard="off")
    assert off.for_rule(by_rule["attention_matmul"]) is off


def test_auto_on_a_saturating_cpu_narrows_conv_and_linear_weights(onednn_cap):
    onednn_cap("AVX2")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,)], progress=False)
    numerics = qmodel.meta["pt2q_int8_numerics"]
    assert numerics["resolved"] == ["weights7"] and numerics["applied"] == {"weights7": 2}
    for op in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
        node = nodes_of(qmodel, op)[0]
        assert tuple(node.args[0].args[3:5]) == (0, 255) and tuple(node.args[1].args[4:6]) == (-64, 63)
    assert saturating_layers(qmodel) == []


@pytest.mark.parametrize("cls", [pt2q.StaticQuantConfig, pt2q.DynamicQuantConfig])
def test_invalid_policy_raises_config_error_listing_choices(cls):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}.saturation_guard='7bit' is not valid; valid: 'auto', 'weights7', "
                                          r"'activations7', 'off'"):
        cls(saturation_guard="7bit")
    with pytest.raises(ConfigError, match="saturation_guard"):
        X86Quantizer.static_scheme(saturation_guard="on")


def test_weight_only_config_has_no_guard_field():
    with pytest.raises(ConfigError, match="has no field 'saturation_guard'"):
        pt2q.WeightOnlyQuantConfig(saturation_guard="off")


@pytest.mark.parametrize("guard", ["weights7", "activations7"])
def test_quantized_graph_carries_the_guarded_ranges(zoo, guard):
    zm = zoo("mlp")
    qmodel = pt2q.quantize(zm.model, pt2q.StaticQuantConfig(saturation_guard=guard), [zm.args], progress=False)
    weights = [n for n in nodes_of(qmodel, DQ_PER_CHANNEL)]
    activations = [n for n in nodes_of(qmodel, DQ_PER_TENSOR)]
    assert len(weights) == len(activations) == 3
    expected_activation, expected_weight = {"weights7": ((0, 255), (-64, 63)),
                                            "activations7": ((0, 127), (-128, 127))}[guard]
    assert {tuple(n.args[4:6]) for n in weights} == {expected_weight}
    assert {tuple(n.args[3:5]) for n in activations} == {expected_activation}
    # 7-bit activations produced by a fused int8 GEMM hold only inside the calibrated range (see
    # pt2q/backends/inductor/saturation.py): the two linears after one are at risk
    assert saturating_layers(qmodel) == ([] if guard == "weights7" else ["linear_1", "linear_2"])
    assert rel_error(call(qmodel, zm.args), zm.run()) < 0.03
    numerics = qmodel.meta["pt2q_int8_numerics"]
    assert numerics["saturation_guard"] == guard and numerics["resolved"] == [guard]
    assert numerics["applied"] == {guard: 3}
    assert numerics["built_on"] == isa.detect().describe()


def test_dynamic_activations7_halves_choose_qparams_range(zoo):
    zm = zoo("mlp")
    qmodel = pt2q.quantize(zm.model, pt2q.DynamicQuantConfig(saturation_guard="activations7"),
                           example_inputs=zm.args, progress=False)
    assert {n.args[1:3] for n in nodes_of(qmodel, CHOOSE_QPARAMS)} == {(0, 127)}


def test_local_rules_resolve_their_own_guard(zoo):
    zm = zoo("mlp")
    config = pt2q.StaticQuantConfig(saturation_guard="off").set_local(
        r"2", pt2q.StaticQuantConfig(saturation_guard="weights7"))
    qmodel = pt2q.quantize(zm.model, config, [zm.args], progress=False)
    assert qmodel.meta["pt2q_int8_numerics"]["resolved"] == ["off", "weights7"]
    assert [tuple(n.args[4:6]) for n in nodes_of(qmodel, DQ_PER_CHANNEL)] == [(-128, 127), (-64, 63), (-128, 127)]

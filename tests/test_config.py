"""StaticQuantConfig / DynamicQuantConfig: field validation, set_local rules and their precedence."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

import pt2q
from pt2q.quantizers.base import ACTIVATION_OBSERVERS
from pt2q import ConfigError, DynamicQuantConfig, StaticQuantConfig, X86Quantizer, XPUQuantizer
from tests.conftest import ModelSnapshot, fp32_weighted_layers
from tests.models import ResidualCNN

aten = torch.ops.aten


def _quantize(zm, config):
    return pt2q.quantize(zm.model, config, [(zm.args, zm.kwargs)], progress=False)


# -- fields ---------------------------------------------------------------------------------------
def test_defaults():
    config = StaticQuantConfig()
    assert (config.backend, config.weight_granularity) == ("x86", "per_channel")
    assert config.activation_observer in ACTIVATION_OBSERVERS
    assert not config.mixed_bf16 and not config.quantize_attention_matmul and not config.is_dynamic
    assert DynamicQuantConfig().is_dynamic


def test_unknown_field_names_it_lists_valid_ones_and_suggests():
    with pytest.raises(ConfigError) as info:
        StaticQuantConfig(backnd="x86")
    message = str(info.value)
    assert "'backnd'" in message
    assert "did you mean 'backend'" in message
    for field in ("backend", "activation_observer", "weight_granularity", "mixed_bf16", "quantize_attention_matmul"):
        assert field in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, pt2q.Pt2qError)


def test_unknown_field_without_close_match():
    with pytest.raises(ConfigError, match="'zzz'") as info:
        DynamicQuantConfig(zzz=1)
    assert "did you mean" not in str(info.value)


def test_static_only_field_rejected_by_dynamic_config():
    with pytest.raises(ConfigError, match="DynamicQuantConfig has no field 'activation_observer'"):
        DynamicQuantConfig(activation_observer="minmax")


@pytest.mark.parametrize("cls", [StaticQuantConfig, DynamicQuantConfig])
def test_bad_backend(cls):
    with pytest.raises(ConfigError, match="'arm'.*x86.*xpu"):
        cls(backend="arm")


def test_bad_observer_and_granularity():
    with pytest.raises(ConfigError, match="'percentile'.*histogram.*minmax.*moving_average"):
        StaticQuantConfig(activation_observer="percentile")
    with pytest.raises(ConfigError, match="per_row"):
        StaticQuantConfig(weight_granularity="per_row")


def test_to_quantizer_reflects_fields():
    quantizer = StaticQuantConfig(backend="xpu", activation_observer="histogram",
                                  weight_granularity="per_tensor").to_quantizer()
    assert type(quantizer) is XPUQuantizer
    scheme = quantizer.global_scheme
    assert scheme.activation.dtype == torch.int8 and not scheme.is_dynamic
    assert scheme.activation.observer_or_fake_quant_ctr.p.func is HistogramObserver
    assert scheme.weight.qscheme == torch.per_tensor_symmetric
    quantizer = StaticQuantConfig(activation_observer="minmax").to_quantizer()
    assert type(quantizer) is X86Quantizer
    assert quantizer.global_scheme.activation.observer_or_fake_quant_ctr.p.func is MinMaxObserver
    default = StaticQuantConfig()
    assert default.to_quantizer().global_scheme.activation.observer_or_fake_quant_ctr.p.func is \
        ACTIVATION_OBSERVERS[default.activation_observer]
    assert quantizer.global_scheme.weight.qscheme == torch.per_channel_symmetric
    assert DynamicQuantConfig().to_quantizer().global_scheme.is_dynamic
    assert StaticQuantConfig(quantize_attention_matmul=True).to_quantizer().options["quantize_attention_matmul"]


# -- set_local validation -------------------------------------------------------------------------
def test_set_local_returns_self_and_records_rules():
    config = StaticQuantConfig()
    assert config.set_local("head", None).set_local(nn.Conv2d, StaticQuantConfig()) is config
    assert [target for target, _ in config.local_rules] == ["head", nn.Conv2d]


@pytest.mark.parametrize("target", [3, int, nn.Linear(2, 2)])
def test_set_local_bad_target(target):
    with pytest.raises(ConfigError, match="set_local target"):
        StaticQuantConfig().set_local(target, None)


def test_set_local_bad_config():
    with pytest.raises(ConfigError, match="got str"):
        StaticQuantConfig().set_local("head", "fp32")


def test_set_local_other_backend_rejected():
    with pytest.raises(ConfigError, match="backend 'xpu' differs from the global backend 'x86'"):
        StaticQuantConfig().set_local("head", StaticQuantConfig(backend="xpu"))
    with pytest.raises(ConfigError, match="differs"):
        DynamicQuantConfig(backend="xpu").set_local(nn.Linear, DynamicQuantConfig())


def test_set_local_invalid_regex_fails_before_touching_the_model(zoo):
    zm = zoo("mlp")
    snap = ModelSnapshot(zm.model)
    with pytest.raises(ConfigError, match=r"'\('"):
        _quantize(zm, StaticQuantConfig().set_local("(", None))
    snap.assert_unchanged()


# -- set_local effect on a converted graph ----------------------------------------------------------
def test_regex_keeps_exactly_that_layer_fp32(zoo):
    zm = zoo("mlp")  # Sequential: Linear '0', ReLU, Linear '2', GELU, Linear '4'
    qmodel = _quantize(zm, StaticQuantConfig().set_local("2", None))
    assert fp32_weighted_layers(qmodel) == ["2.weight"]
    assert pt2q.count_quantized_layers(qmodel) == 2


def test_regex_matches_enclosing_modules(zoo):
    zm = zoo("bert")
    qmodel = _quantize(zm, StaticQuantConfig().set_local(r"encoder\.layer\.0", None))
    fp32 = fp32_weighted_layers(qmodel)
    assert len(fp32) == 6 and all(name.startswith("encoder.layer.0.") for name in fp32)
    assert pt2q.count_quantized_layers(qmodel) == zm.num_quantizable - 6


def test_regex_must_match_a_whole_name(zoo):
    zm = zoo("mlp")
    # '0' must not match '0'-containing prefixes of other names; 'foo' matches nothing
    qmodel = _quantize(zm, StaticQuantConfig().set_local("foo", None))
    assert fp32_weighted_layers(qmodel) == []


def test_module_class_target():
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    qmodel = pt2q.quantize(model, StaticQuantConfig().set_local(nn.Conv2d, None), [(x,)], progress=False)
    assert sorted(fp32_weighted_layers(qmodel)) == ["conv1.weight", "conv2.weight", "stem.0.weight"]
    assert pt2q.count_quantized_layers(qmodel) == 1  # the Linear head


@pytest.mark.parametrize("op", [aten.conv2d.default, aten.conv2d])
def test_aten_op_target(op):
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    qmodel = pt2q.quantize(model, StaticQuantConfig().set_local(op, None), [(x,)], progress=False)
    assert len(fp32_weighted_layers(qmodel)) == 3
    assert pt2q.count_quantized_layers(qmodel) == 1


def test_name_rule_beats_type_rule(zoo):
    zm = zoo("bert")
    config = StaticQuantConfig().set_local(nn.Linear, None).set_local(r"pooler\.dense", StaticQuantConfig())
    qmodel = _quantize(zm, config)
    assert pt2q.count_quantized_layers(qmodel) == 1
    assert "pooler.dense.weight" not in fp32_weighted_layers(qmodel)
    assert len(fp32_weighted_layers(qmodel)) == zm.num_quantizable - 1
    # same rules, other order: the name rule still wins
    config = StaticQuantConfig().set_local(r"pooler\.dense", StaticQuantConfig()).set_local(nn.Linear, None)
    assert pt2q.count_quantized_layers(_quantize(zm, config)) == 1


def test_type_rule_beats_global(zoo):
    zm = zoo("mlp")
    config = DynamicQuantConfig().set_local(nn.Linear, None)
    assert config.to_quantizer().global_scheme is not None
    qmodel = pt2q.quantize(zm.model, config, example_inputs=zm.args, progress=False)
    assert len(fp32_weighted_layers(qmodel)) == 3


def test_local_static_config_under_dynamic_global(zoo):
    zm = zoo("mlp")
    config = DynamicQuantConfig().set_local("4", StaticQuantConfig())
    qmodel = _quantize(zm, config)
    assert pt2q.count_quantized_layers(qmodel) == 3
    static_q = [n for n in qmodel.graph.nodes if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default]
    dynamic_q = [n for n in qmodel.graph.nodes if n.target is torch.ops.quantized_decomposed.choose_qparams.tensor]
    assert len(static_q) == 1 and len(dynamic_q) == 2


def test_everything_fp32_is_allowed(zoo):
    zm = zoo("mlp")
    qmodel = _quantize(zm, StaticQuantConfig().set_local(nn.Linear, None))
    assert pt2q.count_quantized_layers(qmodel) == 0
    assert len(fp32_weighted_layers(qmodel)) == 3
    torch.testing.assert_close(qmodel(*zm.args), zm.run(), rtol=0, atol=0)


# -- every field checked by type and value, at construction and at use -------------------------------
@pytest.mark.parametrize("cls, field_name, value, match", [
    (StaticQuantConfig, "quantize_attention_matmul", "false", r"quantize_attention_matmul must be True or False, "
                                                              r"got 'false' \(str\)"),
    (StaticQuantConfig, "mixed_bf16", "no", r"mixed_bf16 must be True or False, got 'no'"),
    (DynamicQuantConfig, "mixed_bf16", 1, r"mixed_bf16 must be True or False, got 1 \(int\)"),
    (StaticQuantConfig, "activation_observer", ["minmax"], r"activation_observer=\['minmax'\] is not valid; "
                                                           r"valid: 'histogram', 'minmax', 'moving_average'"),
    (StaticQuantConfig, "backend", None, r"backend=None is not valid; valid: 'x86', 'xpu'"),
    (StaticQuantConfig, "smooth_quant", 0.5, r"smooth_quant must be a pt2q.SmoothQuantConfig or None, got float"),
])
def test_field_types_checked_at_construction(cls, field_name, value, match):
    with pytest.raises(ConfigError, match=match):
        cls(**{field_name: value})


def test_fields_assigned_later_are_checked_at_use(zoo):
    zm = zoo("mlp")
    config = StaticQuantConfig()
    config.backend = "arm"
    with pytest.raises(ConfigError, match=r"StaticQuantConfig.backend='arm' is not valid; valid: 'x86', 'xpu'"):
        _quantize(zm, config)
    local = StaticQuantConfig()
    config = StaticQuantConfig().set_local("0", local)
    local.mixed_bf16 = "yes"
    with pytest.raises(ConfigError, match="mixed_bf16 must be True or False"):
        _quantize(zm, config)
    local.mixed_bf16, local.backend = False, "xpu"
    with pytest.raises(ConfigError, match=r"set_local\('0'\): backend 'xpu' differs"):
        _quantize(zm, config)


def test_set_local_validates_its_regex_at_once():
    with pytest.raises(ConfigError, match=r"set_local\('\('\): not a valid regex"):
        StaticQuantConfig().set_local("(", None)


def test_set_local_regex_matching_nothing_warns_with_close_names(zoo):
    zm = zoo("bert")
    config = StaticQuantConfig().set_local(r"encoder\.layers\.0\..*", None)  # the module is encoder.layer.0
    with pytest.warns(UserWarning, match=r"set_local\('encoder\\\\.layers\\\\.0\\\\..\*'\) matches no module.*"
                                         r"close module names: encoder\.layer\.0"):
        _quantize(zm, config)


def test_name_rule_matches_whole_names_only():
    """'fc' keeps `fc` in fp32 and not `fc2` or `block.fc`: the regex must match a whole name."""
    class Names(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.block = nn.Sequential()
            self.block.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.block.fc(self.fc2(self.fc(x)))

    model = Names().eval()
    qmodel = pt2q.quantize(model, StaticQuantConfig().set_local("fc", None), [(torch.randn(2, 8),)], progress=False)
    assert fp32_weighted_layers(qmodel) == ["fc.weight"]
    qmodel = pt2q.quantize(model, StaticQuantConfig().set_local(r"(.*\.)?fc", None), [(torch.randn(2, 8),)],
                           progress=False)
    assert sorted(fp32_weighted_layers(qmodel)) == ["block.fc.weight", "fc.weight"]


# -- the registry of configs ---------------------------------------------------------------------------
def test_registry_names_every_config_kind_once():
    from pt2q import dynamo_backend as backend
    from pt2q.config import CONFIG_KINDS, config_class, config_kind

    # the compile backend's modes are the registry's kinds, but the whole-model (sequential) algorithms
    # and FP8 (its own target, whose modes are FP8Config's activation modes)
    assert set(backend._MODES) == {kind for kind, cls in CONFIG_KINDS.items()
                                   if not getattr(cls, "sequential", False) and kind != "fp8"}
    assert set(backend._FP8_MODES) == {"static", "dynamic"}
    for kind, cls in CONFIG_KINDS.items():
        assert config_class(kind) is cls and config_class(cls.__name__) is cls
        assert config_kind(cls()) == kind
    assert config_kind(pt2q.SmoothQuantConfig()) is None
    with pytest.raises(ConfigError, match=r"unknown quantization config 'MXFP4Config'; known: static "
                                          r"\(StaticQuantConfig\), dynamic \(DynamicQuantConfig\)"):
        config_class("MXFP4Config")

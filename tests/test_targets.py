"""pt2q.targets: backend="auto" picks the quantizer and the lowering from the target device."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import targets
from pt2q.ops import DEQUANTIZE_FP8
from tests.conftest import call, count_of


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    return model, torch.randn(4, 16)


@pytest.mark.parametrize("device, config_type, backend", [
    ("cpu", pt2q.StaticQuantConfig, "x86"), ("cuda", pt2q.StaticQuantConfig, "x86"),
    ("xpu", pt2q.StaticQuantConfig, "xpu"), ("hpu", pt2q.FP8Config, None),
])
def test_auto_picks_the_devices_quantizer(monkeypatch, mlp, device, config_type, backend):
    monkeypatch.setenv("PT2Q_TARGET_DEVICE", device)
    model, x = mlp
    qmodel = pt2q.quantize(model, None, [(x,)], backend="auto", progress=False)
    config = qmodel.meta["pt2q_config"]
    assert type(config) is config_type and getattr(config, "backend", None) == backend
    assert pt2q.count_quantized_layers(qmodel) == 2


def test_a_given_config_is_adjusted_on_a_copy(mlp):
    model, x = mlp
    config = pt2q.StaticQuantConfig().set_local("2", pt2q.StaticQuantConfig(activation_observer="minmax"))
    qmodel = pt2q.quantize(model, config, [(x,)], backend="xpu", progress=False)
    assert qmodel.meta["pt2q_config"].backend == "xpu" and config.backend == "x86"
    assert config.local_rules[0][1].backend == "x86"


def test_hpu_refuses_int8_and_names_fp8(mlp):
    model, x = mlp
    with pytest.raises(pt2q.ConfigError, match="use pt2q.FP8Config"):
        pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,)], backend="hpu", progress=False)
    with pytest.raises(pt2q.ConfigError, match="weight-only kernels are CPU kernels"):
        targets.config_for(targets.TARGETS["xpu"], pt2q.RTNConfig())


def test_unknown_names_list_the_choices(monkeypatch, mlp):
    model, x = mlp
    with pytest.raises(pt2q.DeviceError, match="'auto', 'cpu', 'cuda', 'xpu', 'hpu'"):
        pt2q.quantize(model, None, [(x,)], backend="tpu")
    monkeypatch.setenv("PT2Q_TARGET_DEVICE", "gaudi")
    with pytest.raises(pt2q.DeviceError, match="PT2Q_TARGET_DEVICE"):
        pt2q.quantize(model, None, [(x,)], backend="auto")
    with pytest.raises(pt2q.ConfigError, match="needs a config"):
        pt2q.quantize(model, None, [(x,)])


def test_compile_sends_fp8_models_to_the_habana_lowering(mlp):
    model, x = mlp
    qmodel = pt2q.quantize(model, pt2q.FP8Config(), [(x,)], progress=False)
    lowered = pt2q.compile(qmodel, (x,), backend="cpu")
    assert count_of(lowered, DEQUANTIZE_FP8) == 0
    assert any(getattr(n.target, "namespace", "") == "pt2q_gaudi2" for n in lowered.graph.nodes)
    assert torch.equal(call(lowered, (x,)), call(qmodel, (x,)))


def test_compile_on_hpu_refuses_an_int8_model(mlp):
    model, x = mlp
    qmodel = pt2q.quantize(model, pt2q.DynamicQuantConfig(), example_inputs=(x,), progress=False)
    with pytest.raises(pt2q.ConfigError, match="runs FP8 models"):
        pt2q.compile(qmodel, (x,), backend="hpu")


def test_compile_on_xpu_without_a_device_is_a_clear_error(mlp):
    model, x = mlp
    qmodel = pt2q.quantize(model, pt2q.StaticQuantConfig(backend="xpu"), [(x,)], progress=False)
    with pytest.raises(pt2q.BackendUnavailable, match="xpu"):
        pt2q.compile(qmodel, (x,), backend="xpu")

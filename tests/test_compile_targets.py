"""torch.compile(model, backend="pt2q", options={"target": ...}) reaches the lowerings of pt2q.compile."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import dynamo_backend as backend_module


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    return model, torch.randn(4, 16)


def compiled_output(model, x, calls=1, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pt2q", options={"strict": True, **options})
    with torch.no_grad():
        for _ in range(calls):
            out = compiled(x)
    return out


def test_fp8_target_runs_the_habana_lowering(mlp, monkeypatch):
    model, x = mlp
    lowered = []
    original = backend_module.BackendOptions.lower
    monkeypatch.setattr(backend_module.BackendOptions, "lower",
                        lambda self, qmodel, example: lowered.append(self.target) or original(self, qmodel, example))
    out = compiled_output(model, x, target="fp8")
    assert lowered == ["fp8"]
    qmodel = pt2q.quantize(model, pt2q.FP8Config(activation="dynamic"), example_inputs=(x,), progress=False)
    reference = pt2q.compile(qmodel, (x,), backend="hpu")(x)
    assert torch.equal(out, reference)


def test_fp8_static_calibrates_on_the_first_calls(mlp):
    model, x = mlp
    with torch.no_grad():
        fp32 = model(x)
    calibrating = compiled_output(model, x, calls=2, target="hpu", mode="static", calib_steps=2)
    assert torch.equal(calibrating, fp32)  # the calibration calls return float results
    quantized = compiled_output(model, x, calls=3, config=pt2q.FP8Config(), calib_steps=2)
    assert not torch.equal(quantized, fp32)
    assert (quantized - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize("options, error, match", [
    ({"target": "xpu"}, pt2q.BackendUnavailable, "torch.xpu.is_available"),
    ({"target": "tpu"}, pt2q.ConfigError, "'cpu', 'xpu', 'fp8', 'hpu', 'auto'"),
    ({"target": "fp8", "mode": "rtn"}, pt2q.ConfigError, "'static' or 'dynamic'"),
    ({"target": "cpu", "config": pt2q.FP8Config()}, pt2q.ConfigError, "FP8Config runs on target 'fp8'"),
    ({"target": "fp8", "smooth_quant": 0.5, "mode": "static"}, pt2q.ConfigError, "not to FP8"),
])
def test_bad_targets_are_the_users_to_fix(options, error, match):
    with pytest.raises(error, match=match):
        backend_module.BackendOptions.parse(options).quant_config()


def test_auto_follows_the_target_device(monkeypatch):
    monkeypatch.setenv("PT2Q_TARGET_DEVICE", "hpu")
    assert backend_module.BackendOptions.parse({"target": "auto"}).target == "fp8"
    monkeypatch.setenv("PT2Q_TARGET_DEVICE", "cpu")
    assert backend_module.BackendOptions.parse({"target": "auto"}).target == "cpu"

"""torch.compile(model, backend="pt2q"): found by name, modes, graph breaks, recompiles, fallbacks.

Each compile costs seconds on 2 cores: models are tiny and compiled once per test."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import pt2q


class TwoLayers(torch.nn.Module):
    def __init__(self, dim: int = 64, break_graph: bool = False):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, 8)
        self.break_graph = break_graph

    def forward(self, x):
        hidden = torch.relu(self.fc(x))
        if self.break_graph and hidden.sum() > 0:  # data-dependent branch: a graph break
            hidden = hidden * 2
        return self.head(hidden)


class Residual(torch.nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_found_by_name_without_importing_pt2q():
    script = textwrap.dedent("""
        import sys, torch
        assert "pt2q" not in sys.modules
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
        x = torch.randn(8, 32)
        compiled = torch.compile(model, backend="pt2q", options={"mode": "dynamic", "strict": True}, dynamic=False)
        with torch.no_grad():
            error = ((compiled(x) - model(x)).norm() / model(x).norm()).item()
        print("loaded-by-entry-point", "pt2q" in sys.modules, "error", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("loaded-by-entry-point")][-1]
    assert line.split()[1] == "True"
    assert float(line.split()[3]) < 0.02


def test_static_mode_calibrates_then_matches_pt2q_quantize():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    batches = [torch.randn(16, 64) for _ in range(3)]
    compiled = torch.compile(model, backend="pt2q", options={"mode": "static", "calib_steps": 3, "strict": True},
                             dynamic=False)
    with torch.no_grad():
        calibration_outputs = [compiled(x) for x in batches]
        for x, output in zip(batches, calibration_outputs):  # calibration calls return fp32 results
            assert torch.equal(output, model(x))
        reference = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,) for x in batches], progress=False)
        probe = torch.randn(16, 64)
        int8 = compiled(probe)
        assert not torch.equal(int8, model(probe))  # now int8
        assert relative_error(int8, reference(probe)) < 1e-4
        assert relative_error(int8, model(probe)) < 0.02


def test_graph_break_each_subgraph_quantized(caplog):
    torch.manual_seed(0)
    model = TwoLayers(break_graph=True).eval()
    x = torch.randn(16, 64)
    with caplog.at_level(logging.INFO, logger="pt2q"):
        compiled = torch.compile(model, backend="pt2q", options={"mode": "dynamic", "strict": True}, dynamic=False)
        with torch.no_grad():
            output = compiled(x)
            assert relative_error(output, model(x)) < 0.02
    reports = [r.getMessage() for r in caplog.records if "int8 kernels {" in r.getMessage()]
    assert len(reports) == 2, reports  # one int8 build per Dynamo subgraph


def test_recompile_for_new_shape_keeps_calibration():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    compiled = torch.compile(model, backend="pt2q", options={"mode": "static", "calib_steps": 2, "strict": True},
                             dynamic=False)
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(16, 64))
        other_shape = torch.randn(5, 64)
        output = compiled(other_shape)  # a recompile: int8 at once, no new calibration calls
    assert not torch.equal(output, model(other_shape))
    assert relative_error(output, model(other_shape)) < 0.03


def test_static_calibration_survives_automatic_dynamic_recompile():
    """Default dynamic=None: a second shape recompiles the subgraph with symbolic sizes; the
    calibration from the first shape must carry over (int8 from the first call of the new shape)."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    compiled = torch.compile(model, backend="pt2q", options={"mode": "static", "calib_steps": 2, "strict": True})
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(16, 64))
        other_shape = torch.randn(7, 64)
        output = compiled(other_shape)
    assert not torch.equal(output, model(other_shape))
    assert relative_error(output, model(other_shape)) < 0.03


def test_inputs_never_written():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(128, 64)
    original = x.clone()
    compiled = torch.compile(model, backend="pt2q", options={"mode": "dynamic", "strict": True}, dynamic=False)
    with torch.no_grad():
        first, second = compiled(x), compiled(x)
    assert torch.equal(x, original)
    assert torch.equal(first, second)


def test_unknown_option_lists_valid_ones():
    model = TwoLayers().eval()
    with pytest.raises(Exception, match=r"unknown option 'calib_step'.*valid options: mode, calib_steps"):
        torch.compile(model, backend="pt2q", options={"calib_step": 3})(torch.randn(2, 64))


def test_failure_falls_back_to_inductor_unless_strict(caplog, monkeypatch):
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = torch.randn(16, 64)

    def broken_quantize(*args, **kwargs):
        raise RuntimeError("simulated quantization failure")

    monkeypatch.setattr(pt2q.pipeline, "quantize", broken_quantize)
    with caplog.at_level(logging.WARNING, logger="pt2q"):
        compiled = torch.compile(model, backend="pt2q", options={"mode": "dynamic"}, dynamic=False)
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-5)  # plain Inductor: fp32 results
    assert any("plain Inductor" in r.getMessage() and "simulated quantization failure" in r.getMessage()
               for r in caplog.records)
    torch._dynamo.reset()
    strict = torch.compile(model, backend="pt2q", options={"mode": "dynamic", "strict": True}, dynamic=False)
    with pytest.raises(Exception, match="simulated quantization failure"):
        strict(x)


@pytest.mark.parametrize("dynamic", [True, None])
def test_symbolic_shapes_get_one_int8_build_per_shape(dynamic):
    """dynamic=True, or the default automatic dynamic after a second shape: every shape runs int8."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    compiled = torch.compile(model, backend="pt2q", options={"mode": "dynamic", "strict": True}, dynamic=dynamic)
    with torch.no_grad():
        for batch in (16, 5, 9):
            x = torch.randn(batch, 64)
            output = compiled(x)
            assert not torch.equal(output, model(x)), batch  # int8, not a plain fp32 build
            assert relative_error(output, model(x)) < 0.03, batch


def _static_two_layers(seed: int, scale_first: float = 1.0):
    torch.manual_seed(seed)
    model = TwoLayers().eval()
    with torch.no_grad():
        model.fc.weight *= scale_first
    return model


def test_calibration_belongs_to_one_model():
    """Two same-architecture models with different weights: each calibrates on its own data and
    matches its own pt2q.quantize; a third, compiled after the first is collected, starts uncalibrated."""
    import gc

    from pt2q import dynamo_backend as pt2q_compile

    gc.collect()  # earlier tests' models (and so their calibrations) are gone
    before = len(pt2q_compile._CALIBRATIONS)
    options = {"mode": "static", "calib_steps": 2, "strict": True}
    models = [_static_two_layers(0), _static_two_layers(1, scale_first=20.0)]
    data = [[torch.randn(16, 64) * (1 + 4 * i) for _ in range(2)] for i in range(2)]
    compiled = [torch.compile(m, backend="pt2q", options=dict(options), dynamic=False) for m in models]
    with torch.no_grad():
        for model, runner, batches in zip(models, compiled, data):
            for x in batches:  # calibration calls: fp32 results, so never the other model's int8
                assert torch.equal(runner(x), model(x))
        probe = torch.randn(16, 64)
        for model, runner, batches in zip(models, compiled, data):
            reference = pt2q.quantize(model, pt2q.StaticQuantConfig(), [(x,) for x in batches], progress=False)
            output = runner(probe)
            assert not torch.equal(output, model(probe))
            assert relative_error(output, reference(probe)) < 1e-4
    entries = len(pt2q_compile._CALIBRATIONS)
    assert entries == before + 2
    del models[0], compiled[0]  # Dynamo's compiled code stays: the third model reuses it
    gc.collect()
    assert len(pt2q_compile._CALIBRATIONS) == entries - 1  # the first model's calibration went with it
    third = _static_two_layers(2)
    runner = torch.compile(third, backend="pt2q", options=dict(options), dynamic=False)
    with torch.no_grad():
        x = torch.randn(16, 64)
        assert torch.equal(runner(x), third(x))  # a calibration call, not someone else's int8


def test_config_mistakes_in_options_always_raise():
    """An invalid skip regex is the user's to fix: it raises, never falls back to plain Inductor."""
    model = TwoLayers().eval()
    with pytest.raises(Exception, match=r"set_local\('\('\): not a valid regex"):
        torch.compile(model, backend="pt2q", options={"skip": ["("]})(torch.randn(2, 64))


def _kernel_reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("pt2q inductor: int8 kernels")]


@pytest.mark.parametrize("options, kernels", [
    ({"mode": "dynamic", "skip": [r"head"]}, 1),                                          # skip: fp32 head
    ({"config": pt2q.DynamicQuantConfig().set_local(r"fc", None)}, 1),                    # mode from config
    ({"mode": "weight_only"}, 0),                                                         # no int8 GEMM
])
def test_skip_config_and_weight_only_options(caplog, options, kernels):
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = torch.randn(16, 64)
    with caplog.at_level(logging.INFO, logger="pt2q"):
        compiled = torch.compile(model, backend="pt2q", options={**options, "strict": True}, dynamic=False)
        with torch.no_grad():
            output = compiled(x)
    assert not torch.equal(output, model(x))  # quantized (weight-only too: int8 weights, dequantized)
    assert relative_error(output, model(x)) < 0.02
    reports = _kernel_reports(caplog)
    assert len(reports) == 1 and reports[0].count("qlinear") == (1 if kernels else 0), reports
    if kernels:
        assert "qlinear_pointwise.tensor': 1}" in reports[0], reports


def test_smooth_quant_option_matches_pt2q_quantize():
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.norm.weight[:4] *= 20  # outlier channels, so the scales matter
    batches = [torch.randn(16, 64) for _ in range(2)]
    compiled = torch.compile(model, backend="pt2q", dynamic=False,
                             options={"mode": "static", "calib_steps": 2, "smooth_quant": 0.5, "strict": True})
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5))
    reference = pt2q.quantize(model, config, [(x,) for x in batches], progress=False)
    assert reference.meta["pt2q_smooth_quant_report"].groups
    with torch.no_grad():
        for x in batches:
            compiled(x)
        probe = torch.randn(16, 64)
        assert relative_error(compiled(probe), reference(probe)) < 1e-4

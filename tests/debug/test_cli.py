"""`pt2q dump`: --model module:function / file.py:function / demo, --out, --force, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pt2q.cli import main

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn


    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        return model, (torch.randn(4, 8),)


    def make_with_calibration():
        model, example = make()
        return model, example, [(torch.randn(4, 8),) for _ in range(3)]


    def not_a_pair():
        return 42


    def raises():
        raise RuntimeError("the factory failed")
""")


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory, as python -m does
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    yield tmp_path
    sys.modules.pop("user_models", None)


def _run(*argv) -> int:
    return main(["dump", *argv, "--no-compile", "--no-progress", "--observer", "minmax"])


def test_module_function(factory_dir, capsys):
    assert _run("--model", "user_models:make", "--out", "out") == 0
    printed = capsys.readouterr().out
    assert "pt2q dump: Sequential from user_models:make -> out" in printed
    assert "worst SQNR first" in printed and f"open {os.path.join('out', 'index.html')}" in printed
    assert (factory_dir / "out" / "04_convert_pt2e.txt").exists()


def test_file_function_with_calibration_data(factory_dir):
    assert _run("--model", f"{factory_dir / 'user_models.py'}:make_with_calibration", "--out", "out2") == 0
    summary = json.loads((factory_dir / "out2" / "summary.json").read_text())
    assert summary["numeric"] and summary["error"] is None


def test_existing_directory_needs_force(factory_dir, capsys):
    (factory_dir / "busy").mkdir()
    (factory_dir / "busy" / "keep.txt").write_text("mine")
    assert _run("--model", "user_models:make", "--out", "busy") == 2
    error = capsys.readouterr().err
    assert "dump directory 'busy' exists and is not empty" in error and "--force" in error
    assert _run("--model", "user_models:make", "--out", "busy", "--force") == 0
    assert (factory_dir / "busy" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("spec, message", [
    ("user_models", "expected 'demo', 'module:function'"),
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("user_models:missing", "has no function 'missing'"),
    ("user_models:not_a_pair", "must return (model, example_inputs)"),
])
def test_bad_model_spec(factory_dir, capsys, spec, message):
    assert _run("--model", spec, "--out", "x") == 1
    assert message in capsys.readouterr().err


def test_smooth_quant_option(factory_dir):
    assert _run("--model", "user_models:make_with_calibration", "--out", "sq", "--smooth-quant", "0.5") == 0
    assert any(p.name.endswith("_smooth_quant_apply.txt") for p in (factory_dir / "sq").iterdir())


def test_demo_model_small_batch(tmp_path, capsys):
    """The embedded MiniLM, at a tiny batch so the test stays fast."""
    code = main(["dump", "--model", "demo", "--out", str(tmp_path / "demo"), "--no-compile", "--no-progress",
                 "--batch-size", "2", "--seq-len", "16", "--calib-batches", "1", "--observer", "minmax"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in printed and "encoder.layer." in printed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(summary["numeric"]) >= 36  # 6 layers x 6 linears (+ pooler)


def test_console_entry_point(factory_dir):
    """`python -m pt2q dump --model module:function` imports the module from the working directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-m", "pt2q", "dump", "--model", "user_models:make", "--out", "cli",
                           "--no-compile", "--no-progress"], cwd=factory_dir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (factory_dir / "cli" / "index.html").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--smooth-quant", "abc", "'abc' is not an alpha: give a number in [0, 1] or 'auto'"),
    ("--smooth-quant", "1.5", "'1.5' is not an alpha"),
    ("--top", "-1", "'-1' is not a positive whole number"),
    ("--batch-size", "0", "'0' is not a positive whole number"),
])
def test_bad_option_values_are_usage_errors(factory_dir, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        _run("--model", "user_models:make", "--out", "never", option, value)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (factory_dir / "never").exists()


def test_factory_that_raises_is_reported_and_leaves_no_folder(factory_dir, capsys):
    assert _run("--model", "user_models:raises", "--out", "failed") == 1
    error = capsys.readouterr().err
    assert "--model user_models:raises: RuntimeError: the factory failed" in error
    assert "Traceback" not in error
    assert not (factory_dir / "failed").exists()


def test_unwritable_out_is_a_clear_error(factory_dir, capsys):
    (factory_dir / "a_file").write_text("not a directory")
    assert _run("--model", "user_models:make", "--out", "a_file/dump") == 2
    assert "dump directory 'a_file/dump' cannot be written" in capsys.readouterr().err

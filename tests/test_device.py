"""pt2q.target_device (priority hpu > xpu > cuda > cpu, PT2Q_TARGET_DEVICE, unknown names) and the doctor
report, with device availability monkeypatched and Habana / IPEX stood in for by small packages on
sys.path (neither is installed here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch._inductor.config as inductor_config

import pt2q
from pt2q import device
from pt2q.cli import main
from pt2q.errors import DeviceError

XPU_AND_CUDA_ABSENT = not torch.xpu.is_available() and not torch.cuda.is_available()


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(device.TARGET_DEVICE_ENV, raising=False)
    monkeypatch.delenv(device.PEER_TARGET_DEVICE_ENV, raising=False)


def fake_habana(monkeypatch, *, available: bool, count: int = 8):
    """Put a `habana_frameworks.torch` module in sys.modules whose `hpu` reports `available`."""
    package = types.ModuleType("habana_frameworks")
    bridge = types.ModuleType("habana_frameworks.torch")
    bridge.hpu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                       get_device_name=lambda index: "GAUDI2")
    package.torch = bridge
    monkeypatch.setitem(sys.modules, "habana_frameworks", package)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", bridge)


def present(monkeypatch, *devices: str):
    """Make exactly `devices` (of "hpu", "xpu", "cuda") report themselves available."""
    for name, backend in (("xpu", torch.xpu), ("cuda", torch.cuda)):
        monkeypatch.setattr(backend, "is_available", lambda on=name in devices: on)
        monkeypatch.setattr(backend, "device_count", lambda on=name in devices: int(on))
    if "hpu" in devices:
        fake_habana(monkeypatch, available=True)
    else:
        monkeypatch.setitem(sys.modules, "habana_frameworks.torch", None)  # import raises ImportError


@pytest.mark.parametrize("devices, expected", [
    ((), "cpu"),
    (("cuda",), "cuda"),
    (("xpu", "cuda"), "xpu"),
    (("hpu", "xpu", "cuda"), "hpu"),
    (("hpu", "cuda"), "hpu"),
])
def test_priority_order(monkeypatch, no_override, devices, expected):
    present(monkeypatch, *devices)
    assert device.target_device() == expected
    assert pt2q.device.target_device() == expected


def test_habana_that_reports_no_device_is_not_chosen(monkeypatch, no_override):
    present(monkeypatch, "xpu")
    fake_habana(monkeypatch, available=False)
    assert device.target_device() == "xpu"
    assert "reports no Gaudi device" in device.probe_hpu().detail


@pytest.mark.skipif(not XPU_AND_CUDA_ABSENT, reason="this machine has a GPU: detection does not end at cpu")
def test_this_machine_detects_cpu(no_override):
    assert device.target_device() == "cpu"
    assert device.probe_xpu().detail == f"this torch build ({torch.__version__}) has no XPU support"


def test_environment_overrides_detection_and_is_read_every_call(monkeypatch):
    present(monkeypatch, "hpu", "xpu")
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, " CPU ")
    assert device.target_device() == "cpu"
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, "cuda")  # not present: the override is still honoured
    assert device.target_device() == "cuda"
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, "")  # empty counts as unset
    assert device.target_device() == "hpu"


def test_unknown_device_name_lists_the_choices(monkeypatch):
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, "gpu")
    with pytest.raises(DeviceError, match=r"PT2Q_TARGET_DEVICE='gpu' is not a device pt2q targets; "
                                          r"valid: hpu, xpu, cuda, cpu\. .*unset it") as caught:
        device.target_device()
    assert isinstance(caught.value, ValueError)


def test_peer_variable_is_not_read_but_doctor_mentions_it(monkeypatch, no_override):
    present(monkeypatch)
    monkeypatch.setenv(device.PEER_TARGET_DEVICE_ENV, "hpu")
    assert device.target_device() == "cpu"
    assert any("INC_TARGET_DEVICE='hpu' is set; pt2q does not read it" in note for note in device.doctor().notes)


# -- the doctor report ---------------------------------------------------------------------------
def paths_by_name(report) -> dict:
    return {path.name: path for path in report.paths}


def test_report_on_a_machine_without_accelerators(monkeypatch, no_override):
    present(monkeypatch)
    report = device.doctor()
    assert report.target_device == "cpu" and report.target_source == "detected"
    assert {d.name: d.available for d in report.devices} == {"cpu": True, "cuda": False, "xpu": False, "hpu": False}
    libraries = {lib.name: lib for lib in report.libraries}
    assert libraries["oneDNN"].available is torch.backends.mkldnn.is_available()
    assert libraries["Habana"].available is False
    assert report.isa == pt2q.isa.detect()
    paths = paths_by_name(report)
    assert (paths["XPU int8"].state, paths["XPU int8"].entry_point) == ("emulated", "pt2q.backends.xpu.compile_on_cpu")
    assert paths["Habana FP8"].state == "emulated"
    assert paths["Inductor int8 (CPU)"].state == "real"
    assert f"via {report.isa.int8_dot_product}" in paths["Inductor int8 (CPU)"].detail
    text = "\n".join(report.lines())
    assert report.isa.describe() in text and "target device: cpu (detected" in text
    assert json.loads(json.dumps(report.as_dict()))["isa"]["amx_int8"] == report.isa.amx_int8


def test_report_with_devices_present(monkeypatch, no_override):
    present(monkeypatch, "hpu", "xpu")
    report = device.doctor()
    assert report.target_device == "hpu"
    devices = {d.name: d for d in report.devices}
    assert devices["hpu"].count == 8 and "GAUDI2" in devices["hpu"].detail
    assert devices["xpu"].available and devices["xpu"].count == 1
    paths = paths_by_name(report)
    assert (paths["XPU int8"].state, paths["XPU int8"].entry_point) == ("real", "pt2q.backends.xpu.compile")
    assert paths["Habana FP8"].state == "real"


def test_report_names_what_is_missing(monkeypatch, no_override):
    present(monkeypatch)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        paths = paths_by_name(device.doctor())
    assert paths["Inductor int8 (CPU)"].state == "unavailable"
    assert "needs a C++ compiler" in paths["Inductor int8 (CPU)"].detail
    assert paths["pt2q weight-only kernels"].state == "unavailable"
    assert "'no-such-c++-compiler' not on PATH; set CXX" in paths["pt2q weight-only kernels"].detail


def test_saturating_cpu_is_reported_on_the_int8_path(monkeypatch, no_override):
    present(monkeypatch)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # pt2q's view only; the kernels of this process are unchanged
    report = device.doctor()
    assert report.isa.int8_saturates
    assert "quantizes weights to 7 bits" in paths_by_name(report)["Inductor int8 (CPU)"].detail
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in "\n".join(report.lines())


def write_fake_ipex(root, version: str) -> None:
    package = root / "intel_extension_for_pytorch"
    package.mkdir()
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = root / f"intel_extension_for_pytorch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel_extension_for_pytorch\nVersion: {version}\n")


@pytest.mark.parametrize("matches_torch", [True, False])
def test_ipex_is_imported_only_when_its_version_fits_torch(monkeypatch, tmp_path, matches_torch):
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    version = f"{torch_minor}.0" if matches_torch else "2.8.0"
    write_fake_ipex(tmp_path, version)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch", raising=False)
    probe = device.probe_ipex()
    assert probe.version == version
    assert probe.available is matches_torch
    assert ("intel_extension_for_pytorch" in sys.modules) is matches_torch
    if not matches_torch:
        assert probe.detail == (f"intel_extension_for_pytorch 2.8.0 is installed but needs torch 2.8.*; this is "
                                f"torch {torch.__version__}, so it cannot be imported here")
    sys.modules.pop("intel_extension_for_pytorch", None)


def test_neither_habana_nor_ipex_is_imported_with_pt2q(tmp_path):
    """Both are importable in the child (stand-ins on PYTHONPATH); pt2q imports neither until asked."""
    bridge = tmp_path / "habana_frameworks" / "torch"
    bridge.mkdir(parents=True)
    (tmp_path / "habana_frameworks" / "__init__.py").write_text("")
    (bridge / "__init__.py").write_text("import types\nhpu = types.SimpleNamespace(is_available=lambda: True, "
                                        "device_count=lambda: 1, get_device_name=lambda i: 'GAUDI3')\n")
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    write_fake_ipex(tmp_path, f"{torch_minor}.0")
    script = textwrap.dedent("""
        import sys
        import pt2q, pt2q.device, pt2q.backends.xpu, pt2q.cli
        print(sorted(m for m in ("habana_frameworks.torch", "intel_extension_for_pytorch") if m in sys.modules))
        print(pt2q.device.target_device())
        report = pt2q.device.doctor()
        print(sorted(m for m in ("habana_frameworks.torch", "intel_extension_for_pytorch") if m in sys.modules))
        print([lib.available for lib in report.libraries])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]), "HF_HUB_OFFLINE": "1"}
    env.pop(device.TARGET_DEVICE_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[]", "hpu", "['habana_frameworks.torch', 'intel_extension_for_pytorch']", "[True, True, True]"]


# -- pt2q doctor ---------------------------------------------------------------------------------
def test_cli_doctor_prints_the_isa_and_the_device(monkeypatch, no_override, capsys):
    present(monkeypatch)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "target device: cpu (detected" in out
    assert f"CPU ISA: {pt2q.isa.detect().describe()}" in out
    assert "avx512_vnni" in out and "amx_int8" in out and "native bf16" in out
    assert "emulated    XPU int8" in out


def test_cli_doctor_json(monkeypatch, capsys):
    present(monkeypatch)
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, "xpu")
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["target_device"], data["target_source"]) == ("xpu", "PT2Q_TARGET_DEVICE")
    assert data["isa"]["int8_dot_product"] == pt2q.isa.detect().int8_dot_product
    assert [d["name"] for d in data["devices"]] == ["cpu", "cuda", "xpu", "hpu"]


def test_cli_doctor_fails_on_an_unknown_device_but_still_reports(monkeypatch, capsys):
    present(monkeypatch)
    monkeypatch.setenv(device.TARGET_DEVICE_ENV, "tpu")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "target device: none (PT2Q_TARGET_DEVICE='tpu' is not a device" in out
    assert "CPU ISA:" in out

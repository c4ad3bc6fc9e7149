"""Which device pt2q targets, and what this machine offers (the report behind `pt2q doctor`).

`target_device()` returns "hpu", "xpu", "cuda" or "cpu". The environment variable PT2Q_TARGET_DEVICE
decides when it is set (Intel Neural Compressor's equivalent is INC_TARGET_DEVICE, which pt2q does not
read); otherwise the first device present in the order hpu > xpu > cuda, else cpu. The override is checked
against the device names only, not against the hardware: quantizing for an XPU on a CPU-only machine is
legitimate, and compiling there is what raises `BackendUnavailable`. Nothing is cached, so a changed
environment variable or a device that appears later is seen on the next call.

Habana's stack (`habana_frameworks.torch`) and IPEX are imported only when a function here asks for
them, never when pt2q is imported: importing Habana's bridge initialises the device, and IPEX refuses any
torch but the one minor version it was built for. IPEX's installed version is read from its package
metadata first, and it is imported only when that version matches torch's.

`doctor()` gathers a `DoctorReport`: the devices, the libraries (oneDNN, IPEX, Habana), the CPU ISA as
`pt2q.isa.detect()` sees it, and which pt2q lowering paths run for real here, which run emulated on the
CPU and which are unavailable (with the reason).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field

import torch

from . import isa as isa_module
from .errors import DeviceError

TARGET_DEVICE_ENV = "PT2Q_TARGET_DEVICE"
# Intel Neural Compressor's name for the same setting; doctor mentions it when it is set.
PEER_TARGET_DEVICE_ENV = "INC_TARGET_DEVICE"
# Priority order of target_device(): the first one present wins; cpu is always present.
TARGET_DEVICES = ("hpu", "xpu", "cuda", "cpu")
HABANA_MODULE = "habana_frameworks.torch"
IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DISTRIBUTION = "intel_extension_for_pytorch"

# Path states in the doctor report.
REAL, EMULATED, UNAVAILABLE = "real", "emulated", "unavailable"


@dataclass(frozen=True)
class DeviceProbe:
    """One device kind: present or not, how many, and what was seen (names, or why it is absent)."""

    name: str
    available: bool
    count: int
    detail: str


@dataclass(frozen=True)
class LibraryProbe:
    """One optional library: whether it can be used in this process, its version, and why not."""

    name: str
    available: bool
    version: str | None
    detail: str


@dataclass(frozen=True)
class PathStatus:
    """One pt2q lowering path: `state` is "real" (runs on the hardware it targets), "emulated" (its
    graphs run on this CPU instead) or "unavailable"; `entry_point` is where it starts in pt2q."""

    name: str
    entry_point: str
    state: str
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    """What `pt2q doctor` prints: `lines()` for people, `as_dict()` for JSON."""

    target_device: str | None           # None when PT2Q_TARGET_DEVICE holds an unknown name
    target_source: str                  # "PT2Q_TARGET_DEVICE" or "detected"
    target_error: str | None            # the DeviceError message, when there is one
    devices: tuple[DeviceProbe, ...]
    libraries: tuple[LibraryProbe, ...]
    isa: isa_module.CpuIsa
    paths: tuple[PathStatus, ...]
    versions: dict[str, str | None]
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        if self.target_device is None:
            target = f"target device: none ({self.target_error})"
        elif self.target_source == TARGET_DEVICE_ENV:
            target = f"target device: {self.target_device} (from {TARGET_DEVICE_ENV})"
        else:
            target = f"target device: {self.target_device} (detected: hpu > xpu > cuda > cpu; " \
                     f"set {TARGET_DEVICE_ENV} to override)"
        lines = [target, "devices:"]
        lines += [f"  {d.name:<5} {'yes' if d.available else 'no ':<4}{d.detail}" for d in self.devices]
        lines.append("libraries:")
        lines += [f"  {lib.name:<7} {'yes' if lib.available else 'no ':<4}{lib.detail}" for lib in self.libraries]
        flags = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
        lines += [f"CPU ISA: {self.isa.describe()}",
                  "  " + ", ".join(f"{flag} {'yes' if getattr(self.isa, flag) else 'no'}" for flag in flags)
                  + f", native bf16 {'yes' if self.isa.native_bf16 else 'no'}",
                  "paths:"]
        width = max(len(p.name) for p in self.paths)
        lines += [f"  {p.state:<11} {p.name:<{width}}  {p.entry_point}: {p.detail}" for p in self.paths]
        lines.append("versions: " + ", ".join(f"{name} {version or 'unknown'}"
                                              for name, version in self.versions.items()))
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def as_dict(self) -> dict:
        data = asdict(self)
        data["isa"] = self.isa.as_dict()
        for key in ("devices", "libraries", "paths", "notes"):
            data[key] = list(data[key])
        return data


# -- the target device -----------------------------------------------------------------------------
def target_device() -> str:
    """The device pt2q quantizes and compiles for: PT2Q_TARGET_DEVICE when set (empty counts as
    unset), else hpu > xpu > cuda by availability, else cpu. Raises DeviceError for an unknown name."""
    override = _target_override()
    if override is not None:
        return override
    for probe in (probe_hpu, probe_xpu, probe_cuda):
        device = probe()
        if device.available:
            return device.name
    return "cpu"


def _target_override() -> str | None:
    raw = os.environ.get(TARGET_DEVICE_ENV)
    if raw is None or not raw.strip():
        return None
    name = raw.strip().lower()
    if name not in TARGET_DEVICES:
        raise DeviceError(
            f"{TARGET_DEVICE_ENV}={raw!r} is not a device pt2q targets; valid: {', '.join(TARGET_DEVICES)}. "
            f"Set it to one of them, or unset it to pick the device by availability (hpu > xpu > cuda > cpu)")
    return name


# -- devices --------------------------------------------------------------------------------------
def _import_habana():
    """(habana_frameworks.torch or None, why not). Importing it initialises Habana's bridge: only here."""
    try:
        return importlib.import_module(HABANA_MODULE), ""
    except ImportError as error:
        missing = getattr(error, "name", None)
        if missing and HABANA_MODULE.startswith(missing):
            return None, f"{HABANA_MODULE} is not installed (Intel Gaudi software stack)"
        return None, f"{HABANA_MODULE} does not import: {error}"
    except Exception as error:  # noqa: BLE001 - a broken driver install raises anything; report it
        return None, f"{HABANA_MODULE} does not import: {type(error).__name__}: {error}"


def probe_hpu() -> DeviceProbe:
    habana, reason = _import_habana()
    if habana is None:
        return DeviceProbe("hpu", False, 0, reason)
    hpu = getattr(habana, "hpu", None)
    try:
        available = bool(hpu is not None and hpu.is_available())
        count = int(hpu.device_count()) if available else 0
    except Exception as error:  # noqa: BLE001
        return DeviceProbe("hpu", False, 0, f"{HABANA_MODULE} imports but cannot query devices: {error}")
    if not available:
        return DeviceProbe("hpu", False, 0, f"{HABANA_MODULE} imports but reports no Gaudi device")
    return DeviceProbe("hpu", True, count, _device_names(hpu, count, "Gaudi"))


def probe_xpu() -> DeviceProbe:
    if not torch.xpu.is_available():
        if not torch.xpu._is_compiled():
            why = f"this torch build ({torch.__version__}) has no XPU support"
        else:
            why = "torch has XPU support but finds no Intel GPU (driver / Level Zero runtime)"
        return DeviceProbe("xpu", False, 0, why)
    count = torch.xpu.device_count()
    return DeviceProbe("xpu", True, count, _device_names(torch.xpu, count, "Intel GPU"))


def probe_cuda() -> DeviceProbe:
    if not torch.cuda.is_available():
        if not torch.backends.cuda.is_built():
            why = f"this torch build ({torch.__version__}) has no CUDA support"
        else:
            why = "torch has CUDA support but finds no GPU"
        return DeviceProbe("cuda", False, 0, why)
    count = torch.cuda.device_count()
    return DeviceProbe("cuda", True, count, _device_names(torch.cuda, count, "GPU"))


def probe_cpu() -> DeviceProbe:
    model = isa_module.cpu_model_name() or platform.processor() or "unknown CPU"
    return DeviceProbe("cpu", True, 1, f"{model} ({os.cpu_count()} logical cores, "
                                         f"{torch.get_num_threads()} torch threads)")


def _device_names(backend, count: int, fallback: str) -> str:
    names = []
    for index in range(count):
        try:
            names.append(str(backend.get_device_name(index)))
        except Exception:  # noqa: BLE001 - the name is cosmetic
            names.append(fallback)
    return f"{count} device(s): {', '.join(names)}"


# -- libraries ------------------------------------------------------------------------------------
def probe_onednn() -> LibraryProbe:
    available = torch.backends.mkldnn.is_available()
    version = isa_module.onednn_version()
    detail = f"v{version or '?'} in torch (torch.backends.mkldnn)" if available else \
        "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    return LibraryProbe("oneDNN", available, version, detail)


def _minor(version: str) -> str | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def probe_ipex() -> LibraryProbe:
    """IPEX as this process could use it. A release pairs with one torch minor version (it refuses to
    import under any other), so the installed version is compared with torch's before importing."""
    try:
        installed = importlib.metadata.version(IPEX_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return LibraryProbe("IPEX", False, None,
                            f"{IPEX_MODULE} is not installed; each IPEX release imports under one torch minor version "
                            f"only (IPEX 2.8 needs torch 2.8), so it runs in a venv of its own, not with this "
                            f"torch {torch.__version__}")
    if _minor(installed) != _minor(torch.__version__):
        return LibraryProbe("IPEX", False, installed,
                            f"{IPEX_MODULE} {installed} is installed but needs torch {_minor(installed)}.*; "
                            f"this is torch {torch.__version__}, so it cannot be imported here")
    try:
        module = importlib.import_module(IPEX_MODULE)
    except Exception as error:  # noqa: BLE001 - report whatever stops it
        return LibraryProbe("IPEX", False, installed, f"{IPEX_MODULE} {installed} does not import: "
                                                      f"{type(error).__name__}: {error}")
    version = str(getattr(module, "__version__", installed))
    return LibraryProbe("IPEX", True, version, f"{IPEX_MODULE} {version} imports")


def probe_habana() -> LibraryProbe:
    habana, reason = _import_habana()
    if habana is None:
        return LibraryProbe("Habana", False, None, reason)
    version = getattr(habana, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("habana_torch_plugin")
        except importlib.metadata.PackageNotFoundError:
            version = None
    detail = f"{HABANA_MODULE} imports" + (f" (version {version})" if version else "")
    return LibraryProbe("Habana", True, version, detail)


# -- pt2q's paths ---------------------------------------------------------------------------------
def inductor_cpp_compiler() -> tuple[str | None, str]:
    """(the C++ compiler Inductor's CPU code generation would use, or None; why not)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - Inductor raises its own InvalidCxxCompiler
        return None, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return compiler, ""


def extension_toolchain() -> tuple[str | None, str]:
    """(the C++ compiler torch.utils.cpp_extension builds pt2q's kernels with, or None; why not)."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    found = shutil.which(compiler)
    if found is None:
        return None, f"no C++ compiler ({compiler!r} not on PATH; set CXX)"
    if not is_ninja_available():
        return None, "ninja is not installed (pip install ninja)"
    return found, ""


def lowering_paths(devices: dict[str, DeviceProbe], libraries: dict[str, LibraryProbe],
                   isa: isa_module.CpuIsa) -> tuple[PathStatus, ...]:
    """Each pt2q lowering path's state here, from the probes (and the C++ toolchains, looked up now)."""
    paths = []
    compiler, why_no_compiler = inductor_cpp_compiler()
    onednn = libraries["oneDNN"]
    if not onednn.available:
        paths.append(PathStatus("Inductor int8 (CPU)", "pt2q.backends.inductor.compile", UNAVAILABLE, onednn.detail))
    elif compiler is None:
        paths.append(PathStatus("Inductor int8 (CPU)", "pt2q.backends.inductor.compile", UNAVAILABLE,
                                f"Inductor's CPU code generation needs a C++ compiler: {why_no_compiler}"))
    else:
        detail = f"oneDNN int8 kernels via {isa.int8_dot_product}, C++ compiler {compiler}"
        if isa.int8_saturates:
            detail += "; pair sums saturate in int16 here, saturation_guard='auto' quantizes weights to 7 bits"
        paths.append(PathStatus("Inductor int8 (CPU)", "pt2q.backends.inductor.compile", REAL, detail))

    kernels = "pt2q.backends.inductor.LowerWeightOnly"
    toolchain, why_no_toolchain = extension_toolchain()
    if isa.vector_isa not in ("avx2", "avx512"):
        paths.append(PathStatus("pt2q weight-only kernels", kernels, UNAVAILABLE,
                                f"they need AVX2 or AVX-512, ATen dispatches to {isa.capability}; "
                                "ATen's weight-only kernels run instead"))
    elif toolchain is None:
        paths.append(PathStatus("pt2q weight-only kernels", kernels, UNAVAILABLE,
                                f"{why_no_toolchain}; ATen's weight-only kernels run instead"))
    else:
        paths.append(PathStatus("pt2q weight-only kernels", kernels, REAL,
                                f"pt2q::int4/int8_linear_{isa.vector_isa}, built on first use with {toolchain} "
                                "(about 30 s, then cached)"))

    xpu = devices["xpu"]
    if xpu.available:
        paths.append(PathStatus("XPU int8", "pt2q.backends.xpu.compile", REAL,
                                f"Inductor on {xpu.detail} (pt2q's tests have no XPU: this path is not "
                                "exercised by them)"))
    else:
        paths.append(PathStatus("XPU int8", "pt2q.backends.xpu.compile_on_cpu", EMULATED,
                                f"no XPU device ({xpu.detail}): XPUQuantizer graphs (signed int8) run through "
                                "Inductor's CPU kernels, their activations re-encoded as uint8 (the same values) "
                                "for oneDNN's fast CPU int8 kernels; pt2q.backends.xpu.compile raises "
                                "BackendUnavailable"))

    hpu = devices["hpu"]
    if hpu.available:
        paths.append(PathStatus("Habana FP8", "pt2q.backends.habana.lower", REAL, f"Gaudi: {hpu.detail}"))
    else:
        paths.append(PathStatus("Habana FP8", "pt2q.backends.habana.lower", EMULATED,
                                f"the Gaudi FP8 ops run as pt2q's CPU reference ops, with the HPU signatures ({hpu.detail})"))

    ipex = libraries["IPEX"]
    paths.append(PathStatus("IPEX", "pt2q.backends.ipex.quantize", REAL if ipex.available else UNAVAILABLE,
                            ipex.detail))
    return tuple(paths)


def doctor() -> DoctorReport:
    """Probe this machine and process (imports Habana's stack, and IPEX when its version fits torch)."""
    import torchao

    try:
        target, error = target_device(), None
    except DeviceError as caught:
        target, error = None, str(caught)
    source = TARGET_DEVICE_ENV if os.environ.get(TARGET_DEVICE_ENV, "").strip() else "detected"
    devices = {probe.name: probe for probe in (probe_cpu(), probe_cuda(), probe_xpu(), probe_hpu())}
    libraries = {probe.name: probe for probe in (probe_onednn(), probe_ipex(), probe_habana())}
    isa = isa_module.detect()
    notes = []
    peer = os.environ.get(PEER_TARGET_DEVICE_ENV)
    if peer is not None:
        notes.append(f"{PEER_TARGET_DEVICE_ENV}={peer!r} is set; pt2q does not read it, it reads {TARGET_DEVICE_ENV}")
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torchao": torchao.__version__,
                "onednn": isa_module.onednn_version()}
    return DoctorReport(target_device=target, target_source=source, target_error=error,
                        devices=tuple(devices.values()), libraries=tuple(libraries.values()), isa=isa,
                        paths=lowering_paths(devices, libraries, isa), versions=versions, notes=tuple(notes))

"""What this CPU's int8 and bf16 kernels can do: the one place that decides, everything else asks it.

Features come from torch's own probes (`torch.cpu.get_capabilities()`, cpuinfo underneath) and are
capped by `ONEDNN_MAX_CPU_ISA` (or its old name `DNNL_MAX_CPU_ISA`) when set, because oneDNN, which runs
Inductor's int8 kernels, obeys that cap: a feature counts only if oneDNN may use it. oneDNN reads the
variable once, at its first use in the process, so set it before starting Python.

Why it matters: without a 4-byte dot-product instruction (VNNI or AMX), oneDNN's int8 GEMM/conv multiply
u8 x s8 pairs and add each pair in int16 with saturation (`vpmaddubsw`). Full-range uint8 activations
times full-range int8 weights reach 2 * 255 * 128 = 65280 > 32767: silently wrong results. The pair sum
stays below 2^15 when either side loses one bit; `resolve_saturation_guard` picks which.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError

# oneDNN's `dnnl_cpu_isa_t` bit masks: an ISA is usable under a cap when its bits are a subset of the
# cap's. (AVX2_VNNI is not a subset of AVX512_CORE: a cap at AVX512_CORE removes AVX-VNNI too.)
ONEDNN_ISA_MASKS = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
    "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF,
    "AVX10_1_512_AMX_FP16": 0x1FEF, "AVX512_CORE_AMX_FP16": 0x1FEF,
}
_NO_CAP = ("", "ALL", "DEFAULT")

# feature -> (torch.cpu.get_capabilities() key, the oneDNN ISA that uses it)
_FEATURES = {
    "avx2": ("avx2", "AVX2"),
    "avx512": ("avx512_f", "AVX512_CORE"),
    "avx512_vnni": ("avx512_vnni", "AVX512_CORE_VNNI"),
    "avx_vnni": ("avx_vnni", "AVX2_VNNI"),
    "avx512_bf16": ("avx512_bf16", "AVX512_CORE_BF16"),
    "amx_tile": ("amx_tile", "AVX512_CORE_AMX"),
    "amx_int8": ("amx_int8", "AVX512_CORE_AMX"),
    "amx_bf16": ("amx_bf16", "AVX512_CORE_AMX"),
}

INT16_MAX = 2 ** 15 - 1
# guard -> (activation span, weight magnitude) as oneDNN multiplies them: activations on span + 1 levels,
# weights in [-magnitude, magnitude - 1]. Every guard but "off" keeps 2 * span * magnitude <= 32767.
GUARD_BOUNDS = {
    "off": (255, 128),
    "weights7": (255, 64),       # 2 * 255 * 64 = 32640
    "activations7": (127, 128),  # 2 * 127 * 128 = 32512 (torchao's reduce_range)
}
SATURATION_GUARDS = ("auto", "weights7", "activations7", "off")
RESOLVED_GUARDS = tuple(GUARD_BOUNDS)


@dataclass(frozen=True)
class CpuIsa:
    """The CPU features oneDNN may use here (hardware, capped by ONEDNN_MAX_CPU_ISA)."""

    capability: str            # torch's ATen vector ISA (honours ATEN_CPU_CAPABILITY): "AVX512", "AVX2", ...
    avx2: bool
    avx512: bool
    avx512_vnni: bool
    avx_vnni: bool
    avx512_bf16: bool
    amx_tile: bool
    amx_int8: bool
    amx_bf16: bool
    onednn_cap: str | None     # ONEDNN_MAX_CPU_ISA as oneDNN reads it, None when unset
    capped: tuple[str, ...]    # features the hardware has but the cap removes

    @property
    def int8_dot_product(self) -> str:
        """The instruction oneDNN's int8 kernels accumulate with: "amx", "avx512_vnni", "avx_vnni", or
        "vpmaddubsw" (pairs summed in int16 with saturation)."""
        if self.amx_int8:
            return "amx"
        if self.avx512_vnni:
            return "avx512_vnni"
        if self.avx_vnni:
            return "avx_vnni"
        return "vpmaddubsw"

    @property
    def int8_saturates(self) -> bool:
        """True when an int8 GEMM adds u8 x s8 pairs in saturating int16 (no VNNI, no AMX)."""
        return self.int8_dot_product == "vpmaddubsw"

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    @property
    def vector_isa(self) -> str:
        """The x86 vector ISA ATen dispatches its kernels to here ("avx512", "avx2", or "default" for
        anything else): what pt2q's own weight-only kernels are chosen by. It follows `capability`, so
        ATEN_CPU_CAPABILITY=avx2 selects the AVX2 kernels on an AVX-512 machine too. (ATen's AVX2 level
        implies FMA3, its AVX512 level AVX512F/BW/DQ/VL.)"""
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(self.capability, "default")

    def describe(self) -> str:
        """One line for logs, the demo and benchmark reports."""
        features = [name for name in _FEATURES if getattr(self, name)]
        line = f"CPU capability {self.capability}; oneDNN int8 via {self.int8_dot_product}"
        line += " (saturating int16 pair sums: 7-bit guard on)" if self.int8_saturates else ""
        line += f"; features: {', '.join(features) or 'none'}"
        if self.onednn_cap is not None:
            line += f"; ONEDNN_MAX_CPU_ISA={self.onednn_cap}"
            line += f" (removes {', '.join(self.capped)})" if self.capped else ""
        return line

    def as_dict(self) -> dict:
        data = asdict(self)
        data["capped"] = list(self.capped)
        data.update(int8_dot_product=self.int8_dot_product, int8_saturates=self.int8_saturates,
                    native_bf16=self.native_bf16, vector_isa=self.vector_isa)
        return data


def _onednn_cap() -> str | None:
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(variable)
        if value is not None:
            return value.strip().upper()
    return None


@functools.lru_cache(maxsize=None)
def _detect(cap: str | None, capability: str) -> CpuIsa:
    hardware = torch.cpu.get_capabilities()
    cap_mask = None
    if cap is not None and cap not in _NO_CAP:
        cap_mask = ONEDNN_ISA_MASKS.get(cap)
        if cap_mask is None:
            warnings.warn(f"ONEDNN_MAX_CPU_ISA={cap!r} is not an ISA name pt2q knows "
                          f"({', '.join(ONEDNN_ISA_MASKS)}); assuming no cap", stacklevel=3)
    present, capped = {}, []
    for name, (torch_key, onednn_isa) in _FEATURES.items():
        has = bool(hardware.get(torch_key, False))
        allowed = cap_mask is None or (ONEDNN_ISA_MASKS[onednn_isa] & cap_mask) == ONEDNN_ISA_MASKS[onednn_isa]
        present[name] = has and allowed
        if has and not allowed:
            capped.append(name)
    return CpuIsa(capability=capability, onednn_cap=cap, capped=tuple(capped), **present)


def detect() -> CpuIsa:
    """This machine's effective ISA. Cheap: cached per value of the environment variables."""
    return _detect(_onednn_cap(), torch.backends.cpu.get_cpu_capability())


def pair_sum_saturates(activation_span: int, weight_magnitude: int) -> bool:
    """Whether two u8 x s8 products can leave int16: `activation_span` is the number of activation
    levels minus one as oneDNN sees them (signed activations are shifted to unsigned), the weight
    magnitude the largest |int8 weight|."""
    return 2 * activation_span * weight_magnitude > INT16_MAX


def resolve_saturation_guard(policy: str, *, targets_this_cpu: bool, where: str = "saturation_guard") -> str:
    """The guard of GUARD_BOUNDS to apply for `policy`. "auto" is "weights7" where this CPU's int8
    kernels saturate, and "off" elsewhere or for a target that is not this CPU (XPU).

    Why 7-bit weights: they cost least on real models (all-MiniLM-L6-v2, eager Q/DQ mean cosine vs fp32:
    full range 0.99323, 7-bit weights 0.99244, 7-bit activations 0.98045; its activation outliers make
    activation bits the costly ones), and they are the only guard Inductor cannot undo: its fused output
    quantize (`qlinear`/`qconv` with an int8 output) clamps to the dtype's range and ignores quant_max,
    so a narrowed activation range holds in the eager graph only (torch 2.13; see
    pt2q/backends/inductor/saturation.py).
    """
    if policy not in SATURATION_GUARDS:
        raise ConfigError(f"{where}={policy!r} is not a saturation guard; valid: {', '.join(SATURATION_GUARDS)}")
    if policy != "auto":
        return policy
    return "weights7" if targets_this_cpu and detect().int8_saturates else "off"


def onednn_version() -> str | None:
    match = re.search(r"(?:oneDNN|MKL-DNN) v([\w.]+)", torch.__config__.show())
    return match.group(1) if match else None


def cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_info() -> dict:
    """What every benchmark records beside its figures, so runs on different CPUs are never compared
    blind: the effective ISA, core and thread counts, and the library versions."""
    import torchao

    return {"isa": detect().as_dict(), "isa_line": detect().describe(), "cpu": cpu_model_name(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "torchao": torchao.__version__, "onednn": onednn_version()}}

"""pt2q.isa: one place decides what this CPU's int8 / bf16 kernels do, capped like oneDNN is."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import isa

SAPPHIRE_RAPIDS = {"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True,
                   "amx_tile": True, "amx_int8": True, "amx_bf16": True}
ALDER_LAKE = {"avx2": True, "avx_vnni": True}  # AVX-VNNI without AVX-512
EPYC_ROME = {"avx2": True}  # AVX2 only: the saturating kind


@pytest.fixture
def cpu(monkeypatch):
    """`cpu(features, cap=None)`: pretend torch's probes report `features`, with ONEDNN_MAX_CPU_ISA=cap."""
    def pretend(features: dict, cap: str | None = None) -> isa.CpuIsa:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(features))
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        isa._detect.cache_clear()
        return isa.detect()

    yield pretend
    isa._detect.cache_clear()


def test_this_machine_matches_torchs_probes(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    here = isa.detect()
    assert here.avx512_vnni == torch.cpu._is_vnni_supported()
    assert here.avx512 == torch.cpu._is_avx512_supported()
    assert here.avx2 == torch.cpu._is_avx2_supported()
    assert here.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert here.amx_tile == torch.cpu._is_amx_tile_supported()
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    assert here.onednn_cap is None and here.capped == ()
    # torchao's own rule (7-bit activations where there is no VNNI) agrees on whether int8 saturates
    from torchao.utils import should_reduce_range
    if not here.avx_vnni and not here.amx_int8:
        assert here.int8_saturates == should_reduce_range(torch.device("cpu"))


@pytest.mark.parametrize("features, dot_product, saturates, bf16", [
    (SAPPHIRE_RAPIDS, "amx", False, True),
    (ALDER_LAKE, "avx_vnni", False, False),
    (EPYC_ROME, "vpmaddubsw", True, False),
    ({"avx2": True, "avx512_f": True, "avx512_vnni": True}, "avx512_vnni", False, False),  # Cascade Lake
])
def test_int8_dot_product_by_cpu(cpu, features, dot_product, saturates, bf16):
    detected = cpu(features)
    assert detected.int8_dot_product == dot_product
    assert detected.int8_saturates is saturates
    assert detected.native_bf16 is bf16


@pytest.mark.parametrize("cap, dot_product, capped", [
    ("AVX2", "vpmaddubsw", ("avx512", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
    ("avx512_core", "vpmaddubsw", ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
    ("AVX512_CORE_VNNI", "avx512_vnni", ("avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
    ("AVX512_CORE_BF16", "avx512_vnni", ("amx_tile", "amx_int8", "amx_bf16")),
    ("AVX512_CORE_AMX", "amx", ()),
    ("ALL", "amx", ()),
])
def test_onednn_cap_removes_what_onednn_may_not_use(cpu, cap, dot_product, capped):
    detected = cpu(SAPPHIRE_RAPIDS, cap)
    assert detected.int8_dot_product == dot_product
    assert detected.capped == capped
    assert detected.onednn_cap == cap.upper()


def test_avx512_cap_also_removes_avx_vnni(cpu):
    """oneDNN's AVX2_VNNI mask is not a subset of AVX512_CORE's: capping at AVX512_CORE drops AVX-VNNI."""
    detected = cpu({"avx2": True, "avx_vnni": True, "avx512_f": True}, "AVX512_CORE")
    assert not detected.avx_vnni and detected.int8_saturates
    assert cpu(ALDER_LAKE, "AVX2_VNNI").int8_dot_product == "avx_vnni"


def test_legacy_variable_name_is_honoured(cpu, monkeypatch):
    cpu(SAPPHIRE_RAPIDS)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert isa.detect().int8_saturates


def test_unknown_cap_warns_and_is_ignored(cpu):
    with pytest.warns(UserWarning, match="ONEDNN_MAX_CPU_ISA='AVX9000' is not an ISA name"):
        detected = cpu(SAPPHIRE_RAPIDS, "avx9000")
    assert detected.int8_dot_product == "amx" and detected.capped == ()


def test_describe_names_the_dot_product_and_the_cap(cpu):
    line = cpu(SAPPHIRE_RAPIDS, "AVX2").describe()
    assert "oneDNN int8 via vpmaddubsw" in line and "7-bit guard on" in line
    assert "ONEDNN_MAX_CPU_ISA=AVX2 (removes avx512, avx512_vnni" in line
    assert cpu(EPYC_ROME).as_dict()["int8_saturates"] is True


@pytest.mark.parametrize("span, magnitude, saturates", [
    (255, 128, True),    # full-range uint8 x full-range int8: 65280
    (255, 127, True),
    (255, 64, False),    # 7-bit weights: 32640
    (127, 128, False),   # 7-bit activations: 32512
    (128, 128, True),    # 32768: one past int16
])
def test_pair_sum_bound(span, magnitude, saturates):
    assert isa.pair_sum_saturates(span, magnitude) is saturates


def test_every_guard_but_off_keeps_pair_sums_in_int16():
    for guard, (span, magnitude) in isa.GUARD_BOUNDS.items():
        assert isa.pair_sum_saturates(span, magnitude) is (guard == "off"), guard


@pytest.mark.parametrize("features, targets_this_cpu, expected", [
    (EPYC_ROME, True, "weights7"),
    (SAPPHIRE_RAPIDS, True, "off"),
    (ALDER_LAKE, True, "off"),
    (EPYC_ROME, False, "off"),  # XPU graphs run on the GPU's int32-accumulating dot products
])
def test_auto_guard(cpu, features, targets_this_cpu, expected):
    cpu(features)
    assert isa.resolve_saturation_guard("auto", targets_this_cpu=targets_this_cpu) == expected
    for explicit in ("weights7", "activations7", "off"):
        assert isa.resolve_saturation_guard(explicit, targets_this_cpu=targets_this_cpu) == explicit


def test_invalid_guard_lists_the_choices():
    with pytest.raises(pt2q.ConfigError, match=r"'weights8' is not a saturation guard; valid: auto, weights7, "
                                                r"activations7, off"):
        isa.resolve_saturation_guard("weights8", targets_this_cpu=True)


def test_machine_info_records_isa_cores_and_versions():
    info = isa.machine_info()
    assert info["isa"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cores"] >= 1 and info["threads"] == torch.get_num_threads()
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["onednn"] and info["versions"]["onednn"][0].isdigit()
    assert info["isa_line"] == isa.detect().describe()

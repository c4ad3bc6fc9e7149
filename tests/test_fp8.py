"""pt2q.fp8: formats, device full scales, scale methods and the one FP8 cast."""
from __future__ import annotations

import pytest
import torch

from pt2q import fp8
from pt2q.errors import ConfigError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def test_full_scales():
    assert fp8.full_scale(E4M3, "gaudi2") == 240.0
    assert fp8.full_scale(E4M3, "gaudi3") == 448.0
    assert fp8.full_scale(E5M2, "gaudi2") == fp8.full_scale(E5M2, "gaudi3") == 57344.0
    assert fp8.full_scale(E4M3, "generic") == 448.0
    with pytest.raises(ConfigError, match="'gaudi2', 'gaudi3', 'generic'"):
        fp8.full_scale(E4M3, "gaudi1")


def test_dtype_names_and_errors():
    assert fp8.fp8_dtype("E4M3") is E4M3 and fp8.fp8_dtype(E5M2) is E5M2
    with pytest.raises(ConfigError, match="'e4m3'.*'e5m2'"):
        fp8.fp8_dtype(torch.int8)


def test_gaudi2_hardware_scales_are_its_four_exponent_biases():
    assert fp8.hardware_scales(E4M3, "gaudi2").tolist() == [1 / 256, 1 / 16, 1.0, 16.0]
    assert fp8.hardware_scales(E5M2, "gaudi2").tolist() == [1.0]
    gaudi3 = fp8.hardware_scales(E4M3, "gaudi3")
    assert gaudi3.numel() == 63 and gaudi3.max() == 2.0 ** 7 and gaudi3.min() == 2.0 ** -55
    with pytest.raises(ConfigError, match="maxabs_pow2"):
        fp8.hardware_scales(E4M3, "generic")


@pytest.mark.parametrize("amax, expected", [(0.2, 1 / 256), (0.5, 1 / 16), (3.75, 1 / 16), (15.0, 1.0),
                                            (60.0, 1.0), (61.0, 16.0), (1e6, 16.0)])
def test_maxabs_hw_rounds_up_to_the_next_aligned_scale(amax, expected):
    # Gaudi2 E4M3, activation backoff 0.25: the maxabs scale is amax / 60
    scale = fp8.compute_scale(torch.tensor(amax), "maxabs_hw", E4M3, "gaudi2", 0.25)
    assert scale.item() == expected


def test_scale_methods():
    amax = torch.tensor([3.0, 0.0, 100.0])
    maxabs = fp8.compute_scale(amax, "maxabs", E4M3, "gaudi3", 0.5)
    torch.testing.assert_close(maxabs, torch.tensor([3.0, fp8.AMAX_FLOOR, 100.0]) / 224.0, rtol=0, atol=0)
    pow2 = fp8.compute_scale(amax, "maxabs_pow2", E4M3, "gaudi3", 0.5)
    assert torch.equal(pow2, torch.exp2(torch.ceil(torch.log2(maxabs))))
    assert (pow2 >= maxabs).all() and (pow2 < 2 * maxabs).all()
    assert torch.equal(fp8.compute_scale(amax, "unit", E4M3, "gaudi2", 0.5), torch.ones(3))
    with pytest.raises(ConfigError, match="'unit', 'maxabs', 'maxabs_pow2', 'maxabs_hw'"):
        fp8.compute_scale(amax, "percentile", E4M3, "gaudi2", 0.5)


@pytest.mark.parametrize("dtype, device", [(E4M3, "gaudi2"), (E4M3, "gaudi3"), (E5M2, "gaudi2")])
def test_quantize_saturates_at_the_device_full_scale(dtype, device):
    limit = fp8.full_scale(dtype, device)
    x = torch.tensor([limit * 4, -limit * 4, limit, limit * 1.01, float(torch.finfo(dtype).max)])
    q = fp8.quantize(x, torch.tensor(1.0), dtype, limit)
    assert q.dtype is dtype
    assert q.float().tolist() == [limit, -limit, limit, limit, limit]


def test_quantize_then_dequantize_errs_by_at_most_half_an_ulp():
    torch.manual_seed(0)
    x = torch.randn(4096) * 10
    scale = torch.tensor(0.25)
    assert (x.abs() / scale).max() < 240
    back = fp8.dequantize(fp8.quantize(x, scale, E4M3, 240.0), scale)
    # E4M3 has 3 mantissa bits: round to nearest errs by <= 2**-4 of a normal value
    normal = x.abs() / scale >= 2 ** -6
    assert ((back - x).abs()[normal] <= x.abs()[normal] * 2 ** -4 + 1e-7).all()


def test_dynamic_scale_maps_the_call_maximum_to_the_full_scale():
    x = torch.tensor([[-3.0, 1.5], [0.25, 2.0]])
    assert fp8.dynamic_scale(x, 240.0).item() == pytest.approx(3.0 / 240.0)
    assert fp8.dynamic_scale(torch.zeros(3), 240.0).item() > 0


def test_backoff_check():
    assert fp8.check_backoff(0.5, "x") == 0.5
    for bad in (0.0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="a fraction in"):
            fp8.check_backoff(bad, "FP8Config.weight_backoff")

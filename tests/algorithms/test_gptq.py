"""GPTQ (pt2q.algorithms.gptq): lower output error than RTN on correlated inputs, codes that the graph op
dequantizes to exactly the values GPTQ propagated, agreement with an unblocked float64 reference, and the
edge cases (dead inputs, a short last group, a Hessian that needs more damping)."""
from __future__ import annotations

import logging

import pytest
import torch

from pt2q.algorithms.gptq import HessianRecorder, _gptq, gptq_quantize, hessian_update, symmetric_hessian
from pt2q.algorithms.rtn import WeightFormat, _split, dequantize_values, group_parameters, quantize_values, rtn_quantize
from pt2q.errors import CalibrationError
from pt2q.ops import dequantize_weight


def correlated_inputs(rows: int = 512, features: int = 128, seed: int = 0) -> torch.Tensor:
    """X = Z @ A: Gaussian Z mixed by a random Gaussian A, every 9th input channel 8x larger (outliers)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, features, generator=gen)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5
    x = z @ mix
    x[:, ::9] *= 8
    return x


def random_weight(out: int, features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed)) * 0.05


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return ((x @ weight.t() - x @ quantized.t()).norm() / (x @ weight.t()).norm()).item()


def reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, percdamp: float = 0.01,
                   static_groups: bool = False) -> torch.Tensor:
    """Unblocked GPTQ in float64 (OBQ form: explicit inverse, Schur-complement downdate after each column);
    whole groups only, no dead columns. Returns (codes, quantized weight)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    width = cols if fmt.group_size == -1 else fmt.group_size
    if static_groups:
        fixed = group_parameters(_split(w.float(), fmt, cols), fmt, 1.0)
    q = torch.zeros_like(w)
    codes = torch.zeros(w.shape, dtype=torch.int64)
    for i in range(cols):
        if i % width == 0:
            if static_groups:
                s = fixed[0][:, i // width]
                z = None if fixed[1] is None else fixed[1][:, i // width]
            else:
                s, z = group_parameters(w[:, i:i + width].float(), fmt, 1.0)
        codes[:, i] = code = quantize_values(w[:, i].float(), s, z, fmt)
        q[:, i] = dequantize_values(code, s, z, fmt).double()
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes, q.float()


RATIO_CASES = {
    "w4g32-sym": (WeightFormat(4, 32, sym=True), {}),
    "w4g32-asym": (WeightFormat(4, 32, sym=False), {}),
    "w3g32-asym": (WeightFormat(3, 32, sym=False), {}),
    "w8-per-channel": (WeightFormat(8, -1, sym=True), {}),
    "w4g32-sym-static": (WeightFormat(4, 32, sym=True), {"static_groups": True}),
    "w4g32-sym-act-order": (WeightFormat(4, 32, sym=True), {"act_order": True}),
    "w3g32-asym-act-order": (WeightFormat(3, 32, sym=False), {"act_order": True}),
    "w4g32-nf4": (WeightFormat(4, 32, dtype="nf4"), {}),
}


@pytest.mark.parametrize("case", list(RATIO_CASES))
def test_gptq_output_error_below_rtn(case):
    fmt, options = RATIO_CASES[case]
    x = correlated_inputs()
    weight = random_weight(64, x.shape[1])
    gptq = gptq_quantize(weight, hessian_of(x), fmt, block_size=32, **options).dequantize()
    rtn = rtn_quantize(weight, fmt).dequantize()
    ratio = output_error(x, weight, gptq) / output_error(x, weight, rtn)
    print(f"{case}: GPTQ/RTN output error {ratio:.3f}")
    assert ratio < 0.85, f"{case}: GPTQ output error is {ratio:.3f} of RTN's"


FORMATS = [
    WeightFormat(4, 32, sym=True),
    WeightFormat(4, 32, sym=False),
    WeightFormat(2, 16, sym=False),
    WeightFormat(3, 32, sym=True),
    WeightFormat(8, -1, sym=True),
    WeightFormat(5, -1, sym=False),
    WeightFormat(4, 32, sym=True, full_range=True),
    WeightFormat(4, 32, dtype="nf4"),
    WeightFormat(4, 16, dtype="fp4"),
    WeightFormat(4, 2, sym=False),                      # 35 groups of 2, then 2 columns of packing padding
    WeightFormat(4, 5, dtype="nf4"),                    # 14 groups of 5, then 2 columns of packing padding
]


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.dtype}{f.bits}g{f.group_size}{'s' if f.sym else 'a'}"
                         f"{'-full' if f.full_range else ''}")
def test_codes_dequantize_exactly_to_the_values_gptq_used(fmt, act_order):
    x = correlated_inputs(rows=256, features=70)        # 70 columns: a short last group, packing padding
    weight = random_weight(24, 70)
    result, used = _gptq(weight, hessian_of(x), fmt, block_size=20, percdamp=0.01, act_order=act_order,
                         static_groups=False)
    rows, padded = result.codes.shape
    assert result.codes.dtype == torch.uint8 and rows == 24 and padded % 8 == 0
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) < 2 ** fmt.bits
    assert result.scale.dtype == torch.float32
    assert result.zero_point is None if (fmt.sym or fmt.dtype != "int") else result.zero_point.dtype == torch.uint8
    rtn = rtn_quantize(weight, fmt)
    assert result.codes.shape == rtn.codes.shape and result.scale.shape == rtn.scale.shape
    dequantized = result.dequantize()
    graph = dequantize_weight(result.packed(), result.scale, result.zero_point, fmt.code_table, fmt.bits,
                              fmt.group_size, list(weight.shape), fmt.group_dim)
    assert dequantized.shape == weight.shape
    assert torch.equal(dequantized, graph)
    assert torch.equal(dequantized, used)
    assert torch.isfinite(dequantized).all()
    grouped_cols = result.scale.shape[1] * (padded if fmt.group_size == -1 else fmt.group_size)
    if grouped_cols < padded:  # packing padding: the code of 0, as rtn_quantize stores it
        fill = rtn.codes[:, grouped_cols:] if result.zero_point is None else \
            result.zero_point[:, -1:].to(torch.int64).expand(rows, padded - grouped_cols)
        assert torch.equal(result.codes[:, grouped_cols:], fill)


@pytest.mark.parametrize("block_size", [128, 20, 7])
@pytest.mark.parametrize("static_groups", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, sym=False), WeightFormat(3, -1, sym=True)],
                         ids=["w4g32a", "w3-per-row"])
def test_blocked_gptq_matches_unblocked_float64_reference(fmt, static_groups, block_size):
    # block 20 / 7 with groups of 32: groups cross block boundaries, so dynamic group parameters must see
    # the pending in-block updates of the columns beyond the block.
    x = correlated_inputs(rows=384, features=96)
    weight = random_weight(32, 96)
    h = hessian_of(x)
    expected_codes, expected = reference_gptq(weight, h, fmt, static_groups=static_groups)
    result = gptq_quantize(weight, h, fmt, block_size=block_size, static_groups=static_groups)
    actual = result.dequantize()
    # float32 vs float64 may round a few values near a half step the other way (and, with dynamic groups,
    # move the scales by an ulp), so compare codes, and the output error.
    agreement = (result.codes[:, :96] == expected_codes).float().mean().item()
    assert agreement > 0.99
    assert abs(output_error(x, weight, actual) / output_error(x, weight, expected) - 1) < 0.005


@pytest.mark.parametrize("static_groups", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, sym=True), WeightFormat(8, -1, sym=True),
                                 WeightFormat(3, 16, sym=True)], ids=["w4g32", "w8", "w3g16"])
def test_identity_hessian_gives_rtn_codes(fmt, static_groups):
    # Uncorrelated inputs of equal scale: Hinv is diagonal, no error reaches another column, and (nothing
    # having moved) the dynamic group parameters are RTN's too.
    weight = random_weight(16, 64)
    result = gptq_quantize(weight, 3.0 * torch.eye(64), fmt, block_size=64, static_groups=static_groups)
    rtn = rtn_quantize(weight, fmt)
    assert torch.equal(result.codes, rtn.codes)
    assert torch.equal(result.scale, rtn.scale)


def test_correlated_hessian_changes_codes():
    # The counterpart of the identity test: the test above would pass for plain RTN, this one would not.
    x = correlated_inputs()
    weight = random_weight(16, 128)
    fmt = WeightFormat(4, 32)
    assert not torch.equal(gptq_quantize(weight, hessian_of(x), fmt).codes, rtn_quantize(weight, fmt).codes)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_dead_input_columns(act_order):
    x = correlated_inputs(rows=256, features=64)
    x[:, [5, 40]] = 0
    weight = random_weight(16, 64)
    fmt = WeightFormat(4, 32, sym=False)
    result, used = _gptq(weight, hessian_of(x), fmt, 128, 0.01, act_order, False)
    dequantized = result.dequantize()
    assert torch.isfinite(dequantized).all() and torch.isfinite(result.scale).all()
    assert torch.equal(dequantized[:, [5, 40]], torch.zeros(16, 2))
    assert torch.equal(dequantized, used)
    rtn = rtn_quantize(weight, fmt).dequantize()
    assert output_error(x, weight, dequantized) < output_error(x, weight, rtn)


def test_all_inputs_dead():
    weight = random_weight(8, 32)
    result = gptq_quantize(weight, torch.zeros(32, 32), WeightFormat(4, 16))
    assert torch.equal(result.dequantize(), torch.zeros(8, 32))


@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, sym=True), WeightFormat(4, 32, sym=False),
                                 WeightFormat(4, -1, sym=False)], ids=["w4g32s", "w4g32a", "w4a-per-row"])
def test_remainder_group(fmt):
    x = correlated_inputs(rows=256, features=70)
    weight = random_weight(16, 70)
    result = gptq_quantize(weight, hessian_of(x), fmt, block_size=32)
    assert result.codes.shape == (16, 96 if fmt.group_size == 32 else 72)
    assert result.scale.shape == (16, 3 if fmt.group_size == 32 else 1)
    dequantized = result.dequantize()
    assert dequantized.shape == (16, 70) and torch.isfinite(dequantized).all()
    # The 26 padding columns of the last group quantize to the code of 0.
    if fmt.group_size == 32:
        zero = 8 if fmt.sym else result.zero_point[:, -1:].to(torch.int64)
        assert torch.equal(result.codes[:, 70:], torch.zeros(16, 26, dtype=torch.int64) + zero)
    rtn = rtn_quantize(weight, fmt).dequantize()
    assert output_error(x, weight, dequantized) < output_error(x, weight, rtn)


def test_hessian_update_equals_hessian_of_concatenation():
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(2, 5, 12, generator=gen) * 3 + 1
    second = torch.randn(7, 12, generator=gen)
    h, n = hessian_update(None, 0, first)
    h, n = hessian_update(h, n, second)
    h, n = hessian_update(h, n, torch.empty(0, 12))
    both = torch.cat([first.reshape(-1, 12), second])
    assert n == 17 and h.dtype == torch.float32 and h.shape == (12, 12)
    torch.testing.assert_close(h, hessian_of(both), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="12"):
        hessian_update(h, n, torch.randn(3, 10))


@pytest.mark.parametrize("features", [100, 300])     # one band; three bands, the last one short
def test_lower_bands_hessian_equals_the_full_product(features):
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 40, features, generator=gen) * 2 + 0.5, torch.randn(70, features, generator=gen)]
    full, lower, n, m = None, None, 0, 0
    for x in batches:
        full, n = hessian_update(full, n, x)
        lower, m = hessian_update(lower, m, x, lower=True)
    assert m == n == 190
    symmetric_hessian(lower)
    assert torch.equal(lower, lower.t())
    # Each lower entry is the full product's dot product; BLAS may round the two triangles differently.
    torch.testing.assert_close(torch.tril(lower), torch.tril(full), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lower, hessian_of(torch.cat([b.reshape(-1, features) for b in batches])),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, sym=True), WeightFormat(3, 32, sym=False),
                                 WeightFormat(4, 32, dtype="nf4")], ids=["w4s", "w3a", "nf4"])
def test_mse_clip_search_does_not_depend_on_how_many_ratios_go_at_once(fmt, monkeypatch):
    from pt2q.algorithms import rtn

    gen = torch.Generator().manual_seed(5)
    groups = torch.randn(48, 6, 32, generator=gen) * torch.rand(48, 6, 32, generator=gen).pow(3)
    groups[0] = 0                                        # all-zero groups: scale 1
    together = rtn.mse_group_parameters(groups, fmt, 0.95)
    monkeypatch.setattr(rtn, "_MSE_CHUNK_ELEMENTS", 1)   # one ratio at a time
    alone = rtn.mse_group_parameters(groups, fmt, 0.95)
    monkeypatch.setattr(rtn, "_MSE_CHUNK_ELEMENTS", groups.numel() * 7)   # 7 at a time: 6 chunks, one short
    sevens = rtn.mse_group_parameters(groups, fmt, 0.95)
    for other in (alone, sevens):
        assert torch.equal(together[0], other[0])
        assert (together[1] is None) == (other[1] is None)
        assert together[1] is None or torch.equal(together[1], other[1])
    # The choice is the least squared error over every ratio tried.
    errors = []
    for ratio in rtn.MSE_CLIP_RATIOS:
        scale, zero = group_parameters(groups, fmt, 0.95 * ratio)
        z = None if zero is None else zero.unsqueeze(-1)
        codes = quantize_values(groups, scale.unsqueeze(-1), z, fmt)
        errors.append((dequantize_values(codes, scale.unsqueeze(-1), z, fmt) - groups).pow(2).sum(-1))
    scale, zero = together
    z = None if zero is None else zero.unsqueeze(-1)
    chosen = (dequantize_values(quantize_values(groups, scale.unsqueeze(-1), z, fmt), scale.unsqueeze(-1), z, fmt)
              - groups).pow(2).sum(-1)
    assert torch.equal(chosen, torch.stack(errors).amin(0))


def test_group_dim_0_is_rejected():
    with pytest.raises(ValueError, match="group_dim"):
        gptq_quantize(random_weight(8, 16), torch.eye(16), WeightFormat(4, 8, group_dim=0))


def test_hessian_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        gptq_quantize(random_weight(8, 16), torch.eye(12), WeightFormat(4, 8))


def _indefinite(size: int, negative: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(4)))
    eigen = torch.ones(size)
    eigen[-1] = negative
    return q @ torch.diag(eigen) @ q.t()


def test_damping_is_raised_until_cholesky_succeeds(caplog):
    h = _indefinite(16, -1e-3)                    # mean diag ~0.94: damping 1e-4 and 1e-3 fail, 1e-2 works
    with caplog.at_level(logging.WARNING, logger="pt2q.algorithms.gptq"):
        result = gptq_quantize(random_weight(8, 16), h, WeightFormat(4, 8), percdamp=1e-4)
    assert torch.isfinite(result.dequantize()).all()
    retries = [r for r in caplog.records if "not positive definite" in r.getMessage()]
    assert len(retries) == 2


def test_hopeless_hessian_raises():
    with pytest.raises(CalibrationError, match="not positive definite"):
        gptq_quantize(random_weight(8, 16), _indefinite(16, -1e6), WeightFormat(4, 8))
    with pytest.raises(CalibrationError, match="non-finite"):
        gptq_quantize(random_weight(8, 16), torch.full((16, 16), float("nan")), WeightFormat(4, 8))


def test_mse_clip_groups_dequantize_exactly_and_clip_the_range():
    from pt2q.algorithms.gptq import _gptq

    torch.manual_seed(3)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    weight = torch.randn(24, 64) * torch.rand(24, 64).pow(3) * 4       # heavy tails: clipping pays
    hessian = 2 * x.t() @ x / x.shape[0]
    fmt = WeightFormat(bits=3, group_size=32, sym=False)
    plain, _ = _gptq(weight, hessian, fmt, 128, 0.01, False, False, False)
    clipped, used = _gptq(weight, hessian, fmt, 128, 0.01, False, False, True)
    assert torch.equal(clipped.dequantize(), used)
    assert (clipped.scale <= plain.scale * 1.0001).float().mean() > 0.5   # most groups got a narrower range
    assert not torch.equal(clipped.scale, plain.scale)


def test_gptq_config_clips_group_ranges_by_mse_by_default():
    from pt2q import GPTQConfig

    assert GPTQConfig().mse_clip is True and GPTQConfig(mse_clip=False).mse_clip is False
    assert "mse_clip" in (GPTQConfig.__doc__ or "") and "On by default" in GPTQConfig.__doc__


def test_hessian_recorder_equals_the_full_product_of_all_its_batches():
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 300), torch.randn(5, 300)]
    recorder = HessianRecorder()
    assert recorder.hessian() == (None, 0)
    for x in batches:
        recorder(x)
    hessian, rows = recorder.hessian()
    x = torch.cat([b.reshape(-1, 300) for b in batches])
    assert rows == 26
    torch.testing.assert_close(hessian, 2 * x.t() @ x / rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(hessian, hessian.t())  # the upper triangle was mirrored from the lower one

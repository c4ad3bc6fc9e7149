"""TEQ's graph-free pieces: the fake quantization it trains through, the sample order and the training loop
(the block-level algorithm is tested through pt2q.weight_only in tests/test_weight_only.py)."""
from __future__ import annotations

import pytest
import torch

from pt2q.algorithms.rtn import WeightFormat, rtn_quantize
from pt2q.algorithms.teq import MIN_SCALE, fake_quantize, sample_order, train_scales

FORMATS = {
    "int4_g32_sym": WeightFormat(bits=4, group_size=32),
    "int4_g32_asym": WeightFormat(bits=4, group_size=32, sym=False),
    "int3_g24_asym": WeightFormat(bits=3, group_size=24, sym=False),    # 70 columns: a short, padded last group
    "int8_per_channel": WeightFormat(bits=8, group_size=-1),
    "int4_full_range": WeightFormat(bits=4, group_size=32, full_range=True),
    "nf4_g32": WeightFormat(bits=4, group_size=32, dtype="nf4"),
    "fp4_g32": WeightFormat(bits=4, group_size=32, dtype="fp4"),
    "int4_g8_group_dim0": WeightFormat(bits=4, group_size=8, group_dim=0),
}


def _weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(20, 70, generator=generator) * torch.rand(70, generator=generator) * 3


@pytest.mark.parametrize("name", list(FORMATS))
def test_fake_quantize_is_rtn_bit_for_bit(name):
    """What TEQ trains on is exactly what round to nearest later writes for the same scaled weight."""
    fmt = FORMATS[name]
    weight = _weight()
    expected = rtn_quantize(weight, fmt).dequantize()
    actual = fake_quantize(weight.clone().requires_grad_(True), fmt)
    assert actual.shape == weight.shape and actual.requires_grad
    assert torch.equal(actual.detach(), expected)
    assert not torch.equal(expected, weight)


@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g32_asym", "nf4_g32"])
def test_fake_quantize_passes_the_gradient_straight_through_the_rounding(name):
    """d Q(w)_i / d w_i = 1 for every weight that does not set its group's range (rounding is the
    identity in the backward pass); the range-setting weights also carry the gradient of the scale."""
    fmt = FORMATS[name]
    weight = _weight(1).requires_grad_(True)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    (fake_quantize(weight, fmt) * upstream).sum().backward()
    groups = weight.detach().reshape(20, -1)[:, :64].reshape(20, 2, 32)      # the two whole groups of 32
    sets_range = torch.zeros_like(groups, dtype=torch.bool)
    for extreme in (groups.abs().argmax(-1), groups.argmax(-1), groups.argmin(-1)):
        sets_range.scatter_(-1, extreme.unsqueeze(-1), True)
    grad = weight.grad[:, :64].reshape(20, 2, 32)
    expected = upstream[:, :64].reshape(20, 2, 32)
    torch.testing.assert_close(grad[~sets_range], expected[~sets_range], rtol=1e-5, atol=1e-6)  # (1/scale) * scale
    assert torch.isfinite(weight.grad).all()
    assert (grad[sets_range] - expected[sets_range]).abs().max() > 1e-2   # the scale's own gradient is there


def test_sample_order_shuffles_whole_passes_and_follows_the_seed():
    order = sample_order(5, 12, seed=0)
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))   # every sample once per pass
    assert order == sample_order(5, 12, seed=0)
    assert order != sample_order(5, 12, seed=1)


def _outlier_layer(seed: int = 0):
    """A linear whose inputs have a few large channels and whose weight has a few large columns elsewhere:
    RTN at 3 bits loses much of the small columns, and a per-channel scale can trade the ranges."""
    generator = torch.Generator().manual_seed(seed)
    x = [torch.randn(64, 32, generator=generator) for _ in range(4)]
    for sample in x:
        sample[:, :4] *= 20
    weight = torch.randn(16, 32, generator=generator)
    weight[:, 28:] *= 10
    fmt = WeightFormat(bits=3, group_size=32)

    def loss_with(scales):
        (s,) = scales
        quantized = fake_quantize(weight * s, fmt)

        def loss_of(sample: int) -> torch.Tensor:
            return torch.nn.functional.mse_loss((x[sample] / s) @ quantized.t(), x[sample] @ weight.t())
        return loss_of
    return loss_with, weight, fmt, x


def test_train_scales_lowers_the_loss_and_starts_from_rtn():
    loss_with, weight, fmt, x = _outlier_layer()
    result = train_scales([32], loss_with, 4, steps=120, lr=0.02, progress=False)
    rtn = rtn_quantize(weight, fmt).dequantize()
    rtn_loss = sum(torch.nn.functional.mse_loss(xi @ rtn.t(), xi @ weight.t()).item() for xi in x) / 4
    assert result.rtn_loss == pytest.approx(rtn_loss, rel=1e-6)      # s = 1 is plain round to nearest
    assert result.kept and result.steps == 120
    assert result.trained_loss < 0.3 * result.rtn_loss              # measured: 0.031x
    (scales,) = result.scales
    assert scales.shape == (32,) and not scales.requires_grad and scales.min() >= MIN_SCALE
    assert (scales - 1).abs().max() > 0.05


def test_train_scales_is_deterministic_for_a_seed():
    loss_with = _outlier_layer()[0]
    first = train_scales([32], loss_with, 4, steps=30, lr=0.02, seed=3, progress=False)
    again = train_scales([32], loss_with, 4, steps=30, lr=0.02, seed=3, progress=False)
    other = train_scales([32], loss_with, 4, steps=30, lr=0.02, seed=4, progress=False)
    assert torch.equal(first.scales[0], again.scales[0]) and first.trained_loss == again.trained_loss
    assert not torch.equal(first.scales[0], other.scales[0])


def test_train_scales_keeps_ones_when_training_does_not_lower_the_loss():
    """Two samples pulling s towards 0 and 2: their mean loss is least at s = 1, where training starts; a
    large step leaves it elsewhere, so the result is s = 1 with both losses reported."""
    def loss_with(scales):
        (s,) = scales
        return lambda sample: ((s - 2 * sample) ** 2).sum()

    result = train_scales([3], loss_with, 2, steps=7, lr=0.5, progress=False)
    assert result.rtn_loss == pytest.approx(3.0)
    assert result.trained_loss > result.rtn_loss and not result.kept
    assert torch.equal(result.scales[0], torch.ones(3))


def test_train_scales_progress_bar_shows_the_loss(capsys):
    loss_with = _outlier_layer()[0]
    train_scales([32], loss_with, 4, steps=5, lr=0.02, progress=True, desc="pt2q teq layers.0")
    shown = capsys.readouterr().err
    assert "pt2q teq layers.0" in shown and "/5 [" in shown and "loss=" in shown

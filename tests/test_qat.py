"""pt2q.prepare_qat -> train -> pt2q.convert: quantization-aware training through torchao's QAT flow."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pt2q
from pt2q.errors import CalibrationError, ConfigError
from tests.conftest import DQ_PER_CHANNEL, Q_PER_TENSOR, count_of, rel_error


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def batches(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(n)]


def test_prepare_qat_on_an_eval_model_warns_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="eval mode"):
        prepared = pt2q.prepare_qat(model, pt2q.StaticQuantConfig(), (batches()[0],))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for x in batches():
        prepared(x).square().mean().backward()
        optimizer.step()
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and bn stats


def test_convert_before_any_training_step_is_ptq_with_fake_quant_ranges():
    torch.manual_seed(0)
    model = SmallConvNet().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model in train mode: no warning
        prepared = pt2q.prepare_qat(model, pt2q.StaticQuantConfig(), (batches()[0],))
    with torch.no_grad():
        for x in batches():
            prepared(x)  # forward passes only: ranges (and batch-norm statistics) move, weights do not
    qmodel = pt2q.convert(prepared)
    assert not [n for n in qmodel.graph.nodes if "batch_norm" in str(n.target) or "dropout" in str(n.target)]
    assert pt2q.count_quantized_layers(qmodel) == 3 and count_of(qmodel, DQ_PER_CHANNEL) == 3
    reference = SmallConvNet().eval()  # the fp32 model with the batch-norm statistics the passes produced
    reference.load_state_dict({k: v for k, v in prepared.state_dict().items() if k in reference.state_dict()})
    assert not torch.equal(reference.bn1.running_mean, model.bn1.running_mean)
    x = batches(1, seed=5)[0]
    assert rel_error(qmodel(x), reference(x)) < 0.1


def test_convert_without_any_forward_pass_names_the_unobserved_fake_quant():
    prepared = pt2q.prepare_qat(SmallConvNet().train(), pt2q.StaticQuantConfig(), (batches()[0],))
    with pytest.raises(CalibrationError, match=r"activation_post_process_\d+.*never observed"):
        pt2q.convert(prepared)


def test_nan_in_a_fake_quant_at_convert_raises_naming_it():
    prepared = pt2q.prepare_qat(SmallConvNet().train(), pt2q.StaticQuantConfig(), (batches()[0],))
    with torch.no_grad():
        prepared(batches()[0])
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    name, fake_quant = next((n, m) for n, m in prepared.named_modules()
                            if isinstance(m, FusedMovingAvgObsFakeQuantize) and m.scale.numel() == 1)
    fake_quant.activation_post_process.max_val.fill_(float("nan"))
    with pytest.raises(CalibrationError, match=rf"{name} .*NaN"):
        pt2q.convert(prepared)


def test_learnable_ranges_are_parameters_from_the_start():
    prepared = pt2q.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).train(),
                                pt2q.StaticQuantConfig(qat_ranges="learnable"), (torch.randn(3, 4),))
    scales = [n for n, p in prepared.named_parameters() if n.endswith(".scale") and p.requires_grad]
    assert len(scales) == 2  # the two linear inputs
    x = torch.randn(3, 4)
    prepared(x).sum().backward()
    assert all(p.grad is not None for n, p in prepared.named_parameters() if n in scales)


def test_dynamic_qat_converts_to_dynamic_int8():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).train()
    prepared = pt2q.prepare_qat(model, pt2q.DynamicQuantConfig(), (torch.randn(5, 6),))
    prepared(torch.randn(5, 6))
    qmodel = pt2q.convert(prepared)
    assert count_of(qmodel, torch.ops.quantized_decomposed.choose_qparams.tensor) == 2
    assert count_of(qmodel, Q_PER_TENSOR) == 0


def test_prepare_qat_rejects_what_it_cannot_train():
    model = nn.Sequential(nn.Linear(4, 4)).train()
    with pytest.raises(ConfigError, match="weight-only and FP8"):
        pt2q.prepare_qat(model, pt2q.RTNConfig(), (torch.randn(2, 4),))
    with pytest.raises(ConfigError, match="smooth_quant"):
        pt2q.prepare_qat(model, pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig()), (torch.randn(2, 4),))
    with pytest.raises(ConfigError, match="qat_ranges"):
        pt2q.StaticQuantConfig(qat_ranges="lsq")
    with pytest.raises(ConfigError, match="training graph"):
        pt2q.prepare_qat(pt2q.capture(model, (torch.randn(2, 4),)), pt2q.StaticQuantConfig(), (torch.randn(2, 4),))


def test_calibrate_gives_the_fake_quants_the_ranges_ptq_would_choose():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = [(torch.randn(16, 6),) for _ in range(5)]
    config = pt2q.StaticQuantConfig(activation_observer="minmax")
    ptq = pt2q.quantize(model, config, data, progress=False)
    ptq_qparams = [float(a) for n in ptq.graph.nodes if n.target is Q_PER_TENSOR for a in n.args[1:3]]
    with pytest.warns(UserWarning, match="eval mode"):
        prepared = pt2q.prepare_qat(model, config, data[0])
    assert pt2q.calibrate(prepared, data, progress=False) == 5
    from pt2q.qat import activation_fake_quants

    fake_quants = list(activation_fake_quants(prepared).values())
    assert [float(v) for fq in fake_quants for v in (fq.scale, fq.zero_point)] == pytest.approx(ptq_qparams)
    assert all(bool(fq.fake_quant_enabled[0]) and not bool(fq.observer_enabled[0]) for fq in fake_quants)
    # training keeps those ranges (a moving average would drift toward one batch's range)
    prepared(torch.zeros(16, 6))
    assert float(fake_quants[0].scale) == pytest.approx(ptq_qparams[0])


class OutlierMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            for layer in (self.a, self.b, self.c):
                layer.weight[0, 0] = 3.0  # one large weight: a coarse per-tensor grid for all the others

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _fitted_conv_net(train):
    model = SmallConvNet()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = 2.0
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # exact statistics of the training data
    model.train()
    with torch.no_grad():
        for x in train:
            model(x)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_qat_ends_closer_to_fp32_than_ptq_on_the_same_data(kind):
    """Per-tensor int8 weights on layers with one large weight: where PTQ loses accuracy. QAT with the
    recipe of the README (calibrate, freeze batch norm, distil from the fp32 model) on the batches PTQ
    calibrates on; both judged on held-out batches."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    shape, count = ((32, 16), 32) if kind == "mlp" else ((8, 3, 8, 8), 16)
    train = [torch.randn(*shape, generator=generator) for _ in range(count)]
    held_out = [torch.randn(*shape, generator=generator) for _ in range(4)]
    model = OutlierMLP().eval() if kind == "mlp" else _fitted_conv_net(train)
    # saturation_guard off: the same 8-bit grid on every CPU (this runs eagerly, not in oneDNN int8 kernels)
    config = pt2q.StaticQuantConfig(weight_granularity="per_tensor", saturation_guard="off")

    def error(qmodel):
        with torch.no_grad():
            return sum(rel_error(qmodel(x), model(x)) for x in held_out) / len(held_out)

    ptq_error = error(pt2q.quantize(model, config, [(x,) for x in train], progress=False))
    with pytest.warns(UserWarning, match="eval mode"):
        prepared = pt2q.prepare_qat(model, config, (train[0],))
    pt2q.calibrate(prepared, [(x,) for x in train], progress=False)
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)  # batch norm frozen at the fp32 model's statistics
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-4 if kind == "conv" else 1e-5)
    for _ in range(2):
        for x in train:
            with torch.no_grad():
                target = model(x)
            loss = (prepared(x) - target).square().mean() / target.square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    qat_error = error(pt2q.convert(prepared))
    assert qat_error < 0.95 * ptq_error, (qat_error, ptq_error)

"""prepare / calibrate / convert / quantize: the happy path and every bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pt2q
from pt2q import CalibrationError, ConfigError, NotPreparedError, StaticQuantConfig
from pt2q.api import PREPARED_KEY, QUANTIZED_KEY
from tests.conftest import Q_PER_TENSOR, ModelSnapshot, call, count_of, rel_error


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, y=None):
        return self.a(x) + self.b(y)


def _batch(n=4, **override):
    return {"x": torch.randn(n, 8), "y": torch.randn(n, 8), **override}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoInputs().eval()


# -- happy path -------------------------------------------------------------------------------------
def test_manual_flow_equals_quantize(model):
    data = [_batch() for _ in range(3)]
    prepared = pt2q.prepare(model, StaticQuantConfig(), data[0])
    assert prepared.meta[PREPARED_KEY]
    with torch.no_grad():
        for batch in data:  # the user's own calibration loop
            prepared(**batch)
    manual = pt2q.convert(prepared)
    assert manual.meta[QUANTIZED_KEY] and PREPARED_KEY not in manual.meta
    auto = pt2q.quantize(model, StaticQuantConfig(), data, progress=False)
    probe = _batch()
    assert torch.equal(call(manual, kwargs=probe), call(auto, kwargs=probe))
    assert pt2q.count_quantized_layers(manual) == pt2q.count_quantized_layers(auto) == 2
    # and it is really quantized: close to fp32 but not equal
    reference = call(model, kwargs=probe)
    assert not torch.equal(call(auto, kwargs=probe), reference)
    assert rel_error(call(auto, kwargs=probe), reference) < 0.05


def test_converted_model_keeps_no_fp32_copy_of_quantized_weights(model):
    qmodel = pt2q.quantize(model, StaticQuantConfig(), [_batch()], progress=False)
    names = dict(qmodel.named_parameters()) | dict(qmodel.named_buffers())
    assert "a.weight" not in names and "b.weight" not in names
    assert "a.bias" in names  # still read by the graph
    used = {n.target for n in qmodel.graph.nodes if n.op == "get_attr"}
    assert set(names) <= used
    assert model.a.weight.shape == (8, 8)  # only the quantized module lost the attribute


def test_calibrate_returns_batch_count(model):
    data = [_batch() for _ in range(5)]
    prepared = pt2q.prepare(model, StaticQuantConfig(), data[0])
    assert pt2q.calibrate(prepared, data, progress=False) == 5
    assert pt2q.calibrate(prepared, (b for b in data[:2]), progress=False) == 2  # unsized iterables too


def test_calibration_changes_the_ranges(model):
    small, large = [_batch()], [_batch(x=100 * torch.randn(4, 8))]
    q_small = pt2q.quantize(model, StaticQuantConfig(activation_observer="minmax"), small, progress=False)
    q_large = pt2q.quantize(model, StaticQuantConfig(activation_observer="minmax"), large, progress=False)
    scale = {name: [n.args[1] for n in q.graph.nodes if n.target is Q_PER_TENSOR and n.args[0].name == "x"][0]
             for name, q in (("small", q_small), ("large", q_large))}
    assert scale["large"] > 20 * scale["small"]


def test_progress_bar_can_be_disabled(model, capfd):
    data = [_batch() for _ in range(3)]
    pt2q.quantize(model, StaticQuantConfig(), data, progress=True)
    assert "pt2q calibrate" in capfd.readouterr().err
    pt2q.quantize(model, StaticQuantConfig(), data, progress=False)
    assert "pt2q calibrate" not in capfd.readouterr().err
    prepared = pt2q.prepare(model, StaticQuantConfig(), data[0])
    pt2q.calibrate(prepared, data, progress=False)
    assert "pt2q calibrate" not in capfd.readouterr().err


def test_quantize_accepts_generators_and_positional_batches():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    qmodel = pt2q.quantize(mlp, StaticQuantConfig(), ((torch.randn(4, 8),) for _ in range(3)), progress=False)
    assert pt2q.count_quantized_layers(qmodel) == 2
    qmodel = pt2q.quantize(mlp, StaticQuantConfig(), [torch.randn(4, 8)], progress=False)  # a bare tensor
    assert pt2q.count_quantized_layers(qmodel) == 2


def test_dynamic_needs_no_calibration_data(model):
    qmodel = pt2q.quantize(model, pt2q.DynamicQuantConfig(), example_inputs=_batch(), progress=False)
    assert pt2q.count_quantized_layers(qmodel) == 2
    with pytest.raises(ConfigError, match="example_inputs"):
        pt2q.quantize(model, pt2q.DynamicQuantConfig(), progress=False)


def test_prepare_on_a_capture_leaves_the_capture_alone(model):
    batch = _batch()
    captured = pt2q.capture(model, kwargs=batch)
    nodes_before = [(n.op, n.target) for n in captured.graph.nodes]
    expected = call(captured, kwargs=batch)
    first = pt2q.quantize(captured, StaticQuantConfig(), [batch], progress=False)
    second = pt2q.quantize(captured, StaticQuantConfig(), [batch], progress=False)
    assert [(n.op, n.target) for n in captured.graph.nodes] == nodes_before
    assert torch.equal(call(captured, kwargs=batch), expected)
    assert torch.equal(call(first, kwargs=batch), call(second, kwargs=batch))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_keyword_argument(model, bad):
    snap = ModelSnapshot(model)
    y = torch.randn(4, 8)
    y[1, 2] = bad
    data = [_batch(), _batch(), _batch(y=y)]
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(CalibrationError, match=rf"calibration batch 2: keyword argument 'y' contains {kind}"):
        pt2q.quantize(model, StaticQuantConfig(), data, progress=False)
    snap.assert_unchanged()


def test_non_finite_positional_argument():
    mlp = nn.Sequential(nn.Linear(8, 8)).eval()
    snap = ModelSnapshot(mlp)
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"calibration batch 1: positional argument 0 contains NaN"):
        pt2q.quantize(mlp, StaticQuantConfig(), [(torch.randn(4, 8),), (x,)], progress=False)
    snap.assert_unchanged()


def test_non_finite_first_batch_is_batch_0(model):
    with pytest.raises(CalibrationError, match="calibration batch 0: keyword argument 'x' contains Inf"):
        pt2q.quantize(model, StaticQuantConfig(), [_batch(x=torch.full((4, 8), float("inf")))], progress=False)


def test_nan_produced_inside_the_model_names_the_node():
    class Logs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.log(self.a(x)))

    model = Logs().eval()
    snap = ModelSnapshot(model)
    with pytest.raises(CalibrationError, match=r"calibration batch 0: the output of node 'log', the input of b, contains NaN.*set_local"):
        pt2q.quantize(model, StaticQuantConfig(activation_observer="minmax"), [(torch.randn(16, 8),)],
                      progress=False)
    snap.assert_unchanged()


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_calibration_data(model, empty):
    snap = ModelSnapshot(model)
    with pytest.raises(CalibrationError, match="empty"):
        pt2q.quantize(model, StaticQuantConfig(), empty, progress=False)
    snap.assert_unchanged()
    prepared = pt2q.prepare(model, StaticQuantConfig(), _batch())
    with pytest.raises(CalibrationError, match="empty"):
        pt2q.calibrate(prepared, [], progress=False)


def test_static_quantize_without_calibration_data(model):
    snap = ModelSnapshot(model)
    with pytest.raises(CalibrationError, match="calib_data.*DynamicQuantConfig"):
        pt2q.quantize(model, StaticQuantConfig(), example_inputs=_batch(), progress=False)
    snap.assert_unchanged()


@pytest.mark.parametrize("bad_batch", [_batch(n=3), _batch(x=torch.randn(4, 9))], ids=["batch_size", "features"])
def test_wrong_shape_batch(model, bad_batch):
    snap = ModelSnapshot(model)
    data = [_batch(), bad_batch]
    with pytest.raises(CalibrationError) as info:
        pt2q.quantize(model, StaticQuantConfig(), data, progress=False)
    message = str(info.value)
    assert message.startswith("calibration batch 1 does not fit the captured graph")
    assert "hint:" in message and "dynamic_shapes='batch'" in message
    assert info.value.__cause__ is not None
    snap.assert_unchanged()


def test_other_batch_size_works_with_dynamic_batch(model):
    data = [_batch(n=4), _batch(n=3), _batch(n=7)]
    qmodel = pt2q.quantize(model, StaticQuantConfig(), data, dynamic_shapes="batch", progress=False)
    assert call(qmodel, kwargs=_batch(n=5)).shape == (5, 8)


def test_convert_plain_module_not_prepared(model):
    snap = ModelSnapshot(model)
    with pytest.raises(NotPreparedError, match="pt2q.prepare"):
        pt2q.convert(model)
    snap.assert_unchanged()


def test_convert_capture_without_observers(model):
    snap = ModelSnapshot(model)
    captured = pt2q.capture(model, kwargs=_batch())
    nodes_before = len(captured.graph.nodes)
    with pytest.raises(NotPreparedError, match="GraphModule with no observers"):
        pt2q.convert(captured)
    assert len(captured.graph.nodes) == nodes_before
    snap.assert_unchanged()
    assert isinstance(NotPreparedError("x"), TypeError)


def test_calibrate_not_prepared(model):
    captured = pt2q.capture(model, kwargs=_batch())
    with pytest.raises(NotPreparedError):
        pt2q.calibrate(captured, [_batch()])


def test_convert_before_calibration_names_the_unobserved_node(model):
    prepared = pt2q.prepare(model, StaticQuantConfig(activation_observer="minmax"), _batch())
    with pytest.raises(CalibrationError, match="never observed"):
        pt2q.convert(prepared)


def test_prepare_without_example_inputs(model):
    snap = ModelSnapshot(model)
    with pytest.raises(ConfigError, match="example_inputs"):
        pt2q.prepare(model, StaticQuantConfig())
    snap.assert_unchanged()


def test_prepare_rejects_non_config(model):
    import re

    from pt2q.config import CONFIG_KINDS

    names = [cls.__name__ for cls in CONFIG_KINDS.values()]   # every registered config, in registry order
    assert {"StaticQuantConfig", "RTNConfig", "GPTQConfig", "AWQConfig", "FP8Config"} <= set(names)
    with pytest.raises(ConfigError, match=re.escape(f"{', '.join(names[:-1])} or {names[-1]}, got dict")):
        pt2q.prepare(model, {"backend": "x86"}, _batch())


def test_quantize_keeps_user_model_untouched(model):
    model.train()
    snap = ModelSnapshot(model)
    qmodel = pt2q.quantize(model, StaticQuantConfig(), [_batch()], progress=False)
    snap.assert_unchanged()
    assert model.training
    assert count_of(qmodel, Q_PER_TENSOR) >= 2


# -- the quantized model owns its tensors; convert consumes the prepared model ---------------------
class CountingModel(nn.Module):
    """Embedding, tied output weights, norms and a buffer forward updates: what BERT-like models share."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids):
        self.calls.add_(1)
        return self.out(torch.relu(self.fc(self.norm(self.embed(ids)))))


def _user_storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


@pytest.mark.parametrize("config", [StaticQuantConfig(), pt2q.DynamicQuantConfig(), pt2q.WeightOnlyQuantConfig()],
                         ids=["static", "dynamic", "weight_only"])
def test_quantized_model_shares_no_storage_with_the_user_model(config):
    torch.manual_seed(0)
    model = CountingModel().eval()
    ids = torch.randint(0, 16, (2, 5))
    snap = ModelSnapshot(model)
    qmodel = pt2q.quantize(model, config, [(ids,)], progress=False)
    held = [t for t in [*qmodel.parameters(), *qmodel.buffers()]] + \
        [v for m in qmodel.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert held and not {t.untyped_storage().data_ptr() for t in held} & _user_storages(model)
    snap.assert_unchanged()  # calibration did not advance the user's counter
    before = call(qmodel, (ids,))
    with torch.no_grad():
        model.norm.weight.mul_(3)  # editing the user's model afterwards does not move the quantized one
        model(ids)
    assert torch.equal(call(qmodel, (ids,)), before)
    user_calls = model.calls.clone()
    call(qmodel, (ids,))
    assert torch.equal(model.calls, user_calls)  # and calling the quantized model leaves the user's alone


def test_convert_consumes_the_prepared_model(model):
    prepared = pt2q.prepare(model, StaticQuantConfig(), _batch())
    pt2q.calibrate(prepared, [_batch()], progress=False)
    qmodel = pt2q.convert(prepared)
    for again in (lambda: pt2q.convert(prepared), lambda: pt2q.calibrate(prepared, [_batch()], progress=False)):
        with pytest.raises(NotPreparedError, match=r"already converted by pt2q.convert\(\).*prepare\(\) again"):
            again()
    assert call(qmodel, (), _batch()).shape == (4, 8)  # the converted model is fine


def test_save_refuses_an_observed_model(model, tmp_path):
    prepared = pt2q.prepare(model, StaticQuantConfig(), _batch())
    pt2q.calibrate(prepared, [_batch()], progress=False)
    with pytest.raises(NotPreparedError, match=r"save\(\) takes a converted model.*convert\(\) first"):
        pt2q.save(prepared, tmp_path / "observed.pt2")
    assert not (tmp_path / "observed.pt2").exists()
    pt2q.convert(prepared)
    with pytest.raises(NotPreparedError, match="already converted"):
        pt2q.save(prepared, tmp_path / "observed.pt2")


# -- data mistakes get errors with the batch named ---------------------------------------------------
def test_calib_data_as_one_tensor_is_refused_with_a_hint():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    with pytest.raises(CalibrationError, match=r"single tensor.*\[\(x,\)\] for one batch of shape \(4, 8\)"):
        pt2q.quantize(model, StaticQuantConfig(), torch.randn(4, 8), progress=False)
    prepared = pt2q.prepare(model, StaticQuantConfig(), (torch.randn(4, 8),))
    with pytest.raises(CalibrationError, match="single tensor"):
        pt2q.calibrate(prepared, torch.randn(4, 8), progress=False)


def test_none_batch_names_its_index(model):
    with pytest.raises(CalibrationError, match=r"calibration batch 1: example inputs must be"):
        pt2q.quantize(model, StaticQuantConfig(), [_batch(), None], progress=False)


@pytest.mark.parametrize("observer", ["histogram", "minmax", "moving_average"])
def test_inf_inside_the_model_fails_alike_for_every_observer(observer):
    """HistogramObserver would skip the batch with only a warning; every observer now raises, naming
    the node and the batch."""
    class Exps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.exp(self.a(x)))

    torch.manual_seed(0)
    model = Exps().eval()
    fine, overflowing = torch.randn(4, 8), torch.full((4, 8), 1e4)
    with pytest.raises(CalibrationError, match=r"calibration batch 1: the output of node 'exp', the input of b, "
                                                     r"contains Inf"):
        pt2q.quantize(model, StaticQuantConfig(activation_observer=observer), [(fine,), (overflowing,)],
                      progress=False)

"""pt2q.measure -> FP8Config(from_measurement=...): the file, the identical graph, and the bad-file errors."""
from __future__ import annotations

import json

import pytest
import torch

import pt2q
from pt2q.graph import get_constant
from tests.conftest import ModelSnapshot, call
from tests.models import build


def batches(zm, count=3):
    torch.manual_seed(1)
    ids = zm.kwargs["input_ids"]
    return [{**zm.kwargs, "input_ids": torch.randint(1, 128, ids.shape)} for _ in range(count)]


def graphs_identical(a, b) -> None:
    assert str(a.graph) == str(b.graph)
    for node_a, node_b in zip(a.graph.nodes, b.graph.nodes):
        if node_a.op == "get_attr":
            x, y = get_constant(a, node_a), get_constant(b, node_b)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                                                      y.view(torch.uint8) if y.element_size() == 1 else y), node_a.name


@pytest.fixture(scope="module")
def bert():
    return build("bert")


@pytest.fixture(scope="module")
def measured(bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "bert.fp8.json"
    result = pt2q.measure(bert.model, pt2q.FP8Config(), batches(bert), path, progress=False)
    return path, result


def test_the_file_lists_every_layer_with_names_shapes_statistics_and_scales(bert, measured):
    path, result = measured
    document = json.loads(path.read_text())
    assert document["format"] == "pt2q-fp8-measurement" and document["calibration_batches"] == 3
    assert result.layers == len(document["layers"]) == bert.num_quantizable
    layer = document["layers"][0]
    assert layer["op"] == "aten.linear.default" and layer["module"].startswith("encoder.layer.0")
    assert layer["weight_shape"] == [32, 32] and len(layer["weight_amax"]) == len(layer["weight_scale"]) == 32
    (entry,) = layer["inputs"]
    assert entry["arg"] == 0 and entry["shape"][-1] == 32 and entry["amax"] > 0 and entry["scale"] > 0


def test_quantizing_from_the_file_gives_the_graph_calibration_gives(bert, measured):
    path, _ = measured
    direct = pt2q.quantize(bert.model, pt2q.FP8Config(), batches(bert), progress=False)
    snapshot = ModelSnapshot(bert.model)
    from_file = pt2q.quantize(bert.model, pt2q.FP8Config(from_measurement=path), example_inputs=bert.kwargs,
                              progress=False)
    snapshot.assert_unchanged()
    graphs_identical(direct, from_file)
    assert torch.equal(call(direct, (), bert.kwargs).last_hidden_state, call(from_file, (), bert.kwargs).last_hidden_state)


def test_the_file_serves_another_scale_method_and_format(bert, measured):
    path, _ = measured
    config = dict(dtype="e5m2", device="gaudi3", scale_method="maxabs_pow2")
    direct = pt2q.quantize(bert.model, pt2q.FP8Config(**config), batches(bert), progress=False)
    from_file = pt2q.quantize(bert.model, pt2q.FP8Config(**config, from_measurement=path),
                              example_inputs=bert.kwargs, progress=False)
    graphs_identical(direct, from_file)


def test_other_example_sizes_are_accepted(bert, measured):
    path, _ = measured
    longer = {key: torch.cat([value, value], dim=1) for key, value in bert.kwargs.items()}
    qmodel = pt2q.quantize(bert.model, pt2q.FP8Config(from_measurement=path), example_inputs=longer, progress=False)
    assert pt2q.count_quantized_layers(qmodel) == bert.num_quantizable


def test_a_different_model_names_the_first_mismatch(measured):
    path, _ = measured
    import transformers

    wider = transformers.BertModel(transformers.BertConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0)).eval()
    inputs = {"input_ids": torch.randint(1, 128, (2, 8))}
    with pytest.raises(pt2q.MeasurementError, match=r"'linear' \(aten.linear.default, module "
                                                     r"'encoder.layer.0.attention.self.query'\): weight shape \[48, 48\] "
                                                     r"here, \[32, 32\] in the file"):
        pt2q.quantize(wider, pt2q.FP8Config(from_measurement=path), example_inputs=inputs, progress=False)
    deeper = build("bert").model
    deeper.encoder.layer.append(deeper.encoder.layer[-1])
    with pytest.raises(pt2q.MeasurementError, match=r"'linear_12' .*module 'encoder.layer.2.attention.self.query'\): "
                                                     r"module is 'pooler.dense' in the file"):
        pt2q.quantize(deeper, pt2q.FP8Config(from_measurement=path), example_inputs=inputs, progress=False)


def test_a_layer_kept_float_differs_from_the_file(bert, measured):
    path, _ = measured
    config = pt2q.FP8Config(from_measurement=path).set_local(r"encoder\.layer\.1\..*", None)
    with pytest.raises(pt2q.MeasurementError, match="the file has FP8 layer .*that this model lacks"):
        pt2q.quantize(bert.model, config, example_inputs=bert.kwargs, progress=False)


@pytest.mark.parametrize("damage, match", [
    (lambda text: text[: len(text) // 2], "invalid JSON at line .*truncated"),
    (lambda text: "[]", "not a pt2q FP8 measurement file"),
    (lambda text: text.replace('"version": 1', '"version": 7'), "version 7"),
    (lambda text: text.replace('"amax"', '"amix"', 1), "layer #0 .*damaged"),
])
def test_damaged_files_raise_clear_errors(bert, measured, tmp_path, damage, match):
    path, _ = measured
    broken = tmp_path / "broken.json"
    broken.write_text(damage(path.read_text()))
    snapshot = ModelSnapshot(bert.model)
    with pytest.raises(pt2q.MeasurementError, match=match):
        pt2q.quantize(bert.model, pt2q.FP8Config(from_measurement=broken), example_inputs=bert.kwargs, progress=False)
    snapshot.assert_unchanged()


def test_a_missing_file(bert, tmp_path):
    with pytest.raises(pt2q.MeasurementError, match="cannot read"):
        pt2q.quantize(bert.model, pt2q.FP8Config(from_measurement=tmp_path / "none.json"),
                      example_inputs=bert.kwargs, progress=False)


def test_a_failed_measure_writes_nothing(bert, tmp_path):
    path = tmp_path / "out.json"
    bad = [{"input_ids": torch.randint(1, 128, (2, 8))}, {"input_ids": torch.randint(1, 128, (2, 8, 3))}]
    with pytest.raises(Exception):
        pt2q.measure(bert.model, pt2q.FP8Config(), bad, path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(pt2q.MeasurementError, match="does not exist"):
        pt2q.measure(bert.model, pt2q.FP8Config(), batches(bert), tmp_path / "no" / "out.json", progress=False)


def test_measure_and_from_measurement_misuse(bert, measured):
    path, _ = measured
    with pytest.raises(pt2q.ConfigError, match="nothing to measure"):
        pt2q.measure(bert.model, pt2q.FP8Config(activation="dynamic"), batches(bert), path.parent / "x.json")
    with pytest.raises(pt2q.ConfigError, match="takes a pt2q.FP8Config"):
        pt2q.measure(bert.model, pt2q.StaticQuantConfig(), batches(bert), path.parent / "x.json")
    with pytest.raises(pt2q.ConfigError, match="do not pass calib_data"):
        pt2q.quantize(bert.model, pt2q.FP8Config(from_measurement=path), batches(bert))

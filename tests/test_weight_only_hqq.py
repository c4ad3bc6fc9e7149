"""HQQ through the public API: `pt2q.quantize(model, pt2q.HQQConfig(...))` on the tiny llama of the zoo.

Every quantized linear becomes `linear(x, pt2q.dequantize_weight(packed, scale, zero_point, ...))` with
float32 zero points; the graph's weight is exactly `hqq_quantize` of the original weight; HQQ rules mix
with RTN and GPTQ through set_local; bad fields raise ConfigError naming the field, with the user's model
unchanged; the model saves and loads bit-identically.
"""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import ConfigError, GPTQConfig, HQQConfig, RTNConfig
from pt2q.algorithms.hqq import hqq_quantize
from pt2q.api import WEIGHT_ONLY_REPORT_KEY
from pt2q.graph import get_constant
from pt2q.ops import DEQUANTIZE_WEIGHT
from tests.conftest import ModelSnapshot, call, count_of, fp32_weighted_layers, rel_error
from tests.models import build
from tests.test_weight_only import LLAMA_LINEARS, dequantize_nodes, graph_weights, output, token_batches

# Relative L2 error of the logits vs fp32 on the zoo's example inputs, measured: HQQ 0.108 (W3 g32) / 0.049
# (W4 g32), asymmetric RTN 0.120 / 0.054. Relative squared weight error over the 14 linears: HQQ 0.0225 /
# 0.00515, RTN 0.0295 / 0.00644.
TOLERANCE = {3: 0.16, 4: 0.08}


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def _weight_error(qmodel, model) -> float:
    state = model.state_dict()
    weights = graph_weights(qmodel)
    return (sum((w - state[f"{name}.weight"]).pow(2).sum().item() for name, w in weights.items())
            / sum(state[f"{name}.weight"].pow(2).sum().item() for name in weights))


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_graph_form_and_exact_weights(bits, llama):
    config = HQQConfig(bits=bits, group_size=32)
    snapshot = ModelSnapshot(llama.model)
    qmodel = pt2q.quantize(llama.model, config, example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()

    assert count_of(qmodel, DEQUANTIZE_WEIGHT) == len(LLAMA_LINEARS) == 14
    assert pt2q.count_quantized_layers(qmodel) == 14
    nodes = dequantize_nodes(qmodel)
    assert sorted(nodes) == sorted(LLAMA_LINEARS)
    for node in nodes.values():
        assert node.args[4:6] == (bits, 32) and node.args[3] is None   # no code table
        zero_point = get_constant(qmodel, node.args[2])
        assert zero_point.dtype == torch.float32 and zero_point.shape == get_constant(qmodel, node.args[1]).shape
    assert fp32_weighted_layers(qmodel) == ["lm_head.weight"]          # the LM head stays float

    original = llama.model.state_dict()
    for layer, weight in graph_weights(qmodel).items():
        expected = hqq_quantize(original[f"{layer}.weight"], config.weight_format()).dequantize()
        assert torch.equal(weight, expected), layer

    report = qmodel.meta[WEIGHT_ONLY_REPORT_KEY]
    assert {info["algorithm"] for info in report.layers.values()} == {"hqq"}
    numel = sum(llama.model.get_submodule(name).weight.numel() for name in LLAMA_LINEARS)
    assert report.packed_bytes == numel * bits // 8 + numel // 32 * 8   # codes + float32 scale and zero

    rtn = pt2q.quantize(llama.model, RTNConfig(bits=bits, group_size=32, sym=False), example_inputs=llama.kwargs,
                        progress=False)
    assert _weight_error(qmodel, llama.model) < 0.9 * _weight_error(rtn, llama.model)
    reference, actual = llama.run(), output(llama, qmodel)
    assert not torch.equal(actual, reference)
    assert rel_error(actual, reference) < TOLERANCE[bits]


def test_hqq_options_reach_the_solver(llama):
    config = HQQConfig(bits=4, group_size=32, iters=0, fit_scale=False)
    qmodel = pt2q.quantize(llama.model, config, example_inputs=llama.kwargs, progress=False)
    weight = llama.model.get_submodule("model.layers.1.mlp.up_proj").weight
    expected = hqq_quantize(weight, config.weight_format(), iters=0, fit_scale=False).dequantize()
    assert torch.equal(graph_weights(qmodel)["model.layers.1.mlp.up_proj"], expected)
    assert not torch.equal(expected, hqq_quantize(weight, config.weight_format()).dequantize())


def test_set_local_mixes_hqq_with_rtn(llama):
    config = RTNConfig(bits=4, group_size=32).set_local(r".*mlp\..*", HQQConfig(bits=3, group_size=32))
    qmodel = pt2q.quantize(llama.model, config, example_inputs=llama.kwargs, progress=False)
    nodes = dequantize_nodes(qmodel)
    for name, node in nodes.items():
        is_mlp = ".mlp." in name
        assert node.args[4] == (3 if is_mlp else 4), name
        assert (node.args[2] is not None) == is_mlp, name               # RTN here is symmetric: no zero point
    weights = graph_weights(qmodel)
    weight = llama.model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert torch.equal(weights["model.layers.0.mlp.down_proj"],
                       hqq_quantize(weight, HQQConfig(bits=3, group_size=32).weight_format()).dequantize())


def test_hqq_layers_inside_gptq_blocks(llama):
    """Calibration-free layers inside blocks calibrated by another algorithm are quantized before the block's
    last run (weight_only._layerwise_block); GPTQ leaves their weights alone, so they are hqq_quantize's."""
    config = GPTQConfig(bits=4, group_size=32).set_local(r".*down_proj", HQQConfig(bits=4, group_size=32))
    qmodel = pt2q.quantize(llama.model, config, token_batches(2, seed=0), progress=False)
    assert pt2q.count_quantized_layers(qmodel) == 14
    report = qmodel.meta[WEIGHT_ONLY_REPORT_KEY]
    algorithms = {info["module"]: info["algorithm"] for info in report.layers.values()}
    assert {name for name, algorithm in algorithms.items() if algorithm == "hqq"} == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    weights = graph_weights(qmodel)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        expected = hqq_quantize(llama.model.get_submodule(name).weight, HQQConfig(group_size=32).weight_format())
        assert torch.equal(weights[name], expected.dequantize()), name


# -- bad fields: ConfigError naming the field; the model never changes ------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("sym", True, r"HQQConfig\.sym=True is not valid; valid: False .*RTNConfig\(sym=True\)"),
    ("bits", 1, r"HQQConfig\.bits=1 is not valid; valid: an integer from 2 to 8"),
    ("group_size", 0, r"HQQConfig\.group_size=0 is not valid"),
    ("iters", -1, r"HQQConfig\.iters=-1 is not valid; valid: a number of solver steps >= 0"),
    ("iters", 2.5, r"HQQConfig\.iters=2\.5 is not valid; valid: an integer >= 0"),
    ("lp_norm", 0.0, r"HQQConfig\.lp_norm=0\.0 is not valid; valid: a norm exponent in \(0, 1\]"),
    ("lp_norm", 2.0, r"HQQConfig\.lp_norm=2\.0 is not valid"),
    ("beta", 0.0, r"HQQConfig\.beta=0\.0 is not valid; valid: a positive number"),
    ("beta", float("inf"), r"HQQConfig\.beta=inf is not valid"),
    ("kappa", 0.5, r"HQQConfig\.kappa=0\.5 is not valid; valid: a growth factor >= 1"),
    ("early_stop", "yes", r"HQQConfig\.early_stop must be True or False, got 'yes'"),
    ("fit_scale", 1, r"HQQConfig\.fit_scale must be True or False, got 1"),
    ("group_dim", 2, r"HQQConfig\.group_dim=2 is not valid"),
])
def test_bad_fields_raise_config_error_naming_the_field(field, value, match, llama):
    with pytest.raises(ConfigError, match=match):
        HQQConfig(**{field: value})
    config = HQQConfig(group_size=32)
    setattr(config, field, value)  # assigned after construction: checked again when used
    snapshot = ModelSnapshot(llama.model)
    with pytest.raises(ConfigError, match=match):
        pt2q.quantize(llama.model, config, example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()


def test_unknown_field_and_code_tables(llama):
    with pytest.raises(ConfigError, match=r"HQQConfig has no field 'dtype'.*valid fields: bits, group_size, sym"):
        HQQConfig(dtype="nf4")
    config = HQQConfig(group_size=32)
    config.dtype = "nf4"
    with pytest.raises(ConfigError, match=r"HQQConfig\.dtype='nf4' is not valid; valid: 'int'"):
        pt2q.quantize(llama.model, config, example_inputs=llama.kwargs, progress=False)


def test_default_group_size_is_64_and_too_wide_for_the_tiny_llama(llama):
    assert HQQConfig().group_size == 64 and HQQConfig().weight_format().sym is False
    snapshot = ModelSnapshot(llama.model)
    with pytest.raises(ConfigError, match=r"HQQConfig\.group_size=64 is larger than layer "
                                          r"'model\.layers\.0\.self_attn\.q_proj''s 32 input"):
        pt2q.quantize(llama.model, HQQConfig(), example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()


def test_registered_and_accepted_by_set_local():
    from pt2q.config import CONFIG_KINDS, config_class

    from pt2q.dynamo_backend import BackendOptions

    assert CONFIG_KINDS["hqq"] is HQQConfig and config_class("HQQConfig") is HQQConfig
    # calibration-free and per layer: the torch.compile backend can run it on each Dynamo subgraph
    assert isinstance(BackendOptions.parse({"mode": "hqq"}).quant_config(), HQQConfig)
    assert BackendOptions.parse({"config": HQQConfig(bits=3)}).mode == "hqq"
    assert HQQConfig().needs_calibration is False
    with pytest.raises(ConfigError, match=r"takes .*HQQConfig.* or None per layer"):
        RTNConfig().set_local(".*", pt2q.DynamicQuantConfig())


# -- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_float_zero_points(llama, tmp_path):
    qmodel = pt2q.quantize(llama.model, HQQConfig(bits=4, group_size=32), example_inputs=llama.kwargs,
                           progress=False)
    pt2q.save(qmodel, tmp_path / "hqq.pt2")
    loaded = pt2q.load(tmp_path / "hqq.pt2")
    assert count_of(loaded, DEQUANTIZE_WEIGHT) == 14
    for name, node in dequantize_nodes(loaded).items():
        original = dequantize_nodes(qmodel)[name]
        for index in (0, 1, 2):
            assert torch.equal(get_constant(loaded, node.args[index]), get_constant(qmodel, original.args[index]))
        assert get_constant(loaded, node.args[2]).dtype == torch.float32
    for batch in [llama.kwargs, *token_batches(2, seed=4)]:
        assert torch.equal(call(loaded, kwargs=batch).logits, call(qmodel, kwargs=batch).logits)

"""pt2q.backends.habana.lower: FP8 Q/DQ graphs -> Gaudi's cast_to_fp8_v2 / fp8_gemm_v2 / cast_from_fp8.

Graphs come from two sources: Q/DQ graphs written here by hand on a capture (the quantizer's contract:
quantize_fp8 / dequantize_fp8 pairs, float8 weight constants, linear / matmul / bmm), which also build
cases the quantizer does not produce (a GEMM with one FP8 operand, weights cast for another device), and
real models quantized with pt2q.FP8Config.

Tolerance: none. The lowered graph is compared with torch.equal against the Q/DQ graph (the casts
multiply by the same float32 reciprocal and round alike, the GEMM runs the same ATen op on the same
dequantized operands), except the bf16 model: its Q/DQ linear runs in bf16, the GEMM in float32 with one
rounding to bf16, so they may differ by one bf16 rounding (2**-8 relative) of the output.
The test on Habana hardware compares the HPU graph with the CPU reference graph: casts bit for bit, the
outputs to 1e-3 relative (the card's float32 accumulation order differs from the CPU's).
"""
from __future__ import annotations

import io
import operator

import pytest
import torch

import pt2q
from pt2q import fp8, meta
from pt2q.backends import habana
from pt2q.backends.habana import LowerToHabana, hpu_unavailable_reason
from pt2q.errors import BackendUnavailable, ConfigError, DeviceError
from pt2q.graph import add_constant, get_constant
from pt2q.ops import CHOOSE_FP8_SCALE, DEQUANTIZE_FP8, QUANTIZE_FP8
from pt2q.passes.manager import PassManager
from tests.conftest import rel_error

aten = torch.ops.aten
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMAT_NAMES = {E4M3: "e4m3", E5M2: "e5m2"}
GEMMS = (aten.linear.default, aten.matmul.default, aten.bmm.default)
FP8_QDQ = (QUANTIZE_FP8, DEQUANTIZE_FP8)
HPU_UNAVAILABLE = hpu_unavailable_reason()


class Attention(torch.nn.Module):
    """Linear layers with and without bias, an attention matmul and a bmm, a residual."""

    def __init__(self, width=16, out=8):
        super().__init__()
        self.query = torch.nn.Linear(width, width)
        self.key = torch.nn.Linear(width, width, bias=False)
        self.out = torch.nn.Linear(width, out)

    def forward(self, x):
        query, key = self.query(x), self.key(x)
        scores = torch.matmul(query, key.transpose(-1, -2))
        mixed = torch.bmm(torch.softmax(scores, dim=-1), query)
        return self.out(mixed + x)


def example(batch=2, seq=5, width=16, seed=0):
    return torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Attention().eval()


def outputs(model, x):
    with torch.no_grad():
        result = model(x)
    return result if isinstance(result, (tuple, list)) else (result,)


def assert_identical(lowered, qmodel, x):
    for actual, expected in zip(outputs(lowered, x), outputs(qmodel, x)):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def count(gm, *wanted):
    return sum(target in wanted for target in targets(gm))


def reference_ops(device):
    namespace = getattr(torch.ops, f"pt2q_{device}")
    return {name: getattr(namespace, name).default for name in ("cast_to_fp8_v2", "cast_from_fp8", "fp8_gemm_v2")}


# -- Q/DQ graphs by hand -------------------------------------------------------------------------------
def hand_qdq(model, x, *, device="gaudi2", dtype=E4M3, dynamic=False, per_channel=True, weight_device=None,
             fp8_operands=None, record=True):
    """A capture of `model` with the FP8 quantizer's Q/DQ form written in by hand: every linear's input
    and weight, both inputs of every matmul / bmm (`fp8_operands` narrows that to some argument
    positions per GEMM target). Static activation scales are fixed (not calibrated; any scale works for
    comparing two graphs); weights are scaled to reach the full scale, of `weight_device` when given (a
    graph whose weights were cast for another device)."""
    gm = pt2q.capture(model, (x,))
    graph = gm.graph
    saturation = fp8.full_scale(dtype, device)
    input_scale = 11.3 / saturation  # static: |x| > 11.3 saturates
    weight_saturation = fp8.full_scale(dtype, weight_device or device)
    pairs = {}

    def activation_pair(source, before):
        if source not in pairs:
            with graph.inserting_before(before):
                if dynamic:
                    scale = graph.call_function(CHOOSE_FP8_SCALE, (source, saturation))
                else:
                    scale = graph.get_attr(add_constant(gm, "input_scale", torch.tensor(input_scale)))
                quantized = graph.call_function(QUANTIZE_FP8, (source, scale, dtype, saturation))
                pairs[source] = graph.call_function(DEQUANTIZE_FP8, (quantized, scale, torch.float32))
        return pairs[source]

    def dequantized_weight(weight_node, before):
        weight = get_constant(gm, weight_node).detach()
        amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
        scale = amax / weight_saturation  # the largest weight lands on the full scale
        stored = fp8.quantize(weight, scale, dtype, weight_saturation)
        with graph.inserting_before(before):
            weight_fp8 = graph.get_attr(add_constant(gm, "weight_fp8", stored))
            scale_node = graph.get_attr(add_constant(gm, "weight_scale", scale))
            return graph.call_function(DEQUANTIZE_FP8, (weight_fp8, scale_node, torch.float32))

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in GEMMS:
            continue
        positions = (fp8_operands or {}).get(node.target, (0, 1))
        args = list(node.args)
        for position in positions:
            if node.target is aten.linear.default and position == 1:
                args[1] = dequantized_weight(args[1], node)
            else:
                args[position] = activation_pair(args[position], node)
        node.args = tuple(args)
    for node in list(graph.find_nodes(op="get_attr")):  # the float weights the float8 copies replaced
        if not node.users:
            graph.erase_node(node)
    gm.recompile()
    if record:
        gm.meta[meta.FP8] = {"device": device, "dtype": FORMAT_NAMES[dtype]}
    return gm


def fp8_quantized(model, x, **config):
    config.setdefault("quantize_attention_matmul", True)
    calibration = [(example(seed=seed).to(x.dtype),) for seed in range(3)]
    return pt2q.quantize(model, pt2q.FP8Config(**config), None if config.get("activation") == "dynamic"
                         else calibration, example_inputs=(x,), progress=False)


# -- what the lowered graph holds ------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_only_hpu_ops_remain_at_quantized_layers(dynamic):
    x = example()
    qmodel = hand_qdq(make_model(), x, dynamic=dynamic)
    float_ops = set(targets(pt2q.capture(make_model(), (x,)))) - set(GEMMS)
    quantize_nodes = count(qmodel, QUANTIZE_FP8)
    # 3 linear + matmul + bmm; pairs shared like the quantizer's: x by two linears, query by matmul and bmm
    assert count(qmodel, *GEMMS) == 5 and quantize_nodes == 5

    lowered = habana.lower(qmodel)
    ops = reference_ops("gaudi2")
    assert count(lowered, ops["fp8_gemm_v2"]) == 5
    assert count(lowered, ops["cast_to_fp8_v2"]) == quantize_nodes
    assert count(lowered, *GEMMS, *FP8_QDQ, ops["cast_from_fp8"]) == 0
    assert count(lowered, CHOOSE_FP8_SCALE) == (quantize_nodes if dynamic else 0)
    assert count(lowered, aten.reciprocal.default) == (quantize_nodes if dynamic else 0)
    hpu_style = {*ops.values(), operator.getitem, aten.reciprocal.default, CHOOSE_FP8_SCALE}
    assert set(targets(lowered)) - float_ops <= hpu_style
    gemms = lowered.graph.find_nodes(op="call_function", target=ops["fp8_gemm_v2"])
    linears = [gemm for gemm in gemms if gemm.args[3] is True]  # trans_B: a linear's [out, in] weight
    assert len(linears) == 3
    for linear in linears:  # per-channel weight scales in the HPU form: [out], B_scale_shape [out]
        weight, scale = get_constant(lowered, linear.args[2]), get_constant(lowered, linear.args[7])
        assert weight.dtype is E4M3 and scale.shape == (weight.shape[0],) and linear.args[10] == [weight.shape[0]]
    for gemm in gemms:
        for operand in (gemm.args[0], gemm.args[2]):  # float8: a float8 constant, or output 0 of a cast
            if get_constant(lowered, operand) is None:
                assert operand.target is operator.getitem and operand.args[0].target is ops["cast_to_fp8_v2"]
                assert operand.args[1] == 0


def test_gemm_with_one_fp8_operand_stays_and_its_pair_becomes_casts():
    x = example()
    qmodel = hand_qdq(make_model(), x, fp8_operands={aten.matmul.default: (0,)})
    lowering = LowerToHabana("gaudi2")
    lowered, records = PassManager([lowering])(hand_qdq(make_model(), x, fp8_operands={aten.matmul.default: (0,)}))
    ops = reference_ops("gaudi2")
    assert count(lowered, aten.matmul.default) == 1 and count(lowered, ops["fp8_gemm_v2"]) == 4
    assert count(lowered, ops["cast_from_fp8"]) == 1 and count(lowered, *FP8_QDQ) == 0
    matmul = next(n for n in lowered.graph.nodes if n.target is aten.matmul.default)
    assert matmul.args[0].target is ops["cast_from_fp8"]
    assert list(lowering.report.kept) == [matmul.name] and "only one operand" in lowering.report.kept[matmul.name]
    assert lowering.report.counts() == {"fp8_gemm_v2": 4, "cast_from_fp8": 1,
                                        "cast_to_fp8_v2": count(qmodel, QUANTIZE_FP8)}
    assert records[0].name == "lower_to_habana" and records[0].modified
    assert "4 fp8_gemm_v2" in lowering.report.summary()
    assert_identical(lowered, qmodel, x * 20)


# -- numerics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["gaudi2", "gaudi3"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_lowered_graph_equals_the_qdq_graph_bit_for_bit(device, dtype, dynamic, per_channel):
    x = example()
    qmodel = hand_qdq(make_model(), x, device=device, dtype=dtype, dynamic=dynamic, per_channel=per_channel)
    lowered = habana.lower(qmodel)
    assert count(lowered, reference_ops(device)["fp8_gemm_v2"]) == 5
    for test_input in (x, example(seed=1) * 40):  # the second saturates the static casts
        assert_identical(lowered, qmodel, test_input)
    if not dynamic:
        assert_saturates(lowered, example(seed=1) * 40, fp8.full_scale(dtype, device))


def assert_saturates(lowered, x, full_scale):
    """At least one cast in `lowered` reaches the full scale on `x` (the comparison covered saturation)."""
    casts = [n for n in lowered.graph.nodes if n.op == "call_function" and "cast_to_fp8_v2" in str(n.target)]
    recorded = {}
    probe = torch.fx.Interpreter(lowered)
    original_run_node = probe.run_node

    def run_node(node):
        value = original_run_node(node)
        if node in casts:
            recorded[node.name] = value[0].to(torch.float32).abs().max().item()
        return value

    probe.run_node = run_node
    with torch.no_grad():
        probe.run(x)
    assert max(recorded.values()) == full_scale, recorded


@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("device", ["gaudi2", "gaudi3"])
def test_real_fp8_model_lowers_to_identical_numbers(activation, device):
    x = example()
    config = {"device": device, "activation": activation}
    qmodel = fp8_quantized(make_model(), x, **config)
    quantized_gemms = count(qmodel, *GEMMS)
    lowered = habana.lower(qmodel)
    ops = reference_ops(device)
    assert count(lowered, *FP8_QDQ, *GEMMS) == 0
    assert count(lowered, ops["fp8_gemm_v2"]) == quantized_gemms == 5
    for test_input in (x, example(seed=4) * 30):
        assert_identical(lowered, qmodel, test_input)


def test_float_layers_of_a_real_model_stay_float():
    x = example()
    config = pt2q.FP8Config(device="gaudi3", quantize_attention_matmul=True).set_local(r"out", None)
    qmodel = pt2q.quantize(make_model(), config, [(x,)], example_inputs=(x,), progress=False)
    lowered = habana.lower(qmodel)
    assert count(lowered, aten.linear.default) == 1  # `out`, kept in float
    assert count(lowered, reference_ops("gaudi3")["fp8_gemm_v2"]) == 4
    assert count(lowered, *FP8_QDQ) == 0
    assert_identical(lowered, qmodel, x * 3)


def test_bf16_model_lowers_within_one_bf16_rounding():
    x = example().to(torch.bfloat16)
    model = make_model().to(torch.bfloat16)
    qmodel = fp8_quantized(model, x, device="gaudi2", quantize_attention_matmul=False)
    lowered = habana.lower(qmodel)
    gemms = lowered.graph.find_nodes(op="call_function", target=reference_ops("gaudi2")["fp8_gemm_v2"])
    assert len(gemms) == 3 and all(gemm.args[5] is torch.bfloat16 for gemm in gemms)
    for test_input in (x, (example(seed=5) * 10).to(torch.bfloat16)):
        (actual,), (expected,) = outputs(lowered, test_input), outputs(qmodel, test_input)
        assert actual.dtype is torch.bfloat16
        assert ((actual.float() - expected.float()).abs() <= 2 ** -8 * expected.float().abs() + 1e-6).all()


# -- export, save, load -----------------------------------------------------------------------------------
def test_lowered_graph_exports_and_round_trips_through_torch_export(tmp_path):
    x = example()
    qmodel = fp8_quantized(make_model(), x, device="gaudi2")
    lowered = habana.lower(qmodel)
    exported = torch.export.export(lowered, (x,))
    path = tmp_path / "lowered.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path).module()
    assert count(loaded, reference_ops("gaudi2")["fp8_gemm_v2"]) == 5
    assert_identical(loaded, qmodel, example(seed=6) * 10)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_lowered_graph_round_trips_through_pt2q_save_and_load(tmp_path, dynamic):
    x = example()
    calibration = [(example(seed=seed),) for seed in range(3)]
    config = pt2q.FP8Config(device="gaudi3", activation="dynamic" if dynamic else "static",
                            quantize_attention_matmul=True)
    qmodel = pt2q.quantize(make_model(), config, None if dynamic else calibration, example_inputs=(x,),
                           dynamic_shapes="batch", progress=False)
    lowered = habana.lower(qmodel)
    path = tmp_path / "lowered.pt2"
    pt2q.save(lowered, path)
    loaded = pt2q.load(path)
    names = {str(target) for target in targets(loaded)}
    assert "pt2q_gaudi3.fp8_gemm_v2.default" in names and "pt2q_gaudi3.cast_to_fp8_v2.default" in names
    assert not any(name.startswith("pt2q.quantize_fp8") or name.startswith("pt2q.dequantize_fp8") for name in names)
    assert_identical(loaded, qmodel, example(batch=7, seed=7) * 10)  # another batch size: dynamic shapes


def test_a_saved_qdq_model_lowers_after_pt2q_load(tmp_path):
    """Quantize here, load on the Gaudi host, lower there: the device is given (a loaded graph need not
    carry meta['pt2q_fp8']) and checked against the graph."""
    x = example()
    qmodel = fp8_quantized(make_model(), x, device="gaudi2", activation="dynamic")
    pt2q.save(qmodel, tmp_path / "qdq.pt2")
    loaded = pt2q.load(tmp_path / "qdq.pt2")
    with pytest.raises(ConfigError, match=r"quantize it again with pt2q.FP8Config\(device='gaudi3'\)"):
        habana.lower(loaded, device="gaudi3")
    lowered = habana.lower(loaded, device="gaudi2")
    assert count(lowered, *FP8_QDQ) == 0 and count(lowered, reference_ops("gaudi2")["fp8_gemm_v2"]) == 5
    assert_identical(lowered, qmodel, x * 7)


def test_torch_export_load_of_an_archive_written_by_hand_works_with_the_ops_imported():
    x = example()
    lowered = habana.lower(hand_qdq(make_model(), x, device="gaudi3", dynamic=True))
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(lowered, (x,)), buffer)
    buffer.seek(0)
    assert_identical(torch.export.load(buffer).module(), lowered, x)


# -- devices ---------------------------------------------------------------------------------------------
def test_device_defaults_to_the_quantized_one():
    x = example()
    lowered = habana.lower(fp8_quantized(make_model(), x, device="gaudi3"))
    assert count(lowered, reference_ops("gaudi3")["fp8_gemm_v2"]) == 5


@pytest.mark.parametrize("quantized_for, lowered_for", [("gaudi3", "gaudi2"), ("gaudi2", "gaudi3")])
def test_another_full_scale_than_the_quantized_one_is_refused(quantized_for, lowered_for):
    x = example()
    qmodel = fp8_quantized(make_model(), x, device=quantized_for)
    with pytest.raises(ConfigError, match=rf"quantize it again with pt2q.FP8Config\(device='{lowered_for}'\)"):
        habana.lower(qmodel, device=lowered_for)
    del qmodel.meta[meta.FP8]  # no record: the quantize nodes' saturation still tells
    with pytest.raises(ConfigError, match=r"node 'quantize_fp8\w*' \(pt2q.quantize_fp8, E4M3\) saturates at"):
        habana.lower(qmodel, device=lowered_for)


def test_e5m2_saturates_alike_on_both_devices():
    x = example()
    qmodel = fp8_quantized(make_model(), x, device="gaudi2", dtype="e5m2")
    lowered = habana.lower(qmodel, device="gaudi3")
    assert count(lowered, reference_ops("gaudi3")["fp8_gemm_v2"]) == 5
    assert_identical(lowered, qmodel, x * 100)


def test_a_generic_model_lowers_for_the_device_with_its_full_scale():
    x = example()
    qmodel = hand_qdq(make_model(), x, device="generic")  # E4M3 saturating at 448, like Gaudi3
    with pytest.raises(ConfigError, match="quantized for device='generic'; pass lower"):
        habana.lower(qmodel)
    with pytest.raises(ConfigError, match=r"generic \(E4M3 full scale 448.0\), but device='gaudi2' saturates at 240"):
        habana.lower(qmodel, device="gaudi2")
    lowered = habana.lower(qmodel, device="gaudi3")
    assert count(lowered, reference_ops("gaudi3")["fp8_gemm_v2"]) == 5
    assert_identical(lowered, qmodel, x * 30)


def test_weights_cast_for_another_device_are_refused():
    x = example()
    qmodel = hand_qdq(make_model(), x, device="gaudi2", weight_device="gaudi3", record=False)
    with pytest.raises(ConfigError, match=r"FP8 constant 'weight_fp8\w*' .* holds 448.0, beyond gaudi2's E4M3 full "
                                          r"scale 240.0"):
        habana.lower(qmodel, device="gaudi2")


def test_bad_devices_and_graphs_are_refused_with_what_to_do():
    x = example()
    qmodel = hand_qdq(make_model(), x, record=False)
    with pytest.raises(DeviceError, match=r"device='gaudi4' is not valid; valid: 'gaudi2', 'gaudi3'"):
        habana.lower(qmodel, device="gaudi4")
    with pytest.raises(ConfigError, match=r"does not record the device .* pass lower\(\.\.\., device="):
        habana.lower(qmodel)
    with pytest.raises(ConfigError, match="ops='cuda' is not valid"):
        habana.lower(qmodel, device="gaudi2", ops="cuda")
    with pytest.raises(ConfigError, match="no pt2q.quantize_fp8 / dequantize_fp8 node"):
        habana.lower(pt2q.capture(make_model(), (x,)), device="gaudi2")
    with pytest.raises(ConfigError, match="got a Attention"):
        habana.lower(make_model(), device="gaudi2")


# -- the caller's model -------------------------------------------------------------------------------------
def test_the_callers_model_is_left_as_it_was():
    x = example()
    qmodel = fp8_quantized(make_model(), x, device="gaudi2")
    code, meta_keys = qmodel.code, set(qmodel.meta)
    state = {name: (tensor.clone(), tensor.data_ptr()) for name, tensor in qmodel.state_dict().items()}
    before = outputs(qmodel, x)
    lowered = habana.lower(qmodel)
    assert lowered is not qmodel and qmodel.code == code and set(qmodel.meta) == meta_keys
    assert count(qmodel, *FP8_QDQ) > 0
    after = qmodel.state_dict()
    assert after.keys() == state.keys()
    for name, (tensor, pointer) in state.items():
        assert torch.equal(after[name], tensor) and after[name].data_ptr() == pointer, name
    lowered_state = lowered.state_dict()
    assert not any(lowered_state[name].data_ptr() == pointer for name, (_, pointer) in state.items()
                   if name in lowered_state)  # the lowered model owns its tensors
    for a, b in zip(outputs(qmodel, x), before):
        assert torch.equal(a, b)


def test_inplace_rewrites_the_given_model():
    x = example()
    qmodel = fp8_quantized(make_model(), x, device="gaudi2")
    expected = outputs(qmodel, x)
    lowered = habana.lower(qmodel, inplace=True)
    assert lowered is qmodel and count(qmodel, *FP8_QDQ) == 0
    for a, b in zip(outputs(lowered, x), expected):
        assert torch.equal(a, b)


# -- the HPU path --------------------------------------------------------------------------------------------
@pytest.mark.skipif(HPU_UNAVAILABLE is None, reason="Habana's bridge imports here: the HPU path is taken")
def test_without_habana_auto_takes_the_reference_ops_and_hpu_is_refused():
    x = example()
    qmodel = hand_qdq(make_model(), x)
    lowered = habana.lower(qmodel, ops="auto")
    assert count(lowered, reference_ops("gaudi2")["fp8_gemm_v2"]) == 5
    with pytest.raises(BackendUnavailable, match=r"ops='hpu' needs Habana's PyTorch bridge, but "
                                                 r"habana_frameworks.torch does not import .* ops='reference'"):
        habana.lower(qmodel, ops="hpu")


@pytest.mark.skipif(HPU_UNAVAILABLE is not None, reason=f"needs a Gaudi and Habana's bridge: {HPU_UNAVAILABLE}")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_on_gaudi_the_lowered_graph_calls_torch_ops_hpu(dynamic):
    import habana_frameworks.torch.hpu as hthpu

    from tests.backends.test_habana_ops import probe_values

    device = "gaudi3" if "GAUDI3" in hthpu.get_device_name().upper() else "gaudi2"
    x = example()
    qmodel = hand_qdq(make_model(), x, device=device, dynamic=dynamic)
    on_hpu = habana.lower(qmodel, ops="hpu")
    reference = habana.lower(qmodel, ops="reference")
    hpu_ops = {getattr(torch.ops.hpu, name).default for name in ("cast_to_fp8_v2", "fp8_gemm_v2")}
    assert count(on_hpu, *hpu_ops) == 5 + count(qmodel, QUANTIZE_FP8)
    assert count(on_hpu, *reference_ops(device).values()) == 0
    for dtype in (E4M3, E5M2):  # the emulated cast is the card's, bit for bit
        values = probe_values(dtype, fp8.full_scale(dtype, device))
        card = torch.ops.hpu.cast_to_fp8_v2(values.to("hpu"), None, False, False, dtype)[0].cpu()
        emulated = reference_ops(device)["cast_to_fp8_v2"](values, None, False, False, dtype)[0]
        assert torch.equal(card.view(torch.uint8), emulated.view(torch.uint8))
    on_hpu = on_hpu.to("hpu")
    for test_input in (x, example(seed=8) * 40):
        with torch.no_grad():
            actual = on_hpu(test_input.to("hpu")).cpu()
        assert rel_error(actual, outputs(reference, test_input)[0]) <= 1e-3

"""AutoRound: the trainable rounding (pt2q.algorithms.autoround) and AutoRoundConfig through pt2q.quantize.

On the tiny zoo llama (2 decoder blocks, 7 linears each): iters=0 is round to nearest bit for bit; training
lowers every block's output error below RTN's and the model's; a seed fixes the result; the options that
change how it trains (n_blocks, low_mem, use_quant_input, amp, optimizers, dynamic_max_gap, seqlen) do what
they say; bad fields and too few samples are refused with the user's model unchanged.
"""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import AutoRoundConfig, CalibrationError, ConfigError, RTNConfig
from pt2q.algorithms.autoround import RoundingParameters, Sampler, TuneSettings, round_ste, tune
from pt2q.algorithms.rtn import WeightFormat, rtn_quantize
from pt2q.api import WEIGHT_ONLY_REPORT_KEY
from pt2q.graph import get_constant
from pt2q.ops import DEQUANTIZE_WEIGHT
from tests.conftest import ModelSnapshot, call, rel_error
from tests.models import VOCAB_SIZE, build

FORMATS = [WeightFormat(4, 32, True), WeightFormat(3, 32, False), WeightFormat(4, 16, True, full_range=True),
           WeightFormat(4, -1, False), WeightFormat(4, 8, True, group_dim=0)]


def token_batches(count: int, seed: int, length: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB_SIZE, (2, length), generator=gen),
             "attention_mask": torch.ones(2, length, dtype=torch.long)} for _ in range(count)]


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def calib():
    return token_batches(6, seed=0)


def packed_weights(qmodel) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per dequantize node: its packed codes, scales and zero points."""
    result = {}
    for node in qmodel.graph.nodes:
        if node.op == "call_function" and node.target is DEQUANTIZE_WEIGHT:
            parts = [get_constant(qmodel, a) if isinstance(a, torch.fx.Node) else a for a in node.args[:3]]
            result[node.name] = tuple(p.clone() if isinstance(p, torch.Tensor) else p for p in parts)
    return result


def same_weights(a, b) -> bool:
    wa, wb = packed_weights(a), packed_weights(b)
    return wa.keys() == wb.keys() and all(
        all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in zip(wa[k], wb[k])) for k in wa)


def logits(model, kwargs):
    out = call(model, kwargs=kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


_CAPTURES = {}


def quantize(llama, config, calib):
    """pt2q.quantize on one shared capture of the llama (a capture is copied, not exported again)."""
    if id(llama) not in _CAPTURES:
        _CAPTURES[id(llama)] = pt2q.capture(llama.model, (), llama.kwargs)
    return pt2q.quantize(_CAPTURES[id(llama)], config, calib, progress=False)


def findings(qmodel) -> dict:
    return qmodel.meta[WEIGHT_ONLY_REPORT_KEY].findings["autoround"]


# -- the trainable rounding of one weight -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f.bits}g{f.group_size}{'s' if f.sym else 'a'}"
                         f"{'_full' if f.full_range else ''}_d{f.group_dim}")
def test_untrained_rounding_is_round_to_nearest(fmt):
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    weight[3] = 0  # an all-zero row: scale 1
    rounding = RoundingParameters(weight, fmt)
    expected = rtn_quantize(weight, fmt)
    got = rounding.quantized()
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)
    assert (got.zero_point is None) == (expected.zero_point is None)
    if got.zero_point is not None:
        assert torch.equal(got.zero_point, expected.zero_point)
    assert torch.equal(rounding.fake_quantized().detach(), expected.dequantize())


def test_trained_offsets_change_the_codes_and_match_the_fake_quantized_weight():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    fmt = WeightFormat(4, 32, False)
    rounding = RoundingParameters(weight, fmt)
    with torch.no_grad():
        rounding.value.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
        rounding.min_scale.fill_(0.9)
        rounding.max_scale.fill_(0.8)
    got = rounding.quantized()
    assert not torch.equal(got.codes, rtn_quantize(weight, fmt).codes)
    assert torch.equal(got.dequantize(), rounding.fake_quantized().detach())


def test_round_ste_passes_the_gradient_straight_through():
    x = torch.tensor([0.2, 0.7, -1.4], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.0, 1.0, -1.0])) and torch.equal(x.grad, torch.ones(3))


def test_clamp_keeps_offsets_and_range_factors_in_bounds():
    rounding = RoundingParameters(torch.randn(4, 8), WeightFormat(4, 8, True))
    with torch.no_grad():
        rounding.value.fill_(3.0)
        rounding.min_scale.fill_(-1.0)
        rounding.max_scale.fill_(2.0)
    rounding.clamp_()
    assert rounding.value.max() == 0.5 and rounding.min_scale.min() == 0.0 and rounding.max_scale.max() == 1.0


def linear_problem(seed: int = 0):
    """A least-squares problem: the quantized weight's output on fixed inputs against the float output."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, 64, generator=gen)
    inputs = [torch.randn(16, 64, generator=gen) for _ in range(8)]
    targets = [x @ weight.t() for x in inputs]

    def loss_of(indices, weights):
        return sum(torch.nn.functional.mse_loss(inputs[i] @ weights["w"].t(), targets[i]) for i in indices) / len(indices)

    return weight, loss_of


@pytest.mark.parametrize("optimizer", ["sign_sgd", "adam", "adamw"])
def test_tune_lowers_the_loss_below_round_to_nearest(optimizer):
    weight, loss_of = linear_problem()
    rounding = {"w": RoundingParameters(weight, WeightFormat(3, 32, True))}
    lr = None if optimizer == "sign_sgd" else 5e-3
    result = tune(rounding, loss_of, 8, TuneSettings(iters=60, batch_size=4, optimizer=optimizer, lr=lr), progress=False)
    # measured: 0.0376 -> 0.0290 (sign_sgd), 0.0286 (adam / adamw)
    assert result.final_loss < 0.9 * result.initial_loss
    assert result.iterations == 60 and len(result.losses) == 60


def test_tune_keeps_the_best_iterate_unless_not_use_mse():
    """A loss that grows with every call (a constant added per call, no gradient): the best iterate is the
    first, measured before any update, so the weights kept are round to nearest's; not_use_mse keeps the last."""
    weight, loss_of = linear_problem(1)
    fmt = WeightFormat(3, 32, True)
    calls = []

    def growing(indices, weights):
        calls.append(1)
        return loss_of(indices, weights) + float(len(calls))

    settings = dict(iters=10, batch_size=8, sampler="fix")
    kept = {"w": RoundingParameters(weight, fmt)}
    result = tune(kept, growing, 8, TuneSettings(**settings), progress=False)
    assert result.best_iteration == 0 and result.losses == sorted(result.losses)
    assert torch.equal(kept["w"].quantized().codes, rtn_quantize(weight, fmt).codes)
    last = {"w": RoundingParameters(weight, fmt)}
    tune(last, growing, 8, TuneSettings(**settings, not_use_mse=True), progress=False)
    assert not torch.equal(last["w"].quantized().codes, rtn_quantize(weight, fmt).codes)


def test_dynamic_max_gap_stops_without_improvement():
    weight, loss_of = linear_problem(1)
    result = tune({"w": RoundingParameters(weight, WeightFormat(3, 32, True))}, loss_of, 8,
                  TuneSettings(iters=200, batch_size=8, sampler="fix", lr=0.4, minmax_lr=0.4, dynamic_max_gap=5),
                  progress=False)
    assert result.iterations < 200 and result.iterations - 1 - result.best_iteration == 5


def test_samplers():
    fixed = Sampler(TuneSettings(batch_size=3, sampler="fix"), 5)
    assert [fixed.next() for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    drawn = Sampler(TuneSettings(batch_size=2, seed=1), 6)
    epochs = [sorted(sum((drawn.next() for _ in range(3)), [])) for _ in range(4)]
    assert all(epoch == list(range(6)) for epoch in epochs)     # each epoch sees every sample once
    uneven = Sampler(TuneSettings(batch_size=4, seed=2), 6)
    steps = [uneven.next() for _ in range(30)]
    assert all(len(set(step)) == 4 for step in steps) and len({tuple(s) for s in steps}) > 1
    assert Sampler(TuneSettings(batch_size=9), 5).next().__len__() == 5
    again = Sampler(TuneSettings(batch_size=4, seed=2), 6)
    assert [again.next() for _ in range(30)] == steps


# -- through pt2q.quantize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [dict(bits=4, group_size=32), dict(bits=3, group_size=16, sym=False),
                                    dict(bits=4, group_size=32, full_range=False)])
def test_iters_zero_equals_rtn_exactly(llama, calib, fields):
    config = AutoRoundConfig(**fields, iters=0)
    autoround = quantize(llama, config, calib)
    rtn = quantize(llama, RTNConfig(**{**fields, "full_range": config.full_range}), calib)
    assert len(packed_weights(autoround)) == 14
    assert same_weights(autoround, rtn)
    torch.testing.assert_close(logits(autoround, llama.kwargs), logits(rtn, llama.kwargs), rtol=0, atol=0)


def test_training_lowers_each_block_error_and_the_model_error_below_rtn(llama, calib):
    snapshot = ModelSnapshot(llama.model)
    config = AutoRoundConfig(bits=3, group_size=16, iters=40, batch_size=2)
    qmodel = pt2q.quantize(llama.model, config, calib, example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()
    blocks = findings(qmodel)
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    for block in blocks.values():
        assert block["final_loss"] < 0.9 * block["initial_loss"]   # initial: round to nearest's loss
        assert len(block["layers"]) == 7
    rtn = quantize(llama, RTNConfig(bits=3, group_size=16), calib)
    reference = [logits(llama.model, b) for b in calib]
    ours = sum(rel_error(logits(qmodel, b), r) for b, r in zip(calib, reference))
    theirs = sum(rel_error(logits(rtn, b), r) for b, r in zip(calib, reference))
    assert ours < 0.9 * theirs    # measured: 0.79x


def test_the_same_seed_gives_the_same_weights(llama, calib):
    config = dict(bits=4, group_size=32, iters=8, batch_size=2)
    first = quantize(llama, AutoRoundConfig(**config, seed=3), calib)
    again = quantize(llama, AutoRoundConfig(**config, seed=3), calib)
    other = quantize(llama, AutoRoundConfig(**config, seed=4), calib)
    assert same_weights(first, again)
    assert not same_weights(first, other)


def test_low_mem_spills_to_disk_with_the_same_result(llama, calib, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    config = dict(bits=4, group_size=32, iters=6, batch_size=2, use_quant_input=False)
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (saved.append(str(path)), real_save(obj, path, *a, **k)))
    on_disk = quantize(llama, AutoRoundConfig(**config, low_mem=True), calib)
    monkeypatch.setattr(torch, "save", real_save)
    in_memory = quantize(llama, AutoRoundConfig(**config), calib)
    assert same_weights(on_disk, in_memory)
    assert saved and all(p.startswith(str(tmp_path)) for p in saved)
    assert not list(tmp_path.iterdir())   # the temporary directories are gone


def test_n_blocks_trains_consecutive_blocks_as_one(llama, calib):
    qmodel = quantize(llama, AutoRoundConfig(bits=4, group_size=32, iters=6, batch_size=2, n_blocks=2), calib)
    (unit,) = findings(qmodel).values()
    assert list(findings(qmodel)) == ["model.layers.0+model.layers.1"] and len(unit["layers"]) == 14


@pytest.mark.parametrize("fields", [dict(use_quant_input=False), dict(amp=True), dict(enable_minmax_tuning=False),
                                    dict(optimizer="adamw", lr=2e-3), dict(gradient_accumulate_steps=2, sampler="fix")])
def test_training_options_still_lower_the_block_loss(llama, calib, fields):
    qmodel = quantize(llama, AutoRoundConfig(bits=3, group_size=16, iters=20, batch_size=2, **fields), calib)
    for block in findings(qmodel).values():
        assert block["final_loss"] < block["initial_loss"]


def test_padded_positions_are_left_out_of_the_loss(llama, calib):
    """Right-padded batches (attention_mask 0 on the last positions) that differ only in the padded token
    ids: the causal llama's outputs differ only at padded positions, which the loss skips - same weights
    and losses. Without a mask, the loss would see the difference."""
    def padded(ids_seed: int) -> list[dict]:
        batches = token_batches(4, seed=5)
        gen = torch.Generator().manual_seed(ids_seed)
        for batch in batches:
            batch["attention_mask"][:, -4:] = 0
            batch["input_ids"][:, -4:] = torch.randint(3, VOCAB_SIZE, (2, 4), generator=gen)
        return batches

    config = AutoRoundConfig(bits=3, group_size=16, iters=6, batch_size=2)
    first, second = quantize(llama, config, padded(1)), quantize(llama, config, padded(2))
    assert same_weights(first, second)
    losses = [[(block["initial_loss"], block["final_loss"]) for block in findings(q).values()] for q in (first, second)]
    assert losses[0] == losses[1]
    unmasked = [dict(b, attention_mask=torch.ones_like(b["attention_mask"])) for b in padded(1)]
    other = [dict(b, attention_mask=torch.ones_like(b["attention_mask"])) for b in padded(2)]
    a, b = quantize(llama, config, unmasked), quantize(llama, config, other)
    assert findings(a)["model.layers.0"]["initial_loss"] != findings(b)["model.layers.0"]["initial_loss"]


def test_set_local_mixes_autoround_with_other_layers(llama, calib):
    config = AutoRoundConfig(bits=4, group_size=32, iters=4, batch_size=2)
    config.set_local(r".*mlp\.down_proj", RTNConfig(bits=8, group_size=-1)).set_local(r".*o_proj", None)
    qmodel = quantize(llama, config, calib)
    layers = qmodel.meta[WEIGHT_ONLY_REPORT_KEY].layers
    algorithms = {info["module"].split(".")[-1]: (info["algorithm"], info["bits"]) for info in layers.values()}
    assert algorithms["down_proj"] == ("rtn", 8) and algorithms["q_proj"] == ("autoround", 4)
    assert "o_proj" not in algorithms and len(layers) == 12


def test_seqlen_cuts_a_dynamic_capture_and_refuses_a_static_one(llama):
    long_calib = token_batches(2, seed=1, length=20)
    dynamic = pt2q.capture(llama.model, (), long_calib[0], dynamic_shapes="batch_seq")
    config = AutoRoundConfig(bits=4, group_size=32, iters=2, batch_size=1, seqlen=8)
    qmodel = pt2q.quantize(dynamic, config, long_calib, progress=False)
    assert len(packed_weights(qmodel)) == 14
    with pytest.raises(ConfigError, match=r"AutoRoundConfig.seqlen=8.*static sequence length"):
        pt2q.quantize(llama.model, config, long_calib, example_inputs=long_calib[0], progress=False)


def test_trailing_padding_is_cut_on_a_dynamic_capture_without_changing_the_loss(llama):
    """Right-padded batches: on a capture with a dynamic sequence, each batch is cut to its longest row
    (the compute on padding is skipped); the round-to-nearest block losses are those of the static capture
    that runs the padding (the loss masks it), and training still lowers them."""
    batches = token_batches(3, seed=7, length=16)
    for batch, padding in zip(batches, (5, 9, 0)):
        if padding:
            batch["attention_mask"][:, -padding:] = 0
    batches[1]["attention_mask"][0, -9:-7] = 1    # row 0 is longer: the batch keeps 9 positions
    static = pt2q.capture(llama.model, (), batches[0])
    dynamic = pt2q.capture(llama.model, (), batches[0], dynamic_shapes="batch_seq")
    untrained = AutoRoundConfig(bits=3, group_size=16, iters=0, batch_size=1)
    full, cut = (pt2q.quantize(gm, untrained, batches, progress=False) for gm in (static, dynamic))
    report = cut.meta[WEIGHT_ONLY_REPORT_KEY].findings
    assert report["autoround_positions_kept"] == pytest.approx((2 * 11 + 2 * 9 + 2 * 16) / (3 * 2 * 16))
    assert full.meta[WEIGHT_ONLY_REPORT_KEY].findings["autoround_positions_kept"] == 1.0
    for name, block in findings(full).items():
        assert findings(cut)[name]["initial_loss"] == pytest.approx(block["initial_loss"], rel=1e-5)
    config = AutoRoundConfig(bits=3, group_size=16, iters=20, batch_size=1)
    trained_full, trained_cut = (pt2q.quantize(gm, config, batches, progress=False) for gm in (static, dynamic))
    for name, block in findings(trained_cut).items():
        assert block["final_loss"] < block["initial_loss"]
        # the same training up to rounding in the matmuls (seen here: 7 equal digits)
        assert block["final_loss"] == pytest.approx(findings(trained_full)[name]["final_loss"], rel=0.05)


def test_trim_padding_leaves_what_it_cannot_cut_exactly(llama):
    from pt2q.weight_only import _trim_padding

    padded = token_batches(1, seed=3, length=10)[0]
    padded["attention_mask"][:, -4:] = 0
    dynamic = pt2q.capture(llama.model, (), padded, dynamic_shapes="batch_seq")
    (cut,), share = _trim_padding(dynamic, [padded])
    assert cut["input_ids"].shape == (2, 6) and cut["attention_mask"].shape == (2, 6) and share == 0.6
    assert torch.equal(cut["input_ids"], padded["input_ids"][:, :6])
    static = pt2q.capture(llama.model, (), padded)
    result, share = _trim_padding(static, [padded])                    # its graph runs 10 positions only
    assert result[0] is padded and share == 1.0
    other = dict(padded, extra=torch.zeros(2, 10, 3))                  # a tensor laid out on the sequence
    assert _trim_padding(dynamic, [other])[0][0] is other
    short = dict(padded, attention_mask=torch.zeros_like(padded["attention_mask"]))
    assert _trim_padding(dynamic, [short])[0][0]["input_ids"].shape == (2, 2)  # a dynamic dim starts at 2


@pytest.mark.parametrize("fields, message", [
    (dict(iters=-1), r"AutoRoundConfig.iters=-1"), (dict(lr=0.0), r"AutoRoundConfig.lr=0.0"),
    (dict(minmax_lr=-1e-3), r"AutoRoundConfig.minmax_lr"), (dict(batch_size=0), r"AutoRoundConfig.batch_size=0"),
    (dict(sampler="random"), r"AutoRoundConfig.sampler='random'"), (dict(optimizer="sgd"), r"optimizer='sgd'"),
    (dict(dtype="nf4"), r"AutoRoundConfig.dtype='nf4'"), (dict(dynamic_max_gap=0), r"dynamic_max_gap=0"),
    (dict(n_blocks=0), r"n_blocks=0"), (dict(n_samples=0), r"n_samples=0"), (dict(seqlen=0), r"seqlen=0"),
    (dict(iters=1.5), r"iters=1.5"), (dict(lr=float("nan")), r"lr=nan"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        AutoRoundConfig(**fields)


def test_more_samples_than_the_data_is_refused_and_the_model_is_untouched(llama, calib):
    snapshot = ModelSnapshot(llama.model)
    with pytest.raises(CalibrationError, match=r"AutoRoundConfig.n_samples=7 but calib_data has 6 batches"):
        pt2q.quantize(llama.model, AutoRoundConfig(iters=2, group_size=32, n_samples=7), calib,
                      example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()


def test_a_non_finite_loss_stops_training_with_an_error_naming_the_block(llama, calib, monkeypatch):
    weight, loss_of = linear_problem()
    with pytest.raises(FloatingPointError, match="became nan at iteration 0"):
        tune({"w": RoundingParameters(weight, WeightFormat(4, 32, True))},
             lambda indices, weights: loss_of(indices, weights) * float("nan"), 8, TuneSettings(iters=3), progress=False)
    import pt2q.algorithms.autoround as autoround

    def diverging(*args, **kwargs):
        raise FloatingPointError("autoround model.layers.0: the block loss became inf at iteration 2")

    monkeypatch.setattr(autoround, "tune", diverging)
    snapshot = ModelSnapshot(llama.model)
    with pytest.raises(CalibrationError, match=r"AutoRound: block 'model.layers.0'.*lower AutoRoundConfig.lr"):
        pt2q.quantize(llama.model, AutoRoundConfig(iters=3, group_size=32, batch_size=2), calib,
                      example_inputs=llama.kwargs, progress=False)
    snapshot.assert_unchanged()


def test_save_load_round_trip(llama, calib, tmp_path):
    qmodel = quantize(llama, AutoRoundConfig(bits=4, group_size=32, iters=4, batch_size=2), calib)
    path = tmp_path / "autoround.pt2"
    pt2q.save(qmodel, path)
    loaded = pt2q.load(path)
    torch.testing.assert_close(logits(loaded, llama.kwargs), logits(qmodel, llama.kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [WeightFormat(4, 32, True, full_range=True), WeightFormat(3, 16, False),
                                 WeightFormat(4, 32, True)], ids=["sym_full", "asym", "sym"])
def test_fused_fake_quantization_matches_the_composed_ops_and_their_gradients(fmt):
    """The one-function fake quantization against the same formula written with torch ops (autograd)."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(12, 64, generator=gen)
    rounding = RoundingParameters(weight, fmt)
    with torch.no_grad():
        rounding.value.uniform_(-0.5, 0.5, generator=gen)
        rounding.min_scale.uniform_(0.6, 1.0, generator=gen)
        rounding.max_scale.uniform_(0.6, 1.0, generator=gen)
    upstream = torch.randn(12, 64, generator=gen)

    def composed():
        scale, zero_point = rounding._parameters()
        return (rounding._levels(scale, zero_point) * scale.unsqueeze(-1)).reshape(12, -1)

    results = []
    for function in (rounding.fake_quantized, composed):
        for tensor in (rounding.value, rounding.min_scale, rounding.max_scale):
            tensor.grad = None
        out = function()
        (out * upstream).sum().backward()
        results.append((out.detach(), rounding.value.grad.clone(), rounding.min_scale.grad.clone(),
                        rounding.max_scale.grad.clone()))
    fused, reference = results
    assert torch.equal(fused[0], reference[0])
    for got, expected in zip(fused[1:], reference[1:]):
        # the group sums add in another order: equal to float32 rounding of the largest gradient
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        assert expected.abs().sum() > 0


def test_final_loss_from_the_last_run_measures_what_tune_measures(llama, calib):
    """With iters=0 the weights are RTN's before and after: the final loss, taken from the block's last run
    (no extra pass), equals the initial one tune measured with its own forward."""
    for block in findings(quantize(llama, AutoRoundConfig(bits=3, group_size=16, iters=0, batch_size=4), calib)).values():
        assert block["final_loss"] == pytest.approx(block["initial_loss"], rel=1e-6)


def test_a_static_capture_of_padded_batches_gets_a_hint(llama, caplog):
    batches = token_batches(2, seed=4, length=12)
    for batch in batches:
        batch["attention_mask"][:, -6:] = 0
    with caplog.at_level("INFO", logger="pt2q"):
        quantize(llama, AutoRoundConfig(bits=4, group_size=32, iters=0), batches)
    assert "50% of the calibration positions are padding; capture with dynamic_shapes='batch_seq'" in caplog.text

"""pt2q.blockwise: cutting a capture into block segments, and SequentialRunner running one block at a time
with the previous blocks' overridden (quantized) weights, recorders, input scales and early stops."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

import pt2q
from pt2q import CalibrationError
from pt2q.blockwise import SequentialRunner, block_of, segments
from pt2q.graph import get_constant, module_fqn
from tests.conftest import call, nodes_of
from tests.models import VOCAB_SIZE, build

aten = torch.ops.aten
BLOCKS = ["model.layers.0", "model.layers.1"]


def token_batches(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB_SIZE, (2, 12), generator=gen),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(count)]


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def captured(llama):
    return pt2q.capture(llama.model, (), llama.kwargs)


@pytest.fixture(scope="module")
def batches():
    return token_batches(3, seed=0)


def linear_of(gm, module: str) -> torch.fx.Node:
    (node,) = [n for n in nodes_of(gm, aten.linear.default) if module_fqn(n) == module]
    return node


def eager_inputs(model, module: str, batches, *, outputs: bool = False) -> list[torch.Tensor]:
    """The (first) input of `module` - or with `outputs`, its (first) output - in an eager forward of each batch."""
    seen = []
    target = model.get_submodule(module)

    def keep(value):
        seen.append((value[0] if isinstance(value, tuple) else value).clone())

    hook = (target.register_forward_hook(lambda mod, args, output: keep(output)) if outputs
            else target.register_forward_pre_hook(lambda mod, args: keep(args)))
    try:
        for batch in batches:
            call(model, kwargs=batch)
    finally:
        hook.remove()
    return seen


def recorder(into: list):
    return lambda x: into.append(x.clone())


class LoggingRunner(SequentialRunner):
    """Records every node it executes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.executed: list[str] = []

    def _execute(self, node, args, kwargs):
        self.executed.append(node.name)
        return super()._execute(node, args, kwargs)


class Blocks(nn.Module):
    """Float input, numbered blocks `layers.N`, a head after them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


# -- segments ---------------------------------------------------------------------------------------------
def test_block_of(captured):
    assert block_of(linear_of(captured, "model.layers.0.self_attn.q_proj")) == "model.layers.0"
    assert block_of(linear_of(captured, "model.layers.1.mlp.down_proj")) == "model.layers.1"
    assert block_of(linear_of(captured, "lm_head")) is None
    (embedding,) = nodes_of(captured, aten.embedding.default)
    assert block_of(embedding) is None


def test_segments_one_per_decoder_layer_in_order(captured):
    parts = segments(captured)
    assert [s.block for s in parts] == [None, *BLOCKS, None]
    # every computing node exactly once, in graph order
    computing = [n for n in captured.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                 and not (n.op == "call_module" and n.target == "_guards_fn")]
    assert [n for s in parts for n in s.nodes] == computing
    for segment in parts:
        assert {block_of(n) for n in segment.nodes} == {segment.block}
    # each block holds its 7 linears; the head (lm_head) comes after the last block
    for segment in parts[1:3]:
        linears = [module_fqn(n) for n in segment.nodes if n.target is aten.linear.default]
        assert linears == [f"{segment.block}.{name}" for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")]
    assert [module_fqn(n) for n in parts[3].nodes if n.target is aten.linear.default] == ["lm_head"]


@pytest.mark.parametrize("name, blocks", [("gpt2", ["h.0", "h.1"]), ("bert", ["encoder.layer.0", "encoder.layer.1"])])
def test_segments_of_other_block_names(name, blocks, zoo):
    zm = zoo(name)
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs)
    assert [s.block for s in segments(gm) if s.block is not None] == blocks


# -- SequentialRunner ----------------------------------------------------------------------------------------
def test_on_block_called_once_per_block_in_order(captured, batches):
    runner = SequentialRunner(captured, batches, progress=False)
    assert runner.samples == 3 and runner.blocks() == BLOCKS
    seen = []
    runner.run(lambda block: seen.append((block.name, block.index, len(block.linears), block.runner is runner)))
    assert seen == [("model.layers.0", 0, 7, True), ("model.layers.1", 1, 7, True)]


def test_recorded_inputs_equal_the_float_model_without_overrides(llama, captured, batches):
    q1 = linear_of(captured, "model.layers.1.self_attn.q_proj").name
    recorded = []
    runner = SequentialRunner(captured, batches, progress=False)
    runner.run(lambda block: block.run({q1: recorder(recorded)}) if block.index == 1 else None)
    expected = eager_inputs(llama.model, "model.layers.1.self_attn.q_proj", batches)
    assert len(recorded) == len(batches)
    for actual, reference in zip(recorded, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)


def test_later_blocks_see_the_overridden_weights_of_earlier_ones(llama, captured, batches):
    """Block 0's down_proj weight is overridden by zeros in on_block: block 1's inputs are those of the eager
    model with that weight zeroed, not the float model's."""
    down0 = linear_of(captured, "model.layers.0.mlp.down_proj")
    q1 = linear_of(captured, "model.layers.1.self_attn.q_proj").name
    weight_before = get_constant(captured, down0.args[1]).clone()
    recorded = []

    def on_block(block):
        if block.index == 0:
            block.weights[down0.name] = torch.zeros_like(get_constant(captured, down0.args[1]))
        else:
            block.run({q1: recorder(recorded)})

    SequentialRunner(captured, batches, progress=False).run(on_block)

    zeroed = copy.deepcopy(llama.model)
    with torch.no_grad():
        zeroed.model.layers[0].mlp.down_proj.weight.zero_()
    expected = eager_inputs(zeroed, "model.layers.1.self_attn.q_proj", batches)
    floats = eager_inputs(llama.model, "model.layers.1.self_attn.q_proj", batches)
    assert len(recorded) == len(batches)
    for actual, reference, float_input in zip(recorded, expected, floats):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)
        assert (actual - float_input).abs().max() > 1e-2   # the override made a difference
    # an override never touches the graph's own weight
    assert torch.equal(get_constant(captured, down0.args[1]), weight_before)


def test_block_run_uses_the_weights_overridden_so_far_in_the_block(llama, captured, batches):
    """Inside on_block: after overriding o_proj, block.run feeds down_proj what the zeroed model computes."""
    o0 = linear_of(captured, "model.layers.0.self_attn.o_proj").name
    down0 = linear_of(captured, "model.layers.0.mlp.down_proj").name
    before, after = [], []

    def on_block(block):
        if block.index == 0:
            block.run({down0: recorder(before)})
            block.weights[o0] = torch.zeros(32, 32)
            block.run({down0: recorder(after)})

    SequentialRunner(captured, batches, progress=False).run(on_block)
    zeroed = copy.deepcopy(llama.model)
    with torch.no_grad():
        zeroed.model.layers[0].self_attn.o_proj.weight.zero_()
    for actual, reference in zip(before, eager_inputs(llama.model, "model.layers.0.mlp.down_proj", batches)):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)
    for actual, reference in zip(after, eager_inputs(zeroed, "model.layers.0.mlp.down_proj", batches)):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before[0], after[0])


def test_input_scales_multiply_the_linear_input(captured, batches):
    q0 = linear_of(captured, "model.layers.0.self_attn.q_proj").name
    factor = torch.linspace(0.5, 2.0, 32)
    plain, scaled = [], []

    def on_block(block):
        if block.index == 0:
            block.run({q0: recorder(plain)}, stop_after=linear_of(captured, "model.layers.0.self_attn.q_proj"))
            block.input_scales[q0] = factor
            block.run({q0: recorder(scaled)})

    SequentialRunner(captured, batches, progress=False).run(on_block)
    assert len(plain) == len(scaled) == len(batches)
    for x, y in zip(plain, scaled):
        assert torch.equal(y, x * factor)


def test_nothing_after_the_last_block_runs(captured, batches):
    parts = segments(captured)
    runner = LoggingRunner(captured, batches, progress=False)
    runner.run(lambda block: None)
    executed = set(runner.executed)
    for segment in parts[:3]:           # the embeddings, both blocks: every node, once per sample
        assert all(runner.executed.count(n.name) == len(batches) for n in segment.nodes)
    assert executed.isdisjoint(n.name for n in parts[3].nodes)   # final norm and lm_head never run
    assert len(runner.executed) == len(batches) * sum(len(s.nodes) for s in parts[:3])


def test_stop_after_ends_each_samples_run_there(captured, batches):
    runner = LoggingRunner(captured, batches, progress=False)
    v0 = linear_of(captured, "model.layers.0.self_attn.v_proj")
    block_nodes = segments(captured)[1].nodes
    logged = {}

    def on_block(block):
        if block.index == 0:
            start = len(runner.executed)
            block.run({}, stop_after=v0)
            logged["run"] = runner.executed[start:]

    runner.run(on_block)
    upto = [n.name for n in block_nodes[:block_nodes.index(v0) + 1]]
    assert logged["run"] == upto * len(batches)


def test_nan_input_raises():
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(4, 8)
    gm = pt2q.capture(model, (x,))
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(CalibrationError, match=r"calibration batch 1: positional argument 0 contains NaN"):
        SequentialRunner(gm, [(x,), (bad,)], progress=False)
    inf = x.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"calibration batch 0: positional argument 0 contains Inf"):
        SequentialRunner(gm, [(inf,)], progress=False)


def test_toy_blocks_run_in_order():
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(4, 8)
    gm = pt2q.capture(model, (x,))
    seen = []
    runner = LoggingRunner(gm, [(x,), (x * 2,)], progress=False)
    runner.run(lambda block: seen.append(block.name))
    assert seen == ["layers.0", "layers.1"]
    head = linear_of(gm, "head")
    assert head.name not in runner.executed


def test_model_without_numbered_blocks_raises(zoo):
    zm = zoo("mlp")
    gm = pt2q.capture(zm.model, zm.args)
    runner = SequentialRunner(gm, [zm.args], progress=False)
    assert runner.blocks() == []
    called = []
    with pytest.raises(CalibrationError, match=r"found no transformer blocks \(modules named layers\.N, layer\.N, "
                                               r"h\.N, blocks\.N or block\.N\)"):
        runner.run(called.append)
    assert called == []


def test_empty_or_mismatched_batches_raise(captured, batches):
    with pytest.raises(CalibrationError, match="calib_data is empty"):
        SequentialRunner(captured, [], progress=False)
    with pytest.raises(CalibrationError, match="calibration batch 1"):
        SequentialRunner(captured, [batches[0], {"input_ids": batches[0]["input_ids"]}], progress=False)


# -- record: only what the recorded inputs need, resumed from the previous stage ---------------------------
STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def staged(captured, batches, use_record: bool, ratio: float = 1.0):
    """Block 0 stage by stage, as GPTQ does it: record the stage's input, then override the stage's weights
    (halved); block 1's q_proj input recorded. Returns (inputs per stage, block 1's inputs, runner, the
    executions of block 0's nodes)."""
    runner = LoggingRunner(captured, batches, progress=False, checkpoint_ratio=ratio)
    stages = [[linear_of(captured, f"model.layers.0.{name}") for name in stage] for stage in STAGES]
    q1 = linear_of(captured, "model.layers.1.self_attn.q_proj").name
    seen, after, executed = [[] for _ in stages], [], {}

    def on_block(block):
        if block.index == 0:
            start = len(runner.executed)
            for stage, into in zip(stages, seen):
                record = {stage[0].name: recorder(into)}
                block.record(record) if use_record else block.run(record, stop_after=stage[-1])
                for linear in stage:
                    block.weights[linear.name] = get_constant(captured, linear.args[1]) * 0.5
            executed["stages"] = runner.executed[start:]
        else:
            block.run({q1: recorder(after)})

    runner.run(on_block)
    return seen, after, runner, executed["stages"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 100.0])
def test_record_sees_what_full_runs_see_and_runs_each_node_at_most_twice(captured, batches, ratio):
    expected, expected_after, legacy, legacy_stages = staged(captured, batches, use_record=False)
    seen, after, runner, stages = staged(captured, batches, use_record=True, ratio=ratio)
    for got, want in zip(seen, expected):
        assert len(got) == len(want) == len(batches)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(after, expected_after))   # the block's last run agrees
    # The recorded linears never run while recorded, and the block costs less than a run per stage.
    assert len(stages) < len(legacy_stages)
    assert len(runner.executed) < len(legacy.executed)
    if ratio == 100.0:   # every checkpoint kept: a node runs in one record and at most once more at the end
        block = segments(captured)[1].nodes
        counts = collections.Counter(runner.executed)
        assert all(counts[n.name] <= 2 * len(batches) for n in block)


def test_record_starts_over_when_an_override_before_its_checkpoint_changes(captured, batches):
    q0 = linear_of(captured, "model.layers.0.self_attn.q_proj")
    down0 = linear_of(captured, "model.layers.0.mlp.down_proj").name
    first, again, fresh, state = [], [], [], {}

    def on_block(block):
        if block.index == 0:
            block.record({down0: recorder(first)})
            state["checkpoint"] = block.checkpoint
            block.weights[q0.name] = torch.zeros_like(get_constant(captured, q0.args[1]))
            block.record({down0: recorder(again)})
            block.run({down0: recorder(fresh)})
            state["after_run"] = block.checkpoint

    SequentialRunner(captured, batches, progress=False, checkpoint_ratio=100.0).run(on_block)
    assert state["checkpoint"] is not None and state["checkpoint"].position > 0
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))
    assert not torch.allclose(first[0], again[0])
    assert state["after_run"] is None            # block.run drops it: in-place edits may follow


def test_checkpoint_budget_is_a_multiple_of_the_block_inputs(captured, batches):
    down0 = linear_of(captured, "model.layers.0.mlp.down_proj").name
    kept = {}

    def on_block(block, ratio):
        if block.index == 0:
            block.record({down0: lambda x: None})
            checkpoint = block.checkpoint   # (the block's last run consumes it)
            kept[ratio] = None if checkpoint is None else [
                sum(isinstance(v, torch.Tensor) for v in values.values()) for values in checkpoint.values]

    for ratio in (0.0, 100.0):
        SequentialRunner(captured, batches, progress=False, checkpoint_ratio=ratio).run(
            lambda block, r=ratio: on_block(block, r))
    assert kept[0.0] is None                      # the values before down_proj take memory: not kept
    assert kept[100.0] is not None and len(kept[100.0]) == len(batches) and min(kept[100.0]) > 0


# -- a block as a differentiable function (AutoRound, TEQ) --------------------------------------------------
def test_block_forward_equals_the_eager_block_and_differentiates_the_overrides(llama, captured, batches):
    down1 = linear_of(captured, "model.layers.1.mlp.down_proj")
    weight = get_constant(captured, down1.args[1])
    weight_before = weight.clone()
    forwarded, grads = [], []

    def on_block(block):
        if block.index != 1:
            return
        (output,) = block.outputs
        for sample in range(block.runner.samples):
            forwarded.append(block.forward(block.inputs(sample))[output].clone())
        trainable = weight.clone().requires_grad_(True)
        with torch.enable_grad():
            out = block.forward(block.inputs(0), {down1.name: trainable})[output]
            out.pow(2).sum().backward()
        grads.append(trainable.grad)

    SequentialRunner(captured, batches, progress=False).run(on_block)
    expected = eager_inputs(llama.model, "model.layers.1", batches, outputs=True)
    assert len(forwarded) == len(batches)
    for actual, reference in zip(forwarded, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert torch.equal(weight, weight_before) and weight.grad is None   # the graph's tensor: untouched

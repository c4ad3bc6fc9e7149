"""ChannelRecorder and InsertChannelRecorders: identity side nodes that record per-channel ranges."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pt2q
from pt2q.passes.insert_channel_recorders import ChannelRecorder, InsertChannelRecorders, remove_recorders
from pt2q.passes.manager import PassManager
from pt2q.passes.smooth_quant_groups import SmoothQuantGroups
from tests.conftest import call


def test_recorder_is_an_identity_that_tracks_per_channel_min_max_across_batches():
    recorder = ChannelRecorder(channel_dim=-1)
    first = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 5.0, -1.0]]])     # [1, 2, 3]: channels last
    second = torch.tensor([[[-4.0, 1.0, 0.5], [0.0, 0.0, 0.25]]])
    assert recorder(first) is first
    recorder(second)
    assert torch.equal(recorder.min_val, torch.tensor([-4.0, -2.0, -1.0]))
    assert torch.equal(recorder.max_val, torch.tensor([3.0, 5.0, 0.5]))
    assert torch.equal(recorder.absmax, torch.tensor([4.0, 5.0, 1.0]))
    assert recorder.sample is None and not recorder.non_finite  # sample_limit=0 keeps nothing


def test_recorder_channel_dim_1_for_conv_inputs():
    recorder = ChannelRecorder(channel_dim=1)
    x = torch.randn(2, 3, 4, 5)
    recorder(x)
    assert torch.equal(recorder.min_val, x.amin(dim=(0, 2, 3)))
    assert torch.equal(recorder.max_val, x.amax(dim=(0, 2, 3)))


def test_recorder_keeps_a_bounded_sample_of_the_first_batch_only():
    recorder = ChannelRecorder(channel_dim=-1, sample_limit=3 * 4 * 8)
    first, second = torch.randn(10, 4, 8), torch.randn(10, 4, 8)
    recorder(first)
    recorder(second)
    assert torch.equal(recorder.sample, first[:3])  # 3 items of 4x8 elements fit the limit
    first.zero_()
    assert recorder.sample.abs().sum() > 0  # a copy, not a view of the caller's tensor


def test_recorder_flags_non_finite_input_without_recording_it():
    recorder = ChannelRecorder(channel_dim=-1)
    recorder(torch.ones(2, 3))
    recorder(torch.tensor([[float("inf"), 0.0, 0.0]]))
    assert recorder.non_finite
    assert torch.equal(recorder.max_val, torch.ones(3))


class TwoBlocks(nn.Module):
    """Pre-LN block (absorbed) and a graph-input group (explicit)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.q(h).sum(-1) + self.k(h).sum(-1)


def _recorder_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelRecorder)]


def _analysed(model, x):
    gm = pt2q.capture(model, (x,))
    analysis = SmoothQuantGroups()
    PassManager([analysis])(gm)
    return gm, analysis.report


def test_pass_adds_one_unused_recorder_per_group_that_records_the_group_input():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(3, 5, 6)
    gm, groups = _analysed(model, x)
    expected = call(gm, (x,))
    recorders = InsertChannelRecorders(groups)
    PassManager([recorders])(gm)
    assert set(recorders.recorders) == {g.root.name for g in groups} and len(groups) == 2
    nodes = {n.target: n for n in _recorder_nodes(gm)}
    for group in groups:
        node = nodes[recorders.recorders[group.root.name]]
        assert node.args == (group.root,) and not node.users
        assert node.prev is group.root  # right after the recorded value
    gm.graph.eliminate_dead_code()  # _is_impure keeps the output-less recorders alive
    assert {n.target for n in _recorder_nodes(gm)} == set(recorders.recorders.values())

    x2 = torch.randn(3, 5, 6) * 3
    assert torch.equal(call(gm, (x,)), expected)  # identity: the graph's output is unchanged
    call(gm, (x2,))
    with torch.no_grad():
        norm_out = torch.cat([model.norm(model.inp(x)), model.norm(model.inp(x2))]).reshape(-1, 8)
    norm_recorder = gm.get_submodule(recorders.recorders[groups[1].root.name])
    torch.testing.assert_close(norm_recorder.min_val, norm_out.amin(0))
    torch.testing.assert_close(norm_recorder.max_val, norm_out.amax(0))
    input_recorder = gm.get_submodule(recorders.recorders[groups[0].root.name])
    assert torch.equal(input_recorder.max_val, torch.cat([x, x2]).reshape(-1, 6).amax(0))

    remove_recorders(gm)
    assert not [m for m in gm.modules() if isinstance(m, ChannelRecorder)]
    assert not _recorder_nodes(gm)
    assert torch.equal(call(gm, (x,)), expected)


def test_skipped_groups_get_no_recorder():
    torch.manual_seed(0)
    gm, groups = _analysed(TwoBlocks().eval(), torch.randn(2, 6))
    groups[0].skipped = True
    recorders = InsertChannelRecorders(groups, sample_limit=16)
    PassManager([recorders])(gm)
    assert list(recorders.recorders) == [groups[1].root.name]
    module = gm.get_submodule(recorders.recorders[groups[1].root.name])
    assert module.sample_limit == 16 and module.channel_dim == -1


@pytest.mark.parametrize("alpha, skip_if_worse, keeps_sample", [
    (0.5, False, False), (0.5, True, True), ("auto", False, True), ({"q": "auto"}, False, True)])
def test_insert_keeps_samples_only_when_auto_alpha_or_the_guard_needs_them(alpha, skip_if_worse, keeps_sample):
    from pt2q.smooth_quant import SmoothQuantConfig, insert

    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = pt2q.capture(TwoBlocks().eval(), (x,))
    plan = insert(gm, SmoothQuantConfig(alpha=alpha, skip_if_worse=skip_if_worse))
    call(gm, (x,))
    samples = [gm.get_submodule(name).sample for name in plan.recorders.values()]
    assert samples and all((s is not None) == keeps_sample for s in samples)

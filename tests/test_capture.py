"""pt2q.capture: eval-mode export that leaves the user's model as it was."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pt2q
from pt2q.capture import EXAMPLE_INPUTS_KEY, normalize_inputs
from tests.conftest import ModelSnapshot, call
from tests.models import build


SEEN: list = []  # module-level: torch.export undoes attribute mutations made during tracing


class Recorder(nn.Module):
    """Records the flags it sees while being exported."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.5)
        self.config = SimpleNamespace(use_cache=True)

    def forward(self, x):
        SEEN.append((self.training, self.dropout.training, self.config.use_cache))
        return self.dropout(self.linear(x))


def test_exports_in_eval_mode_and_restores_flags():
    SEEN.clear()
    model = Recorder()
    model.train()
    model.linear.eval()  # a mixed state must come back exactly
    gm = pt2q.capture(model, (torch.randn(2, 4),))
    assert SEEN and all(seen == (False, False, False) for seen in SEEN)
    assert model.training and model.dropout.training and not model.linear.training
    assert model.config.use_cache is True
    # dropout was captured in eval mode: the graph is deterministic and equals eval-mode eager
    x = torch.randn(2, 4)
    assert torch.equal(call(gm, (x,)), call(gm, (x,)))
    model.eval()
    torch.testing.assert_close(call(gm, (x,)), call(model, (x,)), rtol=0, atol=0)


def test_flags_restored_when_export_fails():
    class Failing(Recorder):
        def forward(self, x):
            super().forward(x)
            if x.sum() > 0:
                return x
            return -x

    SEEN.clear()
    model = Failing()
    model.train()
    with pytest.raises(pt2q.CaptureError):
        pt2q.capture(model, (torch.randn(2, 4),))
    assert SEEN and SEEN[0] == (False, False, False)
    assert model.training and model.dropout.training and model.config.use_cache is True


def test_hugging_face_model_flags_and_weights_restored():
    zm = build("gpt2")
    zm.model.train()
    zm.model.config.use_cache = True
    snap = ModelSnapshot(zm.model)
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs)
    snap.assert_unchanged()
    assert zm.model.training and zm.model.config.use_cache is True
    zm.model.eval()
    expected = zm.run()
    torch.testing.assert_close(zm.output_fn(call(gm, zm.args, zm.kwargs)), expected)


def test_keyword_inputs(zoo):
    zm = zoo("bert")
    assert zm.args == () and set(zm.kwargs) == {"input_ids", "attention_mask"}
    gm = pt2q.capture(zm.model, kwargs=zm.kwargs)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask"]
    torch.testing.assert_close(zm.output_fn(call(gm, kwargs=zm.kwargs)), zm.run())
    # the mask is a real input, not baked in as a constant
    other_mask = torch.ones_like(zm.kwargs["attention_mask"])
    masked = zm.output_fn(call(gm, kwargs={**zm.kwargs, "attention_mask": other_mask}))
    assert not torch.allclose(masked, zm.run())
    # a dict passed as the only positional spec means keyword inputs too
    gm2 = pt2q.capture(zm.model, dict(zm.kwargs))
    torch.testing.assert_close(zm.output_fn(call(gm2, kwargs=zm.kwargs)), zm.run())


def test_example_inputs_recorded(zoo):
    zm = zoo("mlp")
    gm = pt2q.capture(zm.model, zm.args)
    args, kwargs = gm.meta[EXAMPLE_INPUTS_KEY]
    assert kwargs == {} and len(args) == 1 and args[0] is zm.args[0]
    assert gm.meta["pt2q_source_class"] == "Sequential"
    # capturing a pt2q capture again is a no-op
    assert pt2q.capture(gm, zm.args) is gm


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_dynamic_batch(zoo, name):
    zm = zoo(name)
    gm = pt2q.capture(zm.model, zm.args, zm.kwargs, dynamic_shapes="batch")
    args = tuple(torch.cat([a] * 3) for a in zm.args)
    kwargs = {k: torch.cat([v] * 3) for k, v in zm.kwargs.items()}
    out = zm.output_fn(call(gm, args, kwargs))
    assert out.shape[0] == 3 * zm.output_fn(call(gm, zm.args, zm.kwargs)).shape[0]
    with torch.no_grad():
        torch.testing.assert_close(out, zm.output_fn(zm.model(*args, **kwargs)))


def test_dynamic_batch_seq(zoo):
    zm = zoo("bert")
    gm = pt2q.capture(zm.model, kwargs=zm.kwargs, dynamic_shapes="batch_seq")
    kwargs = {k: v[:1, :7] for k, v in zm.kwargs.items()}
    with torch.no_grad():
        expected = zm.output_fn(zm.model(**kwargs))
    torch.testing.assert_close(zm.output_fn(call(gm, kwargs=kwargs)), expected)


def test_static_capture_rejects_other_batch(zoo):
    zm = zoo("mlp")
    gm = pt2q.capture(zm.model, zm.args)
    with pytest.raises(Exception, match="size"):
        call(gm, (torch.cat([zm.args[0]] * 2),))


def test_unknown_dynamic_shorthand():
    with pytest.raises(pt2q.CaptureError, match="batch_seq"):
        pt2q.capture(nn.Linear(4, 4), (torch.randn(2, 4),), dynamic_shapes="everything")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def test_unexportable_model_raises_capture_error():
    model = DataDependent()
    snap = ModelSnapshot(model)
    with pytest.raises(pt2q.CaptureError) as info:
        pt2q.capture(model, (torch.randn(2, 4),))
    error = info.value
    assert isinstance(error, pt2q.Pt2qError)
    assert error.export_error is not None and error.__cause__ is error.export_error
    message = str(error)
    assert "DataDependent" in message
    hint_lines = [line for line in message.splitlines() if line.startswith("hint:")]
    assert len(hint_lines) == 1 and "torch.cond" in hint_lines[0]
    snap.assert_unchanged()


def test_capture_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        pt2q.capture(lambda x: x, (torch.randn(2),))


def test_normalize_inputs():
    t = torch.randn(2)
    assert normalize_inputs(t) == ((t,), {})
    assert normalize_inputs((t,)) == ((t,), {})
    assert normalize_inputs([t, t]) == ((t, t), {})
    assert normalize_inputs({"x": t}) == ((), {"x": t})
    assert normalize_inputs(((t,), {"mask": t})) == ((t,), {"mask": t})
    with pytest.raises(TypeError, match="int"):
        normalize_inputs(3)

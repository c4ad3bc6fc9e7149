"""Capture an `nn.Module` as an FX `GraphModule` with `torch.export`, in eval mode, Hugging Face aware.

The user's model is left exactly as it was: its train/eval flags and any config flag flipped for the
capture (`use_cache`) are restored, and no parameter is written.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch.export import Dim, ShapesCollection
from torch.fx import GraphModule

from . import meta
from .errors import CaptureError

EXAMPLE_INPUTS_KEY = meta.EXAMPLE_INPUTS  # its historical name here

_DYNAMIC_SHORTHANDS = {"batch": (0,), "batch_seq": (0, 1)}


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tuple of positional inputs, a dict of keyword inputs, a single tensor, or (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict):
            return example_inputs[0], dict(example_inputs[1])
        return example_inputs, {}
    raise TypeError(
        f"example inputs must be a tuple of positional arguments, a dict of keyword arguments or a tensor; "
        f"got {type(example_inputs).__name__}")


@contextlib.contextmanager
def capture_mode(model: torch.nn.Module, training: bool = False):
    """Put `model` in eval mode (train mode with `training`, for QAT) with Hugging Face caches off;
    restore every flag on exit."""
    training_flags = {module: module.training for module in model.modules()}
    config = getattr(model, "config", None)
    had_use_cache = config is not None and hasattr(config, "use_cache")
    old_use_cache = config.use_cache if had_use_cache else None
    try:
        model.train(training)
        if had_use_cache:
            # A cache object in the outputs is not a pytree type torch.export can flatten.
            config.use_cache = False
        yield
    finally:
        for module, flag in training_flags.items():
            module.training = flag
        if had_use_cache:
            config.use_cache = old_use_cache


def _expand_dynamic_shorthand(spec: str, model: torch.nn.Module, args: tuple, kwargs: dict):
    """'batch' -> dim 0 of every tensor input dynamic; 'batch_seq' -> also dim 1 of every 2-D input."""
    if spec not in _DYNAMIC_SHORTHANDS:
        raise CaptureError(f"dynamic_shapes={spec!r} is not a known shorthand; use one of "
                           f"{sorted(_DYNAMIC_SHORTHANDS)} or a torch.export dynamic_shapes spec")
    dims = _DYNAMIC_SHORTHANDS[spec]

    def for_value(value):
        if not isinstance(value, torch.Tensor):
            return None
        chosen = [d for d in dims if d < value.dim() and (d == 0 or value.dim() == 2)]
        return {d: Dim.AUTO for d in chosen} or None

    # torch.export wants the spec shaped like the inputs bound to forward's signature (a tuple/dict
    # per parameter, not (args, kwargs)); ShapesCollection builds that structure from the tensors.
    shapes = ShapesCollection()
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        dims_spec = for_value(leaf)
        if dims_spec is not None:
            shapes[leaf] = dims_spec
    return shapes.dynamic_shapes(model, args, kwargs)


def _hint_for(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if "Cache" in text or "pytree" in text.lower():
        return "an output is not a pytree type; for Hugging Face decoders pass use_cache=False"
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
        return ("the forward branches on tensor values; rewrite the branch with torch.cond, or mark the "
                "value with torch._check")
    if "shape" in text.lower() or "size" in text.lower():
        return "check that the example inputs have the shapes the model expects"
    return "see the export error above; torch.export's troubleshooting guide covers most causes"


def capture(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None,
            dynamic_shapes: Any = None, *, training: bool = False) -> GraphModule:
    """Export `model` called as `model(*args, **kwargs)` to an ATen-level `GraphModule`.

    `dynamic_shapes` takes a torch.export spec, or the shorthands "batch" / "batch_seq".
    `training`: capture the training graph (batch norm on batch statistics, dropout on), for QAT; the
    model's own train/eval flags are restored either way.
    The returned module keeps the model's input/output structure (Hugging Face `ModelOutput`s included).
    Raises `CaptureError` (with `.export_error`) when torch.export fails.
    """
    if isinstance(model, GraphModule) and EXAMPLE_INPUTS_KEY in model.meta:
        return model  # already captured by pt2q
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture() takes an nn.Module, got {type(model).__name__}")
    if kwargs is None and not isinstance(args, tuple):
        args, kwargs = normalize_inputs(args)
    kwargs = dict(kwargs or {})
    args = tuple(args)
    if isinstance(dynamic_shapes, str):
        dynamic_shapes = _expand_dynamic_shorthand(dynamic_shapes, model, args, kwargs)
    grad_mode = contextlib.nullcontext() if training else torch.no_grad()
    with capture_mode(model, training), grad_mode:
        try:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as error:  # noqa: BLE001 - every export failure becomes a CaptureError
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}\n"
                f"hint: {_hint_for(error)}", export_error=error) from error
    graph_module = exported.module()
    graph_module.meta[EXAMPLE_INPUTS_KEY] = (args, kwargs)
    graph_module.meta[meta.DYNAMIC_SHAPES] = dynamic_shapes
    graph_module.meta[meta.SOURCE_CLASS] = type(model).__name__
    return graph_module


def fresh_copy(graph_module: GraphModule) -> GraphModule:
    """A GraphModule with its own graph and module tree but the same (shared, unmodified) tensors."""
    copied = GraphModule(graph_module, copy.deepcopy(graph_module.graph), type(graph_module).__name__)
    copied.meta.update(graph_module.meta)
    return copied

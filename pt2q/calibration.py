"""Running calibration data through an observed graph: one batch at a time, with errors that name the
batch, the argument or the node. Used by pt2q.calibrate / quantize, SmoothQuant's standalone pass and
the dump tool."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e.observer import HistogramObserver, ObserverBase
from tqdm.auto import tqdm

from .capture import normalize_inputs
from .errors import CalibrationError
from .graph import module_fqn


def observers(graph_module: GraphModule) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in graph_module.named_modules() if isinstance(module, ObserverBase)}


def fake_quantizers(graph_module: GraphModule) -> dict[str, torch.nn.Module]:
    """The fake quants (QAT) of a prepared graph, by module name."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return {name: module for name, module in graph_module.named_modules() if isinstance(module, FakeQuantizeBase)}


def check_finite_inputs(args: tuple, kwargs: dict, batch_index: int) -> None:
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)] + \
            [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        leaves = torch.utils._pytree.tree_leaves(value)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
                bad = "NaN" if torch.isnan(leaf).any() else "Inf"
                raise CalibrationError(f"calibration batch {batch_index}: {name} contains {bad}; "
                                       "clean the calibration data (observers would record a useless range)")


def sized(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def check_batches_iterable(calib_data) -> None:
    if isinstance(calib_data, torch.Tensor):
        raise CalibrationError("calib_data is a single tensor, which would be iterated row by row; pass an "
                               f"iterable of batches instead, e.g. [(x,)] for one batch of shape {tuple(calib_data.shape)}, "
                               "or a DataLoader")
    if isinstance(calib_data, (dict, str, bytes)):
        raise CalibrationError(f"calib_data is a {type(calib_data).__name__}; pass an iterable of batches, "
                               "e.g. [{'input_ids': ids}] for one batch of keyword inputs")


_HISTOGRAM_SKIPPED_INF = "torch.inf detected in input tensor"  # torchao HistogramObserver's warning
_REEMITTED: dict = {}  # the registry of warnings passed on by _run_batch (deduplicated as Python does)


def _observer_descriptions(graph_module: GraphModule) -> dict[str, str]:
    """observer module name -> 'node X (module M), the input of C,' for error messages."""
    described = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.args and isinstance(node.args[0], torch.fx.Node):
            source = node.args[0]
            consumers = sorted({module_fqn(user) for user in node.users if module_fqn(user)})
            text = f"node {source.name!r}" + (f" (module {module_fqn(source)!r})" if module_fqn(source) else "")
            described[node.target] = text + (f", the input of {', '.join(consumers)}," if consumers else "")
    return described


def _non_finite(low: torch.Tensor, high: torch.Tensor) -> str | None:
    if bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all()):
        return None
    return "NaN" if bool(torch.isnan(low).any() or torch.isnan(high).any()) else "Inf"


@contextlib.contextmanager
def _non_finite_observations_refused(graph_module: GraphModule, batch_index: list[int], *,
                                     histogram_inputs: bool = False):
    """Static observers fail alike on NaN/Inf, naming the node and the batch (`batch_index[0]`). Min/max
    observers keep what they saw, so their range is read after each call (O(channels)). HistogramObserver
    drops Inf with only a warning; `_run_batch` notices the warning and calls the batch again inside
    `histogram_inputs=True`, which looks at the histogram observers' inputs instead (a pass over each
    activation: the slow path only)."""
    described = _observer_descriptions(graph_module)

    def refuse(name: str, bad: str):
        raise CalibrationError(
            f"calibration batch {batch_index[0]}: the output of {described.get(name, f'observer {name}')} "
            f"contains {bad}; check the model's numerics on the calibration data, or keep that layer in fp32 "
            "with set_local(..., None)")

    def check_input(name: str):
        def hook(_module, inputs):
            value = inputs[0] if inputs else None
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                bad = _non_finite(*torch.aminmax(value))
                if bad:
                    refuse(name, bad)
        return hook

    def check_range(name: str):
        def hook(module, _inputs, _output):
            bad = _non_finite(module.min_val, module.max_val)
            if bad:
                refuse(name, bad)
        return hook

    handles = []
    for name, observer in observers(graph_module).items():
        if getattr(observer, "is_dynamic", False):
            continue
        if isinstance(observer, HistogramObserver):
            if histogram_inputs:
                handles.append(observer.register_forward_pre_hook(check_input(name)))
        elif isinstance(getattr(observer, "min_val", None), torch.Tensor) and not histogram_inputs:
            handles.append(observer.register_forward_hook(check_range(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_batch(graph_module: GraphModule, args: tuple, kwargs: dict, batch_index: list[int]) -> None:
    """One calibration call, inside run_calibration's `_non_finite_observations_refused`. A histogram
    observer's 'ignoring input' warning means it dropped Inf: the batch is then run again, looking at
    every histogram input, to name the node."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph_module(*args, **kwargs)
    if any(_HISTOGRAM_SKIPPED_INF in str(w.message) for w in caught):
        with _non_finite_observations_refused(graph_module, batch_index, histogram_inputs=True):
            graph_module(*args, **kwargs)
    for w in caught:  # everything else is passed on as it came
        if _HISTOGRAM_SKIPPED_INF not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_REEMITTED,
                                   source=w.source)


def run_calibration(graph_module: GraphModule, calib_data: Iterable, *, progress: bool = True,
                    desc: str = "pt2q calibrate") -> int:
    check_batches_iterable(calib_data)
    count = 0
    batches = tqdm(calib_data, total=sized(calib_data), desc=desc, unit="batch",
                   disable=not progress, leave=False)
    batch_index = [0]
    with torch.no_grad(), _non_finite_observations_refused(graph_module, batch_index):
        for index, batch in enumerate(batches):
            batch_index[0] = index
            try:
                args, kwargs = normalize_inputs(batch)
            except TypeError as error:
                raise CalibrationError(f"calibration batch {index}: {error}") from error
            check_finite_inputs(args, kwargs, index)
            try:
                _run_batch(graph_module, args, kwargs, batch_index)
            except CalibrationError:
                raise
            except Exception as error:  # noqa: BLE001 - re-raised with the batch index and a hint
                raise CalibrationError(
                    f"calibration batch {index} does not fit the captured graph: {error}\nhint: its shapes "
                    "must match the example inputs, or capture with dynamic_shapes='batch' / 'batch_seq'"
                ) from error
            count += 1
    if count == 0:
        raise CalibrationError("calib_data is empty: static quantization needs at least one batch")
    return count



"""`dump_pipeline`: run capture -> prepare -> calibrate -> convert (-> Inductor) and dump every pass.

Files written to `out_dir` (stable names; the number is the stage's position in the pipeline):

    00_capture.txt                 the exported graph
    NN_<pass>.txt / NN_<pass>.diff  every pass any PassManager ran during prepare (SmoothQuant analysis,
                                   matmul_to_linear, prepare_pt2e, ...), and its diff with the stage before
    NN_calibrate.txt / .diff       observers with their ranges and the qparams they give
    NN_<pass>.txt / .diff          every pass of convert (smooth_quant_apply, convert_pt2e)
    NN_inductor.txt                the int8 kernels Inductor produced (when compile=True)
    numeric.txt                    fp32 vs int8 per quantized node, worst SQNR first
    summary.json                   all of the above as data, plus timings
    index.html                     one self-contained page: graph (SVG), per-node table, reports

Files are written as the pipeline goes: when a pass fails, the stages before it are on disk, and the
page and summary name the error.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.fx import GraphModule

from .. import meta
from .. import pipeline as quant_pipeline
from ..errors import Pt2qError
from ..passes.manager import PassReport
from ..passes.smooth_quant_apply import SmoothQuantReport
from ..passes.torchao_prepare import AnnotationReport
from .numeric import NumericRow, compare_compiled, compare_graphs, numeric_text, structural_copy
from .text import GraphSnapshot, snapshot, unified_diff

log = logging.getLogger(__name__)

DUMP_DIR_ENV = "PT2Q_DUMP_DIR"
_OWN_FILES = re.compile(r"^(\d{2,}_[A-Za-z0-9_.-]+\.(txt|diff)|numeric\.txt|summary\.json|index\.html)$")


class DumpDirectoryError(Pt2qError, FileExistsError):
    """The dump directory exists and is not empty (and force was not given), or is not a directory."""


@dataclass
class StageFiles:
    index: int
    name: str
    text: Path
    diff: Path | None


@dataclass
class DumpResult:
    """What `dump_pipeline` produced. `numeric` rows are sorted worst SQNR first."""

    out_dir: Path
    stages: list[StageFiles] = field(default_factory=list)
    numeric: list[NumericRow] = field(default_factory=list)
    outputs: list[NumericRow] = field(default_factory=list)
    smooth_quant: Any = None
    kernels: dict | None = None
    html: Path | None = None
    summary: Path | None = None
    qmodel: GraphModule | None = None
    compiled: Any = None
    timings: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def worst(self) -> NumericRow | None:
        return self.numeric[0] if self.numeric else None

    def stage(self, name: str) -> StageFiles:
        return next(s for s in self.stages if s.name == name)


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Create `out_dir`; refuse a non-empty one unless `force` (then only pt2q's dump files in it go)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise DumpDirectoryError(f"dump directory {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise DumpDirectoryError(f"dump directory {str(path)!r} exists and is not empty; choose a new "
                                     "directory or pass --force (force=True) to overwrite the dump in it")
        for entry in path.iterdir():
            if entry.is_file() and _OWN_FILES.match(entry.name):
                entry.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".pt2q_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise DumpDirectoryError(f"dump directory {str(path)!r} cannot be written: {error.strerror or error}") \
            from error
    return path


def _next_run_dir(root: Path, label: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d+)_", p.name))]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "model"
    return root / f"{max(taken, default=-1) + 1:03d}_{label}"


class NumericReference:
    """The fp32 graphs the numeric report compares a quantized graph against, taken while the pipeline
    runs (a pass observer: `with observe_passes(reference): ...quantize...`).

    `annotated`: the graph right after the quantizer annotated (int8 / FP8: observers in, conv-bn folded,
    node names as in the quantized graph; observers are bypassed when it runs). `smoothed`: right after
    SmoothQuant applied, the per-node reference then (a producer that absorbed 1/s has rescaled outputs).
    `captured`: the capture the pipeline started from, the reference when nothing was annotated
    (weight-only); it must own its tensors, since AWQ scales the prepared model's tensors in place."""

    def __init__(self, captured: GraphModule | None = None):
        self.captured = captured
        self.annotated: GraphModule | None = None
        self.smoothed: GraphModule | None = None

    def __call__(self, pass_name: str, gm: GraphModule, record) -> None:
        if record.composite:
            return  # a pipeline stage: the pass inside it that made the graph was seen already
        if isinstance(record.report, AnnotationReport):
            self.annotated = structural_copy(gm)
        if isinstance(record.report, SmoothQuantReport):
            self.smoothed = structural_copy(gm)

    @property
    def fp32(self) -> GraphModule | None:
        """The unsmoothed fp32 graph: the reference of the model outputs."""
        return self.annotated if self.annotated is not None else self.captured

    def compare(self, qmodel: GraphModule, args: tuple, kwargs: dict) -> tuple[list[NumericRow], list[NumericRow]]:
        """(per-node rows, worst SQNR first; model-output rows) of `qmodel` on (args, kwargs)."""
        if self.fp32 is None:
            raise Pt2qError("the numeric reference saw no annotated graph and was given no capture")
        if self.smoothed is not None:
            return compare_graphs(self.smoothed, qmodel, args, kwargs, unsmoothed=self.fp32)
        return compare_graphs(self.fp32, qmodel, args, kwargs)


class _Recorder:
    """Follows the pipeline: snapshots each stage, writes its text and diff at once."""

    def __init__(self, out_dir: Path, strict: bool):
        self.out_dir, self.strict = out_dir, strict
        self.snapshots: list[GraphSnapshot] = []
        self.diffs: dict[str, str] = {}
        self.files: list[StageFiles] = []
        self.rules: dict[str, str] = {}
        self.reference = NumericReference()
        self.pass_seconds: list[dict] = []

    def add(self, name: str, gm: GraphModule | None = None, notes: list[str] | None = None) -> GraphSnapshot:
        index = len(self.snapshots)
        snap = snapshot(gm, index, name, rules=self.rules) if gm is not None else \
            GraphSnapshot(index, name, is_graph=False)
        snap.notes.extend(notes or [])
        text_path = self.out_dir / f"{snap.stem}.txt"
        text_path.write_text(snap.text())
        diff_path = None
        previous = next((s for s in reversed(self.snapshots) if s.is_graph), None)
        if snap.is_graph and previous is not None:
            diff = unified_diff(previous, snap)
            self.diffs[snap.stem] = diff
            diff_path = self.out_dir / f"{snap.stem}.diff"
            diff_path.write_text(diff)
        self.snapshots.append(snap)
        self.files.append(StageFiles(index, name, text_path, diff_path))
        return snap

    def __call__(self, pass_name: str, gm: GraphModule, record) -> None:
        try:
            self.pass_seconds.append({"pass": pass_name, "seconds": record.seconds, "depth": record.depth})
            if record.composite:
                return  # a pipeline stage whose graph passes were shown one by one as they ran
            notes: list[str] = []
            if isinstance(record.report, AnnotationReport):  # the quantizer annotated: observers are in
                self.rules = dict(record.report.rules)
            self.reference(pass_name, gm, record)
            if isinstance(record.report, PassReport):
                notes += _report_lines(record.report)
            self.add(pass_name, gm, notes)
        except Exception:  # noqa: BLE001
            if self.strict:
                raise
            log.warning("pt2q.debug: could not dump pass %s:\n%s", pass_name, traceback.format_exc())


def _report_lines(report) -> list[str]:
    if not isinstance(report, PassReport):
        return []
    return [f"# {report.summary()}", *(f"# {line}" for line in report.lines())]


def smooth_quant_dicts(report) -> list[dict]:
    if report is None:
        return []
    rows = []
    for status, groups in (("smoothed", report.groups), ("skipped", report.skipped)):
        for group in groups:
            scale = group.scale
            rows.append({
                "status": ("absorbed" if group.absorbed else "explicit mul") if status == "smoothed" else "skipped",
                "producer": group.producer, "consumers": list(group.consumers), "alpha": group.alpha,
                "reason": group.reason,
                "scale": None if not isinstance(scale, torch.Tensor) else {
                    "n": scale.numel(), "min": scale.min().item(), "max": scale.max().item()}})
    return rows


def kernel_lines(kernels: dict, quantized_layers: int, guarded: list[str] | None) -> list[str]:
    total = sum(kernels.values())
    lines = [f"# Inductor: {total} fused int8 kernel call(s) for {quantized_layers} quantized layer(s)"]
    lines += [f"{name}: {count}" for name, count in sorted(kernels.items())] or ["(no int8 kernel)"]
    if guarded:
        lines.append(f"# inputs copied before each call (in-place residual add): {', '.join(guarded)}")
    return lines


def dump_pipeline(model: torch.nn.Module, config, calib_data: Iterable | None = None, example_inputs: Any = None,
                  *, out_dir: str | os.PathLike = "pt2q_dump", force: bool = False, compile: bool = True,
                  numeric: bool = True, html: bool = True, dynamic_shapes: Any = None, progress: bool = True,
                  strict: bool = True) -> DumpResult:
    """Quantize `model` as `pt2q.quantize` does and dump every stage into `out_dir` (see the module
    docstring). `compile=True` also lowers with Inductor and reports the int8 kernels; `numeric=True`
    compares fp32 and int8 node by node on `example_inputs` (default: the first calibration batch).

    Raises `DumpDirectoryError` when `out_dir` exists and is not empty, unless `force` (which replaces
    only pt2q's own dump files). `strict=False` turns failures of the dump itself (not of the
    pipeline) into warnings. Pipeline errors are re-raised after the page and summary are written.
    """
    from ..capture import capture, normalize_inputs
    from ..passes.manager import observe_passes

    calib_data, example_inputs = quant_pipeline.split_calibration_data(config, calib_data, example_inputs,
                                                                       "dump_pipeline()")
    out = check_out_dir(out_dir, force)
    result = DumpResult(out_dir=out)
    recorder = _Recorder(out, strict)
    timings = result.timings
    args, kwargs = normalize_inputs(example_inputs)
    try:
        start = time.perf_counter()
        captured = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        timings["capture"] = time.perf_counter() - start
        recorder.reference.captured = captured
        _guarded(recorder, strict, "capture", lambda: recorder.add("capture", captured))
        with observe_passes(recorder):
            start = time.perf_counter()
            prepared = quant_pipeline.prepare(captured, config, caller="dump_pipeline()")
            timings["prepare"] = time.perf_counter() - start
            start = time.perf_counter()
            quant_pipeline.calibrate(prepared, calib_data, progress=progress)
            timings["calibrate"] = time.perf_counter() - start
            start = time.perf_counter()
            qmodel = quant_pipeline.convert(prepared)
            timings["convert"] = time.perf_counter() - start
        result.qmodel = qmodel
        result.smooth_quant = qmodel.meta.get(meta.SMOOTH_QUANT_REPORT)
        if numeric:
            def run_numeric():
                start = time.perf_counter()
                result.numeric, result.outputs = recorder.reference.compare(qmodel, args, kwargs)
                timings["numeric"] = time.perf_counter() - start
            _guarded(recorder, strict, "numeric", run_numeric)
        kernel_report: list[str] = []
        if compile and qmodel.meta.get(meta.QUANTIZED):
            from ..backends import inductor

            start = time.perf_counter()
            compiled = inductor.compile(qmodel, (args, kwargs))
            timings["compile"] = time.perf_counter() - start
            result.compiled, result.kernels = compiled, dict(compiled.int8_kernels)
            kernel_report = kernel_lines(result.kernels, quant_pipeline.count_quantized_layers(qmodel), compiled.guarded_inputs)
            recorder.add("inductor", None, kernel_report)
            if numeric:
                def run_compiled_numeric():
                    result.outputs += compare_compiled(recorder.reference.fp32, qmodel, compiled, args, kwargs)
                _guarded(recorder, strict, "numeric", run_compiled_numeric)
        if numeric:
            _guarded(recorder, strict, "numeric", lambda: (out / "numeric.txt").write_text("\n".join(
                numeric_text(result.numeric, result.outputs) + [""] + kernel_report + [""]
                + _report_lines(result.smooth_quant)) + "\n"))
    except BaseException as error:
        result.error = f"{type(error).__name__}: {error}"
        raise
    finally:
        result.stages = recorder.files
        timings["passes"] = recorder.pass_seconds
        strict_now = strict and result.error is None  # never hide the pipeline's own error
        if html:
            _guarded(recorder, strict_now, "html", lambda: _write_html(result, recorder))
        _guarded(recorder, strict_now, "summary", lambda: _write_summary(result, recorder))
    return result


def _guarded(recorder: _Recorder, strict: bool, what: str, function):
    try:
        return function()
    except Exception:  # noqa: BLE001
        if strict:
            raise
        log.warning("pt2q.debug: could not write %s:\n%s", what, traceback.format_exc())


def _write_summary(result: DumpResult, recorder: _Recorder) -> None:
    summary = {
        "stages": [{"index": s.index, "name": s.name, "text": s.text.name, "diff": s.diff.name if s.diff else None}
                   for s in result.stages],
        "numeric": [row.as_dict() for row in result.numeric],
        "outputs": [row.as_dict() for row in result.outputs],
        "smooth_quant": smooth_quant_dicts(result.smooth_quant),
        "int8_kernels": result.kernels,
        "timings": result.timings,
        "error": result.error,
    }
    result.summary = result.out_dir / "summary.json"
    result.summary.write_text(json.dumps(summary, indent=2) + "\n")


def _write_html(result: DumpResult, recorder: _Recorder) -> None:
    from .render import render_html

    start = time.perf_counter()
    page = render_html(recorder.snapshots, recorder.diffs, numeric=result.numeric, outputs=result.outputs,
                       smooth_quant=smooth_quant_dicts(result.smooth_quant), kernels=result.kernels,
                       error=result.error)
    result.html = result.out_dir / "index.html"
    result.html.write_text(page, encoding="utf-8")
    result.timings["html"] = time.perf_counter() - start


def dump_quantize(model, config, calib_data=None, *, example_inputs=None, dynamic_shapes=None,
                  progress: bool = True) -> GraphModule:
    """`pt2q.quantize` with `PT2Q_DUMP_DIR` set: same result, and a dump (text, diffs, numeric report,
    HTML; no compile) in a new numbered sub-directory `NNN_<ModelClass>` of that directory, so that
    several quantize() calls in one process never overwrite each other. Failures of the dump itself
    are logged, never raised."""
    root = Path(os.environ[DUMP_DIR_ENV])
    out = _next_run_dir(root, type(model).__name__)
    result = dump_pipeline(model, config, calib_data, example_inputs, out_dir=out, compile=False,
                           dynamic_shapes=dynamic_shapes, progress=progress, strict=False)
    log.warning("pt2q: %s is set: dumped the quantization passes to %s", DUMP_DIR_ENV, out)
    return result.qmodel


# -- models for `pt2q dump --model` ------------------------------------------------------------------
@dataclass
class ModelSpec:
    model: torch.nn.Module
    example_inputs: Any
    calib_data: list
    label: str


def load_factory(spec: str) -> ModelSpec:
    """`module:function` or `path/to/file.py:function`. The function returns `(model, example_inputs)`
    or `(model, example_inputs, calib_data)`; without calib_data the example is the one calibration batch."""
    import importlib
    import importlib.util
    import sys

    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise Pt2qError(f"--model {spec!r}: expected 'demo', 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise Pt2qError(f"--model {spec!r}: no file {module_name!r}")
            loader_spec = importlib.util.spec_from_file_location(f"_pt2q_dump_model_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to the user
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise Pt2qError(f"--model {spec!r}: cannot import {module_name!r}: {error}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise Pt2qError(f"--model {spec!r}: {module_name!r} has no function {function_name!r}")
    made = factory()
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise Pt2qError(f"--model {spec!r}: {function_name}() must return (model, example_inputs) or "
                        f"(model, example_inputs, calib_data); got {type(made).__name__}")
    model, example = made[0], made[1]
    calib = list(made[2]) if len(made) == 3 and made[2] is not None else [example]
    return ModelSpec(model, example, calib, f"{type(model).__name__} from {spec}")

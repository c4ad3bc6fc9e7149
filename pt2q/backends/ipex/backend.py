"""The IPEX flow: static int8 through IPEX's own prepare / convert, with pt2q's scales patched in.

Runs only where IPEX imports: intel-extension-for-pytorch 2.8 (its last release line) with torch 2.8.
pt2q's own pipeline needs torch 2.13, so the work is split over two environments:

1. pt2q's venv (torch 2.13): `pt2q.quantize(model, StaticQuantConfig(smooth_quant=...), calib_data)`,
   then `save_quantities(extract_quantities(qmodel), "quantities.json")`.
2. IPEX's venv (torch 2.8, `make test-ipex` builds one): `quantize(model, "quantities.json", calib_data)`
   runs `ipex.quantization.prepare` with IPEX's SmoothQuant qconfig and one calibration pass over
   `calib_data` (IPEX writes its qconf only for a calibrated model; its own values are kept for the int8
   ops pt2q has no layer for), saves the qconf, patches pt2q's scales in (qconf.py), loads the patched
   file into a fresh prepared copy, converts, and returns the `torch.jit.trace`d, frozen int8 model.

Nothing here imports intel_extension_for_pytorch until `quantize` (or `import_ipex`) is called; then a
missing or mismatched IPEX raises pt2q.errors.BackendUnavailable before IPEX is imported (IPEX 2.8
raises at import time on any other torch).
"""
from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ...capture import capture_mode, normalize_inputs
from ...errors import BackendUnavailable, CalibrationError
from .qconf import QconfPatchReport, patch_qconf_file
from .quantities import load_quantities, validate_quantities

__all__ = ["IPEX_TORCH", "IpexQuantized", "import_ipex", "ipex_unavailable_reason", "quantize"]

IPEX_TORCH = "2.8"  # the torch major.minor of IPEX's last release line
HOW_TO_GET = (f"IPEX's last release line (intel-extension-for-pytorch 2.8) needs torch {IPEX_TORCH}: "
              f"`make test-ipex` builds such a venv (torch==2.8.0, intel-extension-for-pytorch==2.8.0, "
              f"torchao==0.13.0; choose its folder with IPEX_VENV=...) and runs this backend there")
INSTEAD = ("For int8 on Intel CPUs with this torch, use pt2q.backends.inductor.compile(pt2q.quantize(...), "
           "example_inputs)")
_PACKAGE = "intel-extension-for-pytorch"
_MODULE = "intel_extension_for_pytorch"


def _major_minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


def ipex_unavailable_reason() -> str | None:
    """Why IPEX cannot be imported here (without importing it), or None when it should import."""
    torch_version = _major_minor(torch.__version__)
    try:
        ipex_version = importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec(_MODULE) is None:
            return f"{_PACKAGE} is not installed (torch {torch.__version__} here)"
        ipex_version = None  # importable without package metadata: let the import decide
    if ipex_version is not None and _major_minor(ipex_version) != torch_version:
        return (f"{_PACKAGE} {ipex_version} is installed but needs torch {_major_minor(ipex_version)}.*, "
                f"and torch {torch.__version__} is here")
    return None


def import_ipex():
    """The intel_extension_for_pytorch module, or BackendUnavailable saying what is missing and what to use."""
    reason = ipex_unavailable_reason()
    if reason is None:
        try:
            import intel_extension_for_pytorch as ipex
            return ipex
        except Exception as error:  # IPEX raises AttributeError, ImportError or OSError on a broken install
            reason = f"importing {_MODULE} failed: {type(error).__name__}: {error}"
    raise BackendUnavailable(f"IPEX backend unavailable: {reason}. {HOW_TO_GET}. {INSTEAD}.")


# GEMM-like ops whose int8 form IPEX's TorchScript passes build (fused into oneDNN Graph partitions).
_GEMM_KINDS = {"aten::linear": "linear", "aten::matmul": "matmul", "aten::conv1d": "conv", "aten::conv2d": "conv",
               "aten::conv3d": "conv", "aten::_convolution": "conv", "aten::bmm": "matmul", "aten::addmm": "linear"}
_INT8_KERNEL = re.compile(r"^(quantized::|ipex::q)")


def _count_int8_gemms(graph, counts: collections.Counter) -> None:
    for node in graph.nodes():
        if _INT8_KERNEL.match(node.kind()):
            counts[node.kind()] += 1
        if "Subgraph" in node.attributeNames():
            subgraph = node.g("Subgraph")
            kinds = [inner.kind() for inner in subgraph.nodes()]
            if "aten::dequantize" in kinds:  # a partition that takes int8 tensors in
                for kind in kinds:
                    if kind in _GEMM_KINDS:
                        counts[f"int8 {_GEMM_KINDS[kind]}"] += 1
        for block in node.blocks():
            _count_int8_gemms(block, counts)


@dataclass
class IpexQuantized:
    """The traced, frozen IPEX int8 model, the patch report, and where the two qconf files are."""
    model: torch.jit.ScriptModule
    report: QconfPatchReport
    qconf_path: Path           # IPEX's own, after its calibration
    patched_qconf_path: Path   # with pt2q's scales: the one the model was converted from
    example_inputs: tuple[tuple, dict] = field(repr=False, default=((), {}))

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def int8_ops(self) -> dict[str, int]:
        """{"int8 linear": n, "int8 matmul": m, ...}: the GEMMs that run on int8 inputs in the graph
        TorchScript optimised for the example inputs. IPEX hands dequantize -> linear / matmul -> ... to
        oneDNN Graph as fusion partitions; a GEMM counts when its partition takes int8 tensors in."""
        args, kwargs = self.example_inputs
        with torch.no_grad():
            for _ in range(3):  # the profiling executor optimises after its profiling runs
                self.model(*args, **kwargs)
        counts: collections.Counter = collections.Counter()
        _count_int8_gemms(torch.jit.last_executed_optimized_graph(), counts)
        return dict(counts)


def _batches(calib_data: Iterable) -> list[tuple[tuple, dict]]:
    if isinstance(calib_data, torch.Tensor):
        raise CalibrationError("calib_data is a bare tensor (it would be iterated row by row); pass a list of "
                               "batches")
    batches = []
    for position, batch in enumerate(calib_data):
        if batch is None:
            raise CalibrationError(f"calibration batch {position} is None")
        batches.append(normalize_inputs(batch))
    if not batches:
        raise CalibrationError("calib_data is empty: IPEX writes its qconf only for a calibrated model")
    return batches


def _prepare(ipex, model: torch.nn.Module, alpha: float, example: tuple[tuple, dict]):
    args, kwargs = example
    mapping = ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=alpha)
    with capture_mode(model):  # eval mode for the copy IPEX makes; the model's flags are restored
        return ipex.quantization.prepare(model, mapping, example_inputs=args or None,
                                         example_kwarg_inputs=kwargs or None, inplace=False)


def quantize(model: torch.nn.Module, quantities: dict[str, dict[str, Any]] | str | Path, calib_data: Iterable,
             example_inputs: Any = None, *, work_dir: str | Path | None = None, alpha: float = 0.5) -> IpexQuantized:
    """Quantize `model` to static int8 with IPEX, using pt2q's `quantities` (a dict from
    extract_quantities, or a file save_quantities wrote) for every int8 Linear / Conv module.

    `calib_data` are batches as for pt2q.quantize (tuples, keyword dicts or (args, kwargs) pairs), best the
    ones pt2q was calibrated with: IPEX calibrates on them once to write its qconf, and its values stay for
    int8 ops pt2q has no layer for (listed in `.report.kept_ipex`). `alpha` is IPEX's own SmoothQuant alpha
    for that pass; pt2q's factors replace it for every patched layer. The qconf files go to `work_dir` (a
    new temporary folder by default). `model` is not changed: IPEX prepares deep copies of it."""
    ipex = import_ipex()
    quantities = validate_quantities(quantities) if isinstance(quantities, dict) else load_quantities(quantities)
    batches = _batches(calib_data)
    example = normalize_inputs(example_inputs) if example_inputs is not None else batches[0]
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pt2q-ipex-"))
    folder.mkdir(parents=True, exist_ok=True)
    qconf_path, patched_path = folder / "ipex_qconf.json", folder / "ipex_qconf_pt2q.json"

    calibrated = _prepare(ipex, model, alpha, example)
    with torch.no_grad():
        for args, kwargs in batches:
            calibrated(*args, **kwargs)
    calibrated.save_qconf_summary(qconf_summary=str(qconf_path))
    del calibrated
    report = patch_qconf_file(qconf_path, quantities, patched_path)

    prepared = _prepare(ipex, model, alpha, example)
    prepared.load_qconf_summary(qconf_summary=str(patched_path))
    converted = ipex.quantization.convert(prepared)
    args, kwargs = example
    with torch.no_grad():
        traced = torch.jit.trace(converted, example_inputs=args or None, example_kwarg_inputs=kwargs or None,
                                 check_trace=False, strict=False)
        frozen = torch.jit.freeze(traced)
    return IpexQuantized(frozen, report, qconf_path, patched_path, example)

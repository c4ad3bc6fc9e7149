"""Run torchao's own X86InductorQuantizer unit tests against pt2q's X86Quantizer.

torchao's test file is not part of pt2q (and is not copied into it): take it from torchao's public
repository at the tag matching the installed torchao, e.g.

    git -C <torchao checkout> show v0.18.0:test/quantization/pt2e/test_x86inductor_quantizer.py \
        > /tmp/test_x86inductor_quantizer.py
    .venv/bin/python tools/torchao_x86_suite.py /tmp/test_x86inductor_quantizer.py --out suite.json

The file imports `X86InductorQuantizer` from torchao; before pytest imports it, this script replaces that
name with `ConfigAdapter`, a subclass of pt2q's X86Quantizer that only translates configuration:

- torchao `QuantizationConfig` -> a pt2q scheme built by pt2q's own constructors
  (`static_scheme` / `dynamic_scheme` / `qat_scheme` / `fp16_weight_scheme`), reading from the config
  only what a user would choose: static or dynamic, QAT or not, the activation observer, 7-bit
  activations (`reduce_range`);
- `set_module_name_qconfig(name)` -> `set_module_name(re.escape(name))`;
- `set_module_type_qconfig(cls)` / `set_function_type_qconfig(fn)` -> `set_op_type(...)`.

Everything the tests check (annotations, observers, Q/DQ nodes, lowering) is pt2q's. Writes a JSON
summary (per test: passed / failed / skipped, with the first line of a failure).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F

from pt2q.quantizers import X86Quantizer

aten = torch.ops.aten

# torchao's function types -> the ATen op our set_op_type takes (module classes pass through).
FUNCTION_OPS = {
    F.linear: aten.linear.default,
    F.conv1d: aten.conv1d.default,
    F.conv2d: aten.conv2d.default,
    torch.matmul: aten.matmul.default,
    F.max_pool2d: aten.max_pool2d.default,
    F.adaptive_avg_pool2d: aten.adaptive_avg_pool2d.default,
    torch.cat: aten.cat.default,
    torch.flatten: aten.flatten.using_ints,
    torch.mul: aten.mul.Tensor,
    F.avg_pool2d: aten.avg_pool2d.default,
}


def observer_name(spec) -> str:
    """pt2q's activation observer name for a torchao activation spec's observer constructor."""
    from torchao.quantization.pt2e.observer import (
        HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
    )
    ctr = spec.observer_or_fake_quant_ctr
    cls = getattr(ctr, "p", None)
    cls = getattr(cls, "func", cls) if cls is not None else ctr
    for name, known in (("histogram", HistogramObserver), ("moving_average", MovingAverageMinMaxObserver),
                        ("minmax", MinMaxObserver)):
        if isinstance(cls, type) and issubclass(cls, known):
            return name
    return "histogram"  # torchao's default static observer; QAT fake-quants carry no observer choice


def translate(config):
    """A torchao QuantizationConfig (or None) -> a pt2q QuantScheme (or None)."""
    if config is None:
        return None
    activation = config.input_activation
    if activation is None:
        if config.weight is not None and config.weight.dtype == torch.float16:
            return X86Quantizer.float16_weight_scheme()
        return X86Quantizer.weight_only_scheme()
    guard = "activations7" if activation.quant_max - activation.quant_min < 255 else "off"
    if config.is_qat:
        return X86Quantizer.qat_scheme(dynamic=activation.is_dynamic, saturation_guard=guard)
    if activation.is_dynamic:
        return X86Quantizer.dynamic_scheme(saturation_guard=guard)
    return X86Quantizer.static_scheme(observer=observer_name(activation), saturation_guard=guard)


class ConfigAdapter(X86Quantizer):
    """X86Quantizer with torchao X86InductorQuantizer's configuration methods."""

    torchao_global_config = None

    def set_global(self, config):
        if _is_scheme(config):
            return super().set_global(config)
        self.torchao_global_config = config
        return super().set_global(translate(config))

    def get_global_quantization_config(self):
        return self.torchao_global_config

    def set_module_name_qconfig(self, module_name: str, config):
        return self.set_module_name(re.escape(module_name), translate(config))

    def set_module_type_qconfig(self, module_type, config):
        return self.set_op_type(module_type, translate(config))

    def set_function_type_qconfig(self, function_type, config):
        return self.set_op_type(FUNCTION_OPS.get(function_type, function_type), translate(config))


def _is_scheme(config) -> bool:
    from pt2q.quantizers import QuantScheme
    return config is None or isinstance(config, QuantScheme)


class _Collector:
    """pytest plugin: one record per test."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or report.outcome != "passed":
            record = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
            if report.failed:
                text = str(report.longrepr)
                lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
                record["error"] = (lines[0] if lines else text.splitlines()[-1])[:300]
            self.results.setdefault(name, record)
            if report.failed:
                self.results[name] = record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", help="torchao's test_x86inductor_quantizer.py (see the module docstring)")
    parser.add_argument("--out", help="JSON summary path")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (a subset of the tests)")
    parser.add_argument("--torchao", action="store_true",
                        help="run the file against torchao's own quantizer (the reference)")
    args = parser.parse_args(argv)

    import pytest
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    if not args.torchao:
        xiq.X86InductorQuantizer = ConfigAdapter
    collector = _Collector()
    pytest_args = [args.test_file, "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    start = time.time()
    pytest.main(pytest_args, plugins=[collector])
    outcomes = [r["outcome"] for r in collector.results.values()]
    summary = {
        "quantizer": "torchao X86InductorQuantizer" if args.torchao else "pt2q X86Quantizer (ConfigAdapter)",
        "torch": torch.__version__,
        "passed": outcomes.count("passed"), "failed": outcomes.count("failed"),
        "skipped": outcomes.count("skipped"), "total": len(outcomes),
        "seconds": round(time.time() - start, 1),
        "tests": dict(sorted(collector.results.items())),
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "tests"}))
    for name, record in summary["tests"].items():
        if record["outcome"] == "failed":
            print(f"FAILED {name}: {record.get('error', '')}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

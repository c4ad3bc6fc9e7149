"""`torch.compile(model, backend="pt2q", options={...})`: quantize each Dynamo subgraph, lower with Inductor.

Registered through the `torch_dynamo_backends` entry point, so it works without importing pt2q first.

Options:
  mode          "dynamic" (default; int8 dynamic, no calibration), "weight_only" (int8 RTN weights),
                "rtn" (RTNConfig: 4-bit weights, groups of 32, unless `config` says otherwise),
                "hqq" (HQQConfig: 4-bit weights, groups of 64, fitted scales and float zero points),
                "static" (the first `calib_steps` calls run with observers and return fp32 results,
                then the subgraph is converted and every later call runs int8).
  calib_steps   calls used for static calibration (default 8).
  config        a pt2q StaticQuantConfig / DynamicQuantConfig / WeightOnlyQuantConfig, for its
                `set_local` rules and settings (the mode follows the config's kind).
  skip          module-name regexes kept in fp32 (a shorthand for config.set_local(regex, None)).
  smooth_quant  a SmoothQuantConfig, or an alpha (float or "auto"), for static mode.
  strict        raise instead of falling back to plain Inductor when quantizing a subgraph fails.
  target        where the subgraphs run (the lowerings of pt2q.compile / pt2q.targets):
                "cpu" (default: X86 quantizer, Inductor), "xpu" (XPU quantizer, Inductor on the XPU; needs
                an XPU device), "fp8" or "hpu" (FP8Config, static or dynamic by `mode`, lowered by
                pt2q.backends.habana to HPU fp8 ops — emulated on a CPU), "auto" (pt2q.target_device()).
                An FP8Config as `config` implies "fp8".

Each subgraph is handled on its own (graph breaks are fine); one without quantizable layers goes
straight to Inductor. Weights are frozen at compile time (inference). A recompile of the same subgraph
for new shapes reuses the calibration already collected. Calibration belongs to the model (its
parameter objects) and the options: another model never sees it, compiles of the same model with the
same options share it, and it is dropped with the model; a subgraph Dynamo makes dynamic (symbolic
sizes) gets one quantized build per concrete input signature. Inputs are never written (see
`pt2q.backends.inductor`).
"""
from __future__ import annotations

import copy
import difflib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import ConfigError

log = logging.getLogger(__name__)

# The kinds of pt2q.config.CONFIG_KINDS that quantize a subgraph on its own; GPTQ and AWQ calibrate a
# whole model block by block, which a Dynamo subgraph (graph breaks, recompiles) is not.
_MODES = ("dynamic", "weight_only", "static", "rtn", "hqq")
_OPTIONS = ("mode", "calib_steps", "config", "skip", "smooth_quant", "strict", "target")
_TARGETS = ("cpu", "xpu", "fp8", "hpu", "auto")
_FP8_MODES = ("static", "dynamic")  # FP8Config(activation=...)


@dataclass
class BackendOptions:
    mode: str = "dynamic"
    calib_steps: int = 8
    config: Any = None
    skip: tuple = ()
    smooth_quant: Any = None
    strict: bool = False
    target: str = "cpu"

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        for name in options:
            if name not in _OPTIONS:
                close = difflib.get_close_matches(name, _OPTIONS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"pt2q backend: unknown option {name!r}{hint}; valid options: {', '.join(_OPTIONS)}")
        parsed = cls(**options)
        parsed.target = _resolve_target(parsed.target, parsed.config, "target" in options)
        if parsed.config is not None and "mode" not in options:
            from .config import config_kind

            parsed.mode = getattr(parsed.config, "activation", None) if parsed.target == "fp8" else \
                config_kind(parsed.config) or parsed.mode
        if parsed.target == "fp8" and parsed.mode not in _FP8_MODES:
            raise ConfigError(f"pt2q backend: target 'fp8' quantizes with FP8Config in mode 'static' or 'dynamic', "
                              f"got mode={parsed.mode!r}")
        if parsed.mode in ("gptq", "awq"):
            raise ConfigError(f"pt2q backend: {parsed.mode.upper()} calibrates a whole model block by block and "
                              "cannot run per Dynamo subgraph: quantize with pt2q.quantize(model, config, calib_data) "
                              "and compile the result with pt2q.backends.inductor.compile, or use mode='rtn'")
        if parsed.mode not in _MODES:
            raise ConfigError(f"pt2q backend: mode={parsed.mode!r}; valid modes: {', '.join(_MODES)}")
        if not isinstance(parsed.calib_steps, int) or parsed.calib_steps < 1:
            raise ConfigError(f"pt2q backend: calib_steps must be a positive int, got {parsed.calib_steps!r}")
        if isinstance(parsed.skip, str):
            parsed.skip = (parsed.skip,)
        parsed.quant_config()  # config mistakes are the user's to fix: raise now, never fall back
        return parsed

    def quant_config(self):
        from .config import CONFIG_KINDS as kinds
        from .config import SmoothQuantConfig

        if self.target == "fp8":
            return self._fp8_config()
        # A copy: the skip / smooth_quant options must not change the user's config object.
        config = copy.deepcopy(self.config) if self.config is not None else kinds[self.mode]()
        if self.target == "xpu":
            from .targets import TARGETS, config_for

            config = config_for(TARGETS["xpu"], config)
        if not isinstance(config, kinds[self.mode]):
            raise ConfigError(f"pt2q backend: mode {self.mode!r} needs a {kinds[self.mode].__name__}, "
                              f"got {type(config).__name__}")
        for regex in self.skip:
            config.set_local(regex, None)
        if self.smooth_quant is not None:
            if self.mode != "static":
                raise ConfigError("pt2q backend: smooth_quant needs mode='static'")
            config.smooth_quant = self.smooth_quant if isinstance(self.smooth_quant, SmoothQuantConfig) \
                else SmoothQuantConfig(alpha=self.smooth_quant)
        return config

    def _fp8_config(self):
        from .config import FP8Config

        config = copy.deepcopy(self.config) if self.config is not None else FP8Config(activation=self.mode)
        if not isinstance(config, FP8Config):
            raise ConfigError(f"pt2q backend: target 'fp8' takes an FP8Config as config, got {type(config).__name__}")
        if config.activation != self.mode:
            raise ConfigError(f"pt2q backend: mode={self.mode!r} but the FP8Config has activation={config.activation!r}")
        if self.smooth_quant is not None:
            raise ConfigError("pt2q backend: smooth_quant applies to int8 (target 'cpu' or 'xpu'), not to FP8")
        for regex in self.skip:
            config.set_local(regex, None)
        return config

    def lower(self, qmodel: GraphModule, example: tuple):
        """The target's lowering of one quantized subgraph: a callable taking the runtime inputs."""
        if self.target == "fp8":
            from .backends import habana

            return habana.lower(qmodel)
        if self.target == "xpu":
            from .backends import xpu

            return xpu.compile(qmodel, example)
        from .backends import inductor

        return inductor.compile_graph(qmodel, example)

    def fingerprint(self) -> str:
        """Everything that shapes the quantized build, as text: builds that differ here never share
        calibration."""
        rules = getattr(self.config, "local_rules", None)
        return repr((self.mode, self.calib_steps, self.config, rules, tuple(self.skip), self.smooth_quant,
                     self.target))


def _resolve_target(target, config, given: bool) -> str:
    """The option `target` as one of cpu / xpu / fp8 ("hpu" is "fp8"; "auto" asks pt2q.target_device()).
    An FP8Config implies fp8. Hardware a target needs is checked now: a missing XPU is the user's to fix,
    not a reason to fall back quietly."""
    from .config import FP8Config
    from .errors import BackendUnavailable

    if target not in _TARGETS:
        raise ConfigError(f"pt2q backend: target={target!r}; valid targets: {', '.join(map(repr, _TARGETS))}")
    if target == "auto":
        from .targets import resolve

        target = {"hpu": "fp8", "xpu": "xpu"}.get(resolve("auto").device, "cpu")
    target = "fp8" if target == "hpu" else target
    if isinstance(config, FP8Config):
        if given and target != "fp8":
            raise ConfigError(f"pt2q backend: an FP8Config runs on target 'fp8', not {target!r}")
        target = "fp8"
    if target == "xpu":
        from .device import probe_xpu

        xpu = probe_xpu()
        if not xpu.available:
            raise BackendUnavailable(f"pt2q backend: target 'xpu' needs an Intel GPU and torch.xpu.is_available() is "
                                     f"False here ({xpu.detail}); use target='cpu' (the XPU quantizer's graphs also "
                                     "run on the CPU path: pt2q.compile(qmodel, example_inputs, backend='cpu'))")
    return target


# -- freezing the Dynamo subgraph's parameters ----------------------------------------------------
def _is_frozen_input(placeholder_name: str, value) -> bool:
    """Dynamo passes parameters and buffers as graph inputs; they become constants for quantization."""
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in placeholder_name or \
        "_buffers_" in placeholder_name


def _frozen_positions(graph_module: GraphModule, example_inputs: list) -> list[int]:
    names = [n.name for n in graph_module.graph.find_nodes(op="placeholder")]
    return [position for position, (name, value) in enumerate(zip(names, example_inputs))
            if isinstance(value, torch.Tensor) and _is_frozen_input(name, value)]


class _FrozenSubgraph(torch.nn.Module):
    """Calls the Dynamo graph with its parameters held as this module's constants."""

    def __init__(self, graph_module: GraphModule, example_inputs: list):
        super().__init__()
        self.graph_module = graph_module
        self.frozen_positions = _frozen_positions(graph_module, example_inputs)
        for position in self.frozen_positions:
            self.register_buffer(f"frozen_{position}", example_inputs[position].detach(), persistent=False)
        self.num_inputs = len(graph_module.graph.find_nodes(op="placeholder"))
        self.runtime_positions = [p for p in range(self.num_inputs) if p not in self.frozen_positions]

    def forward(self, *runtime):
        merged = [None] * self.num_inputs
        for position, value in zip(self.runtime_positions, runtime):
            merged[position] = value
        for position in self.frozen_positions:
            merged[position] = getattr(self, f"frozen_{position}")
        return self.graph_module(*merged)

    def runtime_inputs(self, all_inputs) -> tuple:
        return tuple(all_inputs[p] for p in self.runtime_positions)


# -- per-subgraph runners -------------------------------------------------------------------------
def _structure_key(graph_module: GraphModule) -> tuple:
    """The subgraph's tensor computation. Size arithmetic is left out: a recompile with symbolic sizes
    adds such nodes but is the same subgraph, and must find the calibration already collected."""
    return tuple((node.op, str(node.target)) for node in graph_module.graph.nodes
                 if node.op not in ("placeholder", "output")
                 and isinstance(node.meta.get("example_value"), torch.Tensor))


@dataclass
class _Calibration:
    """The observers of a static subgraph's latest build (live modules, read only when a recompile
    starts a new build) and the calibration calls made so far, shared by its recompiles."""

    observers: dict = field(default_factory=dict)
    steps: int = 0


# Calibration state per (subgraph structure, backend options, identity of the model's parameters).
# The parameters are the model's own objects, which Dynamo passes again on every recompile, so a
# model's recompiles find its calibration and another model (other parameters) never does. An entry is
# dropped when any of its parameters is garbage-collected: nothing outlives the model, and an id is
# never reused while its entry exists.
_CALIBRATIONS: dict[tuple, _Calibration] = {}
_LOCK = threading.Lock()


def _calibration_for(structure: tuple, options: "BackendOptions", parameters: list[torch.Tensor]) -> _Calibration:
    key = (structure, options.fingerprint(), tuple(id(p) for p in parameters))
    calibration = _CALIBRATIONS.get(key)
    if calibration is None:
        calibration = _CALIBRATIONS[key] = _Calibration()
        for parameter in parameters:
            weakref.finalize(parameter, _CALIBRATIONS.pop, key, None)
    return calibration


class _StaticRunner:
    """Observed graph for the first `calib_steps` calls (fp32 results), then the int8 Inductor build.
    The pipeline's prepare and convert stages (pt2q.pipeline) run here; between them the user's own
    calls are the calibration pass (the observers record as the prepared graph runs)."""

    def __init__(self, frozen: _FrozenSubgraph, captured: GraphModule, config, calib_steps: int,
                 calibration: _Calibration, lower):
        from . import pipeline

        self.frozen, self.calib_steps, self.lower = frozen, calib_steps, lower
        self.prepared = pipeline.prepare(captured, config, caller="pt2q backend")
        self.calibration = calibration
        observers = self._observers()
        for name, module in observers.items():
            earlier = self.calibration.observers.get(name)
            if earlier is not None:  # a recompile of this subgraph: keep what was calibrated
                module.load_state_dict(earlier.state_dict(), strict=False)
        self.calibration.observers = observers
        self.compiled = None
        if self.calibration.steps >= calib_steps:
            self._finish(self.frozen_example())

    def frozen_example(self):
        from . import meta

        args, kwargs = self.prepared.meta[meta.EXAMPLE_INPUTS]
        return args

    def _observers(self) -> dict:
        from torchao.quantization.pt2e.observer import ObserverBase

        return {n: m for n, m in self.prepared.named_modules() if isinstance(m, ObserverBase)}

    def _finish(self, example) -> None:
        from . import pipeline

        qmodel = pipeline.convert(self.prepared)
        self.compiled = self.lower(qmodel, tuple(example))
        self.prepared = None
        log.info("pt2q backend: static subgraph converted after %d calibration calls; int8 kernels %s",
                 self.calibration.steps, getattr(self.compiled, "int8_kernels", "n/a (FP8)"))

    def __call__(self, *all_inputs):
        runtime = self.frozen.runtime_inputs(all_inputs)
        if self.compiled is not None:
            return self.compiled(*runtime)
        with torch.no_grad():
            outputs = self.prepared(*runtime)
        self.calibration.steps += 1
        if self.calibration.steps >= self.calib_steps:
            self._finish(runtime)
        return outputs


class _CompiledRunner:
    def __init__(self, frozen: _FrozenSubgraph, compiled):
        self.frozen, self.compiled = frozen, compiled

    def __call__(self, *all_inputs):
        return self.compiled(*self.frozen.runtime_inputs(all_inputs))


def _compile_subgraph(graph_module: GraphModule, example_inputs: list, options: BackendOptions):
    from . import pipeline
    from .capture import capture
    from .passes.manager import PassManager
    from .passes.normalize_module_names import NormalizeModuleNames
    from .passes.restore_dynamo_module_stack import RestoreDynamoModuleStack
    from .quantizers import weighted_ops

    frozen = _FrozenSubgraph(graph_module, example_inputs)
    runtime = frozen.runtime_inputs(example_inputs)
    captured = capture(frozen, runtime, {})
    PassManager([RestoreDynamoModuleStack(graph_module), NormalizeModuleNames()])(captured)
    if not any(node.target in weighted_ops() or node.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
               for node in captured.graph.nodes):
        return None  # nothing to quantize
    config = options.quant_config()
    if options.mode == "static":
        parameters = [example_inputs[position] for position in frozen.frozen_positions]
        calibration = _calibration_for(_structure_key(graph_module), options, parameters)
        return _StaticRunner(frozen, captured, config, options.calib_steps, calibration, options.lower)
    qmodel = pipeline.quantize(captured, config, example_inputs=runtime, progress=False, caller="pt2q backend")
    if pipeline.count_quantized_layers(qmodel) == 0:
        return None
    return _CompiledRunner(frozen, options.lower(qmodel, tuple(runtime)))


_MISSING = object()


class _SubgraphDispatch:
    """Picks the build for a call of one Dynamo subgraph. pt2q freezes parameters (and, for symbolic
    subgraphs, shapes) into each build, but Dynamo reuses a compiled subgraph for every instance of a
    model class when the backend options are equal, passing that instance's parameters as inputs; and a
    symbolic subgraph is called with many shapes. So builds are keyed by the identity of the parameters
    passed (and the shapes): another model gets its own build and calibration, never a stale one. A
    build is dropped when its parameters are garbage-collected. Inputs that cannot be quantized run on
    plain Inductor (`fallback`)."""

    def __init__(self, graph_module: GraphModule, example_inputs: list, options: BackendOptions,
                 fallback=None, symbolic: bool = False):
        self.graph_module, self.options, self._fallback = graph_module, options, fallback
        self.frozen_positions = _frozen_positions(graph_module, example_inputs)
        self.symbolic = symbolic
        self.builds: dict[tuple, Any] = {}

    def key(self, inputs) -> tuple:
        identity = tuple(id(inputs[p]) for p in self.frozen_positions)
        if not self.symbolic:
            return identity, ()
        return identity, tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in inputs)

    def add(self, inputs, build, key: tuple | None = None) -> None:
        key = self.key(inputs) if key is None else key
        self.builds[key] = build
        for position in self.frozen_positions:
            weakref.finalize(inputs[position], self.builds.pop, key, None)

    def fallback(self, inputs):
        if self._fallback is None:  # built on first need: holding the first call's tensors would keep them alive
            from torch._inductor.compile_fx import compile_fx

            self._fallback = compile_fx(self.graph_module, list(inputs))
        return self._fallback

    def __call__(self, *inputs):
        key = self.key(inputs)
        build = self.builds.get(key, _MISSING)
        if build is _MISSING:
            try:
                with _LOCK:
                    build = _compile_subgraph(self.graph_module, list(inputs), self.options)
            except Exception as error:  # noqa: BLE001 - same policy as the backend itself
                if self.options.strict:
                    raise
                log.warning("pt2q backend: inputs %s run on plain Inductor (not quantized): %s: %s",
                            key[1] or "of another model", type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "")
                build = None
            self.add(inputs, build, key)
        return (build or self.fallback(inputs))(*inputs)


def backend(graph_module: GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """The Dynamo backend. `mode` is torch.compile's own mode argument (passed on to plain Inductor)."""
    from torch._inductor.compile_fx import compile_fx

    parsed = BackendOptions.parse(options)  # bad options are the user's to fix: always raise
    if any(not isinstance(value, torch.Tensor) for value in example_inputs):  # symbolic sizes
        return _SubgraphDispatch(graph_module, example_inputs, parsed, compile_fx(graph_module, example_inputs),
                                 symbolic=True)
    try:
        with _LOCK:
            runner = _compile_subgraph(graph_module, list(example_inputs), parsed)
    except Exception as error:  # noqa: BLE001 - any failure falls back to plain Inductor unless strict
        if parsed.strict:
            raise
        log.warning("pt2q backend: this subgraph runs on plain Inductor (not quantized): %s: %s",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        runner = None
    if runner is None:
        log.info("pt2q backend: subgraph with nothing to quantize goes to plain Inductor")
        return compile_fx(graph_module, example_inputs)
    dispatch = _SubgraphDispatch(graph_module, example_inputs, parsed)
    dispatch.add(example_inputs, runner)
    return dispatch

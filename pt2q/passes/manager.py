"""The pass manager: runs a declared list of passes in order, checks the graph after each and times them.

A pass is any object with `call(graph_module) -> PassResult` (torch's `PassBase` subclasses qualify) and a
`name`. What a pass found or did is its `report`; a report that is a `PassReport` (a one-line `summary()`
and detail `lines()`) is shown by the dump tool as it is, whatever the pass. Observers registered with
`add_observer` see every intermediate graph of that manager; those installed with `observe_passes()` see
the graphs of every manager while the context lasts (the dump tool uses this to follow the whole
pipeline).

Managers nest: a pipeline stage (pt2q/pipeline.py) runs the passes of its algorithm through another
manager. Each `PassRecord` says how deep it ran (`depth`, 0 for the outermost) and how many passes ran
inside it (`inner`). A pass that only groups others declares `groups_passes = True`; its record is then
`composite` when passes ran inside it, and an observer that shows graphs skips it (its inner passes
showed every change).
"""
from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

log = logging.getLogger(__name__)

__all__ = ["GraphPass", "Pass", "PassManager", "PassRecord", "PassReport", "PassResult", "observe_passes"]

PassObserver = Callable[[str, GraphModule, "PassRecord"], None]
_GLOBAL_OBSERVERS: list[PassObserver] = []


@contextlib.contextmanager
def observe_passes(observer: PassObserver):
    """Call `observer(pass_name, graph_module, record)` after every pass any manager runs, in this block."""
    _GLOBAL_OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _GLOBAL_OBSERVERS.remove(observer)


@runtime_checkable
class PassReport(Protocol):
    """A pass's typed report, readable by people: one summary line and detail lines."""

    def summary(self) -> str: ...

    def lines(self) -> list[str]: ...


class GraphPass(Protocol):
    name: str

    def call(self, graph_module: GraphModule) -> PassResult: ...


class Pass(abc.ABC):
    """Base of pt2q's passes: a `name`, `call(graph_module) -> PassResult`, and `report`, which holds what
    the last call found or did (a `PassReport` where people read it; None before the first call)."""

    name: str = ""
    report: object = None

    @abc.abstractmethod
    def call(self, graph_module: GraphModule) -> PassResult:
        """Rewrite (or analyse) `graph_module`; say whether it changed."""


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    report: object = None
    depth: int = 0   # how many passes were running around this one (0: run by the outermost manager)
    inner: int = 0   # passes that ran inside this one, through nested managers
    composite: bool = False  # a grouping pass (groups_passes) whose inner passes showed its changes


_running: list[list[int]] = []  # one inner-pass counter per pass being run, outermost first


@dataclass
class PassManager:
    passes: Sequence[GraphPass]
    observers: list[PassObserver] = field(default_factory=list)

    def add_observer(self, observer: PassObserver) -> None:
        self.observers.append(observer)

    def __call__(self, graph_module: GraphModule) -> tuple[GraphModule, list[PassRecord]]:
        records = []
        for graph_pass in self.passes:
            depth = len(_running)
            for counter in _running:
                counter[0] += 1
            _running.append([0])
            start = time.perf_counter()
            try:
                result = graph_pass.call(graph_module)
            finally:
                inner = _running.pop()[0]
            graph_module = result.graph_module
            composite = bool(getattr(graph_pass, "groups_passes", False)) and inner > 0
            if result.modified and not composite:  # a composite pass's inner managers recompiled already
                graph_module.graph.lint()
                graph_module.recompile()
            record = PassRecord(graph_pass.name, time.perf_counter() - start, result.modified,
                                getattr(graph_pass, "report", None), depth, inner, composite)
            log.debug("pass %s: %.3fs modified=%s", record.name, record.seconds, record.modified)
            records.append(record)
            for observer in [*self.observers, *_GLOBAL_OBSERVERS]:
                observer(graph_pass.name, graph_module, record)
        return graph_module, records

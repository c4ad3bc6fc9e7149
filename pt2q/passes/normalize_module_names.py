"""Rewrite Dynamo-style module paths in `nn_module_stack` metadata to `named_modules()` names.

Graphs that come from `torch.compile` carry paths such as `L['self'].encoder.layer[0]._modules['fc']`;
rules by module name (`set_local`, SmoothQuant alpha keys) and reports expect `encoder.layer.0.fc`.
"""
from __future__ import annotations

import re

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult
from .manager import Pass

_ROOT = re.compile(r"^L\['[^']*'\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\['([^']+)'\]")
_GETATTR = re.compile(r"getattr\((.*), '([^']+)'\)")


def normalize_module_path(path: str) -> str:
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = _ROOT.sub("", path)
    path = _INDEX.sub(r".\1", path)
    path = _KEY.sub(r".\1", path)
    path = path.replace("._modules.", ".").replace("_modules.", "")
    return path.strip(".")


class NormalizeModuleNames(Pass):
    name = "normalize_module_names"
    report = None

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if not stack:
                continue
            rewritten = {}
            for key, (path, cls) in stack.items():
                clean = normalize_module_path(str(path))
                modified |= clean != path
                rewritten[key] = (clean, cls)
            node.meta["nn_module_stack"] = rewritten
        return PassResult(graph_module, modified)

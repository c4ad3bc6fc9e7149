"""Graph dump debugging tool: follow every pass of the quantization pipeline.

    result = pt2q.debug.dump_pipeline(model, config, calib_data, out_dir="dump")   # or: pt2q dump ...
    result.numeric[0]          # the worst quantized node (lowest SQNR)
    result.html                # dump/index.html: graph, per-node table, numeric report, every stage

Setting `PT2Q_DUMP_DIR` makes every `pt2q.quantize` call dump its passes into a new sub-directory.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "dump_pipeline": "pipeline", "dump_quantize": "pipeline", "DumpResult": "pipeline",
    "DumpDirectoryError": "pipeline", "DUMP_DIR_ENV": "pipeline",
    "graph_text": "text", "snapshot": "text", "unified_diff": "text", "GraphSnapshot": "text",
    "compare_graphs": "numeric", "NumericRow": "numeric", "sqnr_db": "numeric",
    "render_html": "render", "graph_svg": "render",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

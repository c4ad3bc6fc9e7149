"""Inductor backend (Intel CPU): int8 oneDNN kernels through Inductor with freezing. Runs here for real."""
from .lowering import CompiledQuantModel, compile, compile_graph, inputs_reaching_add

__all__ = ["CompiledQuantModel", "compile", "compile_graph", "inputs_reaching_add"]

"""Inductor backend (Intel CPU): int8 oneDNN kernels through Inductor with freezing. Runs here for real."""
from .lowering import CompiledQuantModel, compile, compile_graph, inputs_reaching_add
from .saturation import Int8SaturationWarning, saturating_layers

__all__ = ["CompiledQuantModel", "Int8SaturationWarning", "compile", "compile_graph", "inputs_reaching_add",
           "saturating_layers"]

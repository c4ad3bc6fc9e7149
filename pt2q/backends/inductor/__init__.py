"""Inductor backend (Intel CPU): int8 oneDNN kernels through Inductor with freezing, and ATen's int8/int4
weight-only kernels for pt2q's packed weights. Runs here for real."""
from .lowering import CompiledQuantModel, compile, compile_graph, inputs_reaching_add
from .saturation import Int8SaturationWarning, saturating_layers
from .weight_only import LowerWeightOnly, WeightOnlyLayer, WeightOnlyReport

__all__ = ["CompiledQuantModel", "Int8SaturationWarning", "LowerWeightOnly", "WeightOnlyLayer", "WeightOnlyReport",
           "compile", "compile_graph", "inputs_reaching_add", "saturating_layers"]

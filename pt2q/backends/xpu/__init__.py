"""XPU backend (Intel GPU): XPUQuantizer graphs, signed int8 activations, compiled with Inductor.

`compile` runs on an XPU device only (it raises BackendUnavailable without one, as on the torch CPU
build); `compile_on_cpu` runs the same graphs through Inductor's CPU path (`pt2q.backends.inductor`),
which is what runs, and is tested, on a machine without an Intel GPU. See lowering.py for what the CPU's
int8 kernels take.
"""
from .lowering import (INT8_CONV_OPS, activations_as_uint8, compile, compile_on_cpu, graph_on_device,
                       signed_int8_conv_inputs)

__all__ = ["INT8_CONV_OPS", "activations_as_uint8", "compile", "compile_on_cpu", "graph_on_device",
           "signed_int8_conv_inputs"]

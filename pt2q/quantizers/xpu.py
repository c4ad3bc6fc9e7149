"""XPUQuantizer: Intel GPU. Activations signed int8 [-128, 127] affine per tensor, weights int8
symmetric per output channel. Runs here through CPU emulation of the Q/DQ graph (no XPU device)."""
import torch

from .base import RuleQuantizer


class XPUQuantizer(RuleQuantizer):
    activation_dtype = torch.int8
    targets_this_cpu = False  # an Intel GPU's int8 dot products accumulate in int32: no CPU guard

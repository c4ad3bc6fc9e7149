"""X86Quantizer: Intel CPU (oneDNN through Inductor). Activations uint8 [0, 255] affine per tensor,
weights int8 symmetric per output channel: the combination oneDNN's VNNI/AMX int8 kernels take."""
import torch

from .base import RuleQuantizer


class X86Quantizer(RuleQuantizer):
    activation_dtype = torch.uint8

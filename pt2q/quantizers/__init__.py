"""Quantizers: torchao `Quantizer` subclasses driven by the pattern table in `rules.py`."""
from .fp8 import FP8Quantizer, fp8_scheme
from .base import QuantScheme, RuleQuantizer, make_scheme
from .rules import RULES, Role, Rule, weighted_ops
from .x86 import X86Quantizer
from .xpu import XPUQuantizer

QUANTIZERS = {"x86": X86Quantizer, "xpu": XPUQuantizer}

__all__ = ["FP8Quantizer", "QUANTIZERS", "QuantScheme", "RULES", "Role", "Rule", "RuleQuantizer", "X86Quantizer",
           "XPUQuantizer", "fp8_scheme", "make_scheme", "weighted_ops"]

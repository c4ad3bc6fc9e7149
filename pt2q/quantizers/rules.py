"""The pattern table: which ATen ops the X86 and XPU quantizers annotate, and how.

Rules match ATen ops of the exported graph directly (not export source partitions), so a layer is
found whatever Python module produced it. Unary post-ops (relu, gelu, ...) need no rule: quantizing
the input of the *next* quantized op places the quantize after them, which is the shape Inductor fuses
into one int8 kernel (`dq -> conv -> relu -> q`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

aten = torch.ops.aten


class Role(enum.Enum):
    WEIGHTED = "weighted"          # activation input(s) + a constant weight, per-channel weight qparams
    ACTIVATIONS = "activations"    # every listed input is an activation (attention matmul)
    PROPAGATE = "propagate"        # int8 in, int8 out with the input's qparams (pooling, flatten, cat)
    RESIDUAL = "residual"          # binary add after a quantized producer: quantize the extra input


@dataclass(frozen=True)
class Rule:
    name: str
    ops: frozenset
    role: Role
    activation_args: tuple[int, ...] = (0,)
    weight_arg: int | None = None
    weight_channel_axis: int = 0
    # Producers after which a RESIDUAL rule applies (Inductor fuses `conv + add` only with a
    # dequantized extra input; for linear it fuses an fp32 one, and quantizing a transformer's
    # residual stream costs accuracy for no speed).
    after: frozenset = frozenset()
    # Name of the quantizer option that turns the rule on; None = always on.
    opt_in: str | None = None


CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                      aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
LINEAR_OPS = frozenset({aten.linear.default})

RULES: tuple[Rule, ...] = (
    Rule("linear", LINEAR_OPS, Role.WEIGHTED, activation_args=(0,), weight_arg=1),
    Rule("conv", CONV_OPS, Role.WEIGHTED, activation_args=(0,), weight_arg=1),
    Rule("attention_matmul", frozenset({aten.matmul.default, aten.bmm.default}), Role.ACTIVATIONS,
         activation_args=(0, 1), opt_in="quantize_attention_matmul"),
    Rule("conv_residual_add", frozenset({aten.add.Tensor, aten.add_.Tensor}), Role.RESIDUAL, activation_args=(0, 1),
         after=CONV_OPS),
    Rule("pooling", frozenset({aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                               aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
                               aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default}),
         Role.PROPAGATE),
    Rule("flatten", frozenset({aten.flatten.using_ints}), Role.PROPAGATE),
    Rule("concat", frozenset({aten.cat.default}), Role.PROPAGATE),
)

RULE_BY_OP = {op: rule for rule in RULES for op in rule.ops}


def weighted_ops() -> frozenset:
    """Every op a WEIGHTED rule quantizes (used by tests and reports to count quantized layers)."""
    return frozenset(op for rule in RULES if rule.role is Role.WEIGHTED for op in rule.ops)

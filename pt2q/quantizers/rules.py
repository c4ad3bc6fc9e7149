"""The pattern tables: which ATen ops the X86 and XPU quantizers annotate, and how.

Rules match ATen ops of the exported graph directly (not export source partitions), so a layer is
found whatever Python module produced it.

`RULES`: one rule per op kind. `FUSIONS`: a weighted op followed by the post-ops Inductor's oneDNN
lowering fuses into one int8 kernel (`dq -> conv -> add -> relu -> q` becomes one qconv). A fusion
decides where the int8 boundary lies: the quantize of the next quantized op lands after the whole
chain, the extra input of a conv's add is quantized (oneDNN's int8 "sum" post-op), and the chain's last
node is marked as the output of a quantized pattern, which is what lets int8 flow on through the
`PROPAGATE` ops after it (pooling, cat, flatten: int8 in, int8 out, one shared observer). The contract
is torchao X86InductorQuantizer's, so its Inductor passes lower our graphs to the same kernels.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

aten = torch.ops.aten


class Role(enum.Enum):
    WEIGHTED = "weighted"          # activation input(s) + a constant weight, per-channel weight qparams
    ACTIVATIONS = "activations"    # every listed input is an activation (attention matmul, mul)
    PROPAGATE = "propagate"        # int8 in, int8 out with the input's qparams (pooling, flatten, cat)


@dataclass(frozen=True)
class Rule:
    name: str
    ops: frozenset
    role: Role
    activation_args: tuple[int, ...] = (0,)
    weight_arg: int | None = None
    weight_channel_axis: int = 0
    # Name of the quantizer option that turns the rule on; None = always on. A set_op_type rule that
    # names one of the rule's ops with a scheme also turns it on for that op.
    opt_in: str | None = None
    # ACTIVATIONS rules: only when all activations have one shape (no broadcasting kernel exists).
    same_shape: bool = False


CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                      aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
LINEAR_OPS = frozenset({aten.linear.default})
MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default})

RULES: tuple[Rule, ...] = (
    Rule("linear", LINEAR_OPS, Role.WEIGHTED, activation_args=(0,), weight_arg=1),
    Rule("conv", CONV_OPS, Role.WEIGHTED, activation_args=(0,), weight_arg=1),
    Rule("attention_matmul", MATMUL_OPS, Role.ACTIVATIONS, activation_args=(0, 1),
         opt_in="quantize_attention_matmul"),
    Rule("mul", frozenset({aten.mul.Tensor}), Role.ACTIVATIONS, activation_args=(0, 1), opt_in="quantize_mul",
         same_shape=True),
    Rule("pooling", frozenset({aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
                               aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
                               aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default}),
         Role.PROPAGATE),
    Rule("flatten", frozenset({aten.flatten.using_ints}), Role.PROPAGATE),
    Rule("concat", frozenset({aten.cat.default}), Role.PROPAGATE),
)

RULE_BY_OP = {op: rule for rule in RULES for op in rule.ops}

# -- post-op fusions --------------------------------------------------------------------------------------
BATCH_NORM = frozenset({aten.batch_norm.default, aten._native_batch_norm_legit.default})
ADD = frozenset({aten.add.Tensor, aten.add_.Tensor})
RELU = frozenset({aten.relu.default, aten.relu_.default})
# The unary post-ops of oneDNN's int8 conv and linear kernels in Inductor (relu6 exports as hardtanh).
CONV_UNARY = RELU | {aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default,
                     aten.hardswish_.default, aten.silu.default, aten.silu_.default}
LINEAR_UNARY = RELU | {aten.leaky_relu.default, aten.leaky_relu_.default, aten.tanh.default,
                       aten.tanh_.default, aten.gelu.default}


@dataclass(frozen=True)
class Fusion:
    """A weighted op (`anchor`) and the post-ops after it, in order; each op of the chain but the last
    has the next one as its only user. A binary step (add) takes the chain on one side and an extra
    tensor of the same shape on the other."""

    name: str
    anchor: frozenset
    post_ops: tuple[frozenset, ...]
    # Quantize the add's extra input: oneDNN's conv "sum" post-op takes it in int8; the linear kernel
    # takes it in fp32 (and quantizing a transformer's residual stream costs accuracy for no speed).
    quantize_extra_input: bool = False
    # Observe the chain's output. Only the QAT conv-bn chains: batch norm is folded into the conv at
    # convert, and until then the training graph needs the fake quant after it.
    quantize_output: bool = False

    @property
    def is_binary(self) -> bool:
        return any(step is ADD for step in self.post_ops)


# First match wins, so longer chains come first.
FUSIONS: tuple[Fusion, ...] = (
    Fusion("conv_bn_add_relu", CONV_OPS, (BATCH_NORM, ADD, RELU), quantize_extra_input=True, quantize_output=True),
    Fusion("conv_bn_add", CONV_OPS, (BATCH_NORM, ADD), quantize_extra_input=True, quantize_output=True),
    Fusion("conv_bn_unary", CONV_OPS, (BATCH_NORM, CONV_UNARY), quantize_output=True),
    Fusion("conv_bn", CONV_OPS, (BATCH_NORM,), quantize_output=True),
    Fusion("conv_add_relu", CONV_OPS, (ADD, RELU), quantize_extra_input=True),
    Fusion("conv_add", CONV_OPS, (ADD,), quantize_extra_input=True),
    Fusion("conv_unary", CONV_OPS, (CONV_UNARY,)),
    Fusion("linear_add_relu", LINEAR_OPS, (ADD, RELU)),
    Fusion("linear_add", LINEAR_OPS, (ADD,)),
    Fusion("linear_unary", LINEAR_OPS, (LINEAR_UNARY,)),
)


def weighted_ops() -> frozenset:
    """Every op a WEIGHTED rule quantizes (used by tests and reports to count quantized layers)."""
    return frozenset(op for rule in RULES if rule.role is Role.WEIGHTED for op in rule.ops)

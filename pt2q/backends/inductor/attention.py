"""Lower scaled-dot-product attention to pt2q's fused bf16 attention kernel (kernels/attention.cpp).

`LowerAttention` rewrites `aten.scaled_dot_product_attention` nodes into `pt2q::attention_bf16` where the
kernel takes them (the table `REQUIREMENTS`: fp32 or bf16 q/k/v of one shape family, no dropout, no
grouped-query broadcast, a head width that is a multiple of 16 up to 256, a bool or additive float
mask or none); every other attention stays ATen's, with the reason in the report.

Why: on the int8 MiniLM (batch 8 x 128 tokens, head width 32, one thread, AVX-512 BF16 EPYC), ATen's CPU
SDPA is 38% of the whole compiled model's time (its small fp32 GEMMs run far from peak); the fused
kernel computes the two matmuls as bf16 dot products with fp32 accumulation and the softmax in fp32,
~3x faster per call. It rounds q, k, v and the probabilities to bf16: ~3e-3 relative error of the
attention output against fp32, below the int8 error of the linears around it, which is why `compile`'s
"auto" uses it for quantized graphs only (fp32 graphs keep fp32 attention unless "bf16" asks). It is
opt-in (compile's default is "aten"): at two threads and batch 32 the same model measured slower with
it (121.9 vs 106.8 ms), where ATen's SDPA parallelises better; a per-shape choice is future work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

aten = torch.ops.aten

ATTENTION_CHOICES = ("auto", "bf16", "aten")
SDPA = aten.scaled_dot_product_attention.default
# name, the check on (q, k, v, mask, dropout_p, is_causal, enable_gqa) meta values: what the kernel needs
REQUIREMENTS = (
    ("4-D q, k, v", lambda q, k, v, m, p, c, g: all(t.dim() == 4 for t in (q, k, v))),
    ("float32 or bfloat16 q, k, v of one dtype",
     lambda q, k, v, m, p, c, g: q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype),
    ("no dropout", lambda q, k, v, m, p, c, g: p == 0.0),
    ("no grouped-query broadcast", lambda q, k, v, m, p, c, g: not g and q.shape[:2] == k.shape[:2] == v.shape[:2]
     and k.shape == v.shape),
    ("one head width, a multiple of 16 up to 256",
     lambda q, k, v, m, p, c, g: isinstance(q.shape[-1], int) and q.shape[-1] == k.shape[-1] == v.shape[-1]
     and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256),
    ("a bool or additive float mask (or none)", lambda q, k, v, m, p, c, g: m is None or (
        isinstance(m, torch.Tensor) and (m.is_floating_point() or m.dtype == torch.bool) and m.dim() <= 4)),
    ("not a mask and is_causal together", lambda q, k, v, m, p, c, g: not (c and m is not None)),
)


@dataclass
class AttentionReport:
    """Per attention node name: "pt2q::attention_bf16", or "aten: <the first requirement it misses>"."""

    nodes: dict[str, str] = field(default_factory=dict)

    @property
    def lowered(self) -> int:
        return sum(1 for kernel in self.nodes.values() if not kernel.startswith("aten"))

    def summary(self) -> str:
        return f"attention: {self.lowered} of {len(self.nodes)} lowered to pt2q::attention_bf16"

    def lines(self) -> list[str]:
        return [f"{name}: {kernel}" for name, kernel in self.nodes.items()]


def _argument(node: Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _value(argument):
    return argument.meta.get("val") if isinstance(argument, Node) else argument


def has_attention(graph_module: GraphModule) -> bool:
    return any(graph_module.graph.find_nodes(op="call_function", target=SDPA))


class LowerAttention:
    """See the module docstring. `report` is an `AttentionReport`. The kernels are loaded (built on first
    use) when the graph has an attention to lower; a build failure raises `KernelsUnavailable`."""

    name = "lower_attention"

    def __init__(self):
        self.report = AttentionReport()

    def call(self, graph_module: GraphModule) -> PassResult:
        self.report = AttentionReport()
        nodes = list(graph_module.graph.find_nodes(op="call_function", target=SDPA))
        chosen = []
        for node in nodes:
            missing = self._missing(node)
            self.report.nodes[node.name] = f"aten: needs {missing}" if missing else "pt2q::attention_bf16"
            if not missing:
                chosen.append(node)
        if not chosen:
            return PassResult(graph_module, False)
        from .kernels import load

        load()
        kernel = torch.ops.pt2q.attention_bf16.default
        for node in chosen:
            q, k, v = node.args[:3]
            mask = _argument(node, 3, "attn_mask", None)
            causal = bool(_argument(node, 5, "is_causal", False))
            scale = _argument(node, 6, "scale", None)
            if scale is None:
                scale = 1.0 / math.sqrt(_value(q).shape[-1])
            with graph_module.graph.inserting_before(node):
                fused = graph_module.graph.call_function(kernel, (q, k, v, mask, float(scale), causal))
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            graph_module.graph.erase_node(node)
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    @staticmethod
    def _missing(node: Node) -> str | None:
        q, k, v = (_value(a) for a in node.args[:3])
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return "q, k, v with shapes recorded (meta['val'])"
        values = (q, k, v, _value(_argument(node, 3, "attn_mask", None)), _argument(node, 4, "dropout_p", 0.0),
                  bool(_argument(node, 5, "is_causal", False)), bool(_argument(node, 7, "enable_gqa", False)))
        for requirement, holds in REQUIREMENTS:
            if not holds(*values):
                return requirement
        return None

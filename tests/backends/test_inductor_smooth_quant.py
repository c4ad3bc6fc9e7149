"""SmoothQuant under Inductor: the explicit `mul` is fused into the quantize, no fp32 GEMM appears.

One compile only (compiles are slow on 2 cores).
"""
import re

import torch
from torch import nn

import pt2q
from pt2q.backends import inductor
from pt2q.backends.inductor import lowering
from tests.conftest import Q_PER_TENSOR, call, rel_error

# fp32 GEMMs as they would appear in Inductor's wrapper code (aten/mkl/mkldnn fallbacks).
_FP32_GEMM = re.compile(r"extern_kernels\.(mm|addmm|bmm|baddbmm)\b|torch\.ops\.mkl\._mkl_linear|"
                        r"torch\.ops\.mkldnn\._linear_pointwise|aten\.(mm|addmm|linear)\.default")


class NormResidual(nn.Module):
    """The LayerNorm output feeds the MLP and the residual add: its group needs an explicit mul."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        with torch.no_grad():
            self.norm.weight[:4] *= 20  # outlier channels: a scale worth applying

    def forward(self, x):
        h = self.norm(x)
        return h + self.down(torch.relu(self.up(h)))


def test_smoothed_explicit_mul_compiles_to_the_same_int8_kernels(monkeypatch):
    torch.manual_seed(0)
    model = NormResidual().eval()
    x = torch.randn(64, 64)
    calib = [(x,)]
    plain = pt2q.quantize(model, pt2q.StaticQuantConfig(), calib, progress=False)
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5, skip_if_worse=False))
    qmodel = pt2q.quantize(model, config, calib, progress=False)
    report = qmodel.meta["pt2q_smooth_quant_report"]
    assert [(g.consumers, g.absorbed) for g in report.groups] == [(["up"], False), (["down"], True)]
    muls = [n for n in qmodel.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == 1 and [u.target for u in muls[0].users] == [Q_PER_TENSOR]
    layers = pt2q.count_quantized_layers(plain)
    assert pt2q.count_quantized_layers(qmodel) == layers == 2

    sources = []
    count = lowering._count_int8_kernels

    def keep_sources(generated):
        sources.extend(generated)
        return count(generated)

    monkeypatch.setattr(lowering, "_count_int8_kernels", keep_sources)
    compiled = inductor.compile(qmodel, (x,))
    assert compiled.num_int8_kernels == layers, compiled.int8_kernels
    assert all(name.startswith("qlinear") for name in compiled.int8_kernels), compiled.int8_kernels
    assert sources and not [m.group(0) for s in sources for m in _FP32_GEMM.finditer(s)]
    # LayerNorm, the smoothing mul and the quantize run as one C++ kernel: the mul is fused
    assert sum(s.count('extern "C"') for s in sources) == 1

    eager = call(qmodel, (x,))
    actual = compiled(x)
    assert rel_error(actual, eager) < 0.01
    assert rel_error(actual, call(model, (x,))) < 0.03

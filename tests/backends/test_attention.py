"""pt2q's fused bf16 attention: the kernel against ATen's SDPA, the lowering pass's table, and compile().

The kernel runs where the CPU has AVX512-BF16 (skipped elsewhere, and under ONEDNN_MAX_CPU_ISA=AVX2, which
pt2q.isa treats as a CPU without it). Tolerance: bf16 rounding of q, k, v and the probabilities gives
~3e-3 relative error against fp32 (measured on random inputs); the tests allow 8e-3.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers

import pt2q
from pt2q.backends import inductor
from pt2q.backends.inductor.attention import SDPA, LowerAttention
from pt2q.isa import detect

HAS_BF16 = detect().avx512_bf16
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="pt2q's attention kernel needs AVX512-BF16")
TOLERANCE = 8e-3


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def kernel():
    from pt2q.backends.inductor import kernels

    kernels.load()
    return torch.ops.pt2q.attention_bf16.default


def padding_mask(batch: int, keys: int, kept: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, 1, keys)
    mask[..., kept:] = torch.finfo(torch.float32).min
    return mask


@needs_bf16
@pytest.mark.parametrize("shape", [(2, 3, 128, 128, 32), (2, 2, 37, 45, 16), (1, 2, 5, 70, 64), (1, 1, 3, 17, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["padding", "none", "causal", "full_float", "bool"])
def test_kernel_matches_sdpa(kernel, shape, mask_kind):
    batch, heads, queries, keys, width = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, heads, queries, width, generator=gen)
    k, v = (torch.randn(batch, heads, keys, width, generator=gen) for _ in range(2))
    mask, causal = {
        "padding": (padding_mask(batch, keys, keys * 3 // 4), False), "none": (None, False), "causal": (None, True),
        "full_float": (torch.randn(batch, heads, queries, keys, generator=gen), False),
        "bool": (torch.rand(batch, 1, queries, keys, generator=gen) > 0.3, False)}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every row keeps a key: ATen's SDPA gives NaN rows otherwise
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    actual = kernel(q, k, v, mask, width ** -0.5, causal)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert relative_error(actual, expected) < TOLERANCE


@needs_bf16
def test_kernel_layout_strides_dtypes_and_masked_rows(kernel):
    q, k, v = (torch.randn(2, 4, 20, 32) for _ in range(3))
    out = kernel(q, k, v, None, 0.2, False)
    fake = torch.empty(2, 20, 4, 32).transpose(1, 2)          # what the fake kernel returns
    assert out.stride() == fake.stride()
    # q, k, v as transposed views of [B, S, H, D] (what attention modules pass), and one not last-dim dense
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    odd = torch.randn(2, 4, 32, 20).transpose(2, 3)           # last-dim stride 20: copied by the kernel
    expected = F.scaled_dot_product_attention(q, k, odd, scale=0.2)
    assert relative_error(kernel(*strided[:2], odd, None, 0.2, False), expected) < TOLERANCE
    bf16 = kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.2, False)
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, out) < TOLERANCE
    masked = torch.zeros(2, 1, 20, 20)
    masked[:, :, 3] = float("-inf")                           # query row 3 sees no key
    rows = kernel(q, k, v, masked, 0.2, False)
    assert torch.equal(rows[:, :, 3], torch.zeros(2, 4, 32)) and torch.isfinite(rows).all()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel(torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24), None, 1.0, False)


class Attention(torch.nn.Module):
    """One SDPA call with the options the lowering reads."""

    def __init__(self, width=32, heads=2, kv_heads=2, dropout=0.0, use_mask=True):
        super().__init__()
        self.width, self.heads, self.kv_heads, self.dropout, self.use_mask = width, heads, kv_heads, dropout, use_mask
        self.qkv = torch.nn.Linear(16, width * (heads + 2 * kv_heads))

    def forward(self, x, mask):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split([self.width * self.heads] + [self.width * self.kv_heads] * 2, -1)
        q = q.view(batch, length, self.heads, self.width).transpose(1, 2)
        k, v = (t.view(batch, length, self.kv_heads, self.width).transpose(1, 2) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if self.use_mask else None,
                                              dropout_p=self.dropout, enable_gqa=self.kv_heads != self.heads)


@pytest.mark.parametrize("fields, reason", [
    (dict(width=24), "a multiple of 16"), (dict(kv_heads=1), "no grouped-query broadcast"),
    (dict(dropout=0.5), "no dropout"),
])
def test_lowering_leaves_what_the_kernel_cannot_take_to_aten(fields, reason):
    gm = torch.export.export(Attention(**fields).train(fields.get("dropout", 0) > 0),
                             (torch.randn(2, 8, 16), padding_mask(2, 8, 6))).module()
    lower = LowerAttention()
    assert not lower.call(gm).modified
    (kernel,) = lower.report.nodes.values()
    assert kernel.startswith("aten: needs") and reason in kernel
    assert len(gm.graph.find_nodes(op="call_function", target=SDPA)) == 1


@needs_bf16
def test_lowering_rewrites_every_attention_it_can(kernel):
    model = Attention().eval()
    x, mask = torch.randn(2, 8, 16), padding_mask(2, 8, 6)
    gm = torch.export.export(model, (x, mask)).module()
    lower = LowerAttention()
    assert lower.call(gm).modified
    assert lower.report.lowered == 1 and not gm.graph.find_nodes(op="call_function", target=SDPA)
    assert len(gm.graph.find_nodes(op="call_function", target=kernel)) == 1
    with torch.no_grad():
        assert relative_error(gm(x, mask), model(x, mask)) < TOLERANCE


@pytest.fixture(scope="module")
def tiny_bert():
    """BERT with head width 32 (the zoo's is 8) and 24 positions, a padded batch; int8 static."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    return model, batch, pt2q.quantize(model, pt2q.StaticQuantConfig(), [batch], progress=False)


@needs_bf16
def test_compile_runs_attention_in_the_kernel_for_a_quantized_graph(tiny_bert):
    model, batch, qmodel = tiny_bert
    fused = inductor.compile(qmodel, batch, attention="auto")     # a quantized graph, AVX512-BF16
    assert set(fused.attention_kernels.values()) == {"pt2q::attention_bf16"}
    reference = inductor.compile(qmodel, batch)                    # the default: ATen's attention
    assert reference.attention_kernels == {}
    with torch.no_grad():
        eager = qmodel(**batch).last_hidden_state
        assert relative_error(fused(**batch).last_hidden_state, eager) < 2 * TOLERANCE
        assert relative_error(reference(**batch).last_hidden_state, eager) < 1e-4


def test_auto_keeps_aten_attention_for_float_graphs_and_bf16_needs_the_isa(tiny_bert, monkeypatch):
    from dataclasses import replace

    from pt2q.backends.inductor import lowering

    model, batch, _ = tiny_bert
    captured = pt2q.capture(model, (), batch)
    assert not lowering._use_attention_kernel("auto", captured)     # fp32 graph: fp32 attention
    monkeypatch.setattr(lowering, "detect", lambda: replace(detect(), avx512_bf16=False))
    with pytest.raises(ValueError, match="attention='bf16' needs a CPU with AVX512-BF16"):
        lowering._use_attention_kernel("bf16", captured)
    with pytest.raises(ValueError, match=r"attention='int8': use one of \('auto', 'bf16', 'aten'\)"):
        lowering._use_attention_kernel("int8", captured)

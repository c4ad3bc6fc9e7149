"""The small BERT-like classifier behind the committed IPEX qconf files (tests/backends/data/ipex_*).

It imports torch only, so the same definition builds the same model (same seed, same weights, same module
names) under torch 2.13 with pt2q and under torch 2.8 with IPEX: `tools/ipex_make_qconf.py` traced it with
IPEX to produce the qconf JSON, and the CI tests quantize it with pt2q and patch that JSON.

Post-LN encoder layers as in BERT: self-attention (query / key / value / output Linears, explicit matmul
and softmax), residual + LayerNorm, GELU feed-forward (intermediate / output Linears), residual +
LayerNorm; then a tanh pooler on the first token and a classifier head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

VOCAB_SIZE = 128
HIDDEN = 16
HEADS = 2
INTERMEDIATE = 32
LAYERS = 2
MAX_POSITIONS = 64
CLASSES = 3
SEQ_LEN = 16
SEED = 0


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        query, key, value = (self._split_heads(layer(hidden)) for layer in (self.query, self.key, self.value))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_size) + additive_mask
        context = torch.matmul(torch.softmax(scores, dim=-1), value)
        return self.output(context.transpose(1, 2).reshape(batch, seq, width))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention_norm(hidden + self.attention(hidden, additive_mask))
        feed_forward = self.output(nn.functional.gelu(self.intermediate(hidden)))
        return self.output_norm(hidden + feed_forward)


class TinyBertClassifier(nn.Module):
    """Token ids and a 0/1 attention mask in, class logits out."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, hidden: int = HIDDEN, heads: int = HEADS,
                 intermediate: int = INTERMEDIATE, layers: int = LAYERS, max_positions: int = MAX_POSITIONS,
                 classes: int = CLASSES):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        for layer in self.layers:
            hidden = layer(hidden, additive_mask)
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


def build(seed: int = SEED) -> TinyBertClassifier:
    """The model with seeded random weights, in eval mode. LayerNorm weights are spread out per channel
    (as trained BERTs have outlier channels), which gives SmoothQuant something to do."""
    generator = torch.Generator().manual_seed(seed)
    model = TinyBertClassifier()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 4.0 + 0.25)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def batches(count: int, batch_size: int = 2, seed: int = SEED + 1) -> list[dict[str, torch.Tensor]]:
    """`count` seeded batches of keyword inputs; the second row of each has two padded positions."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(1, VOCAB_SIZE, (batch_size, SEQ_LEN), generator=generator)
        attention_mask = torch.ones(batch_size, SEQ_LEN, dtype=torch.long)
        if batch_size > 1:
            attention_mask[1, -2:] = 0
        out.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return out

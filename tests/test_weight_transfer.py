"""pt2q.weight_transfer: the packed weights of a GPTQ-quantized graph carried into another capture of the
same model (another sequence length, a wrapper around it) are the source's, bit for bit; every quantized
layer finds its match or the error names it; neither the target capture nor the user's model changes."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import pt2q
from pt2q import meta
from pt2q.graph import module_fqn
from pt2q.ops import DEQUANTIZE_WEIGHT
from pt2q.weight_transfer import (WeightTransferError, dequantized_weight, quantized_layers,
                                  transfer_quantized_weights)
from tests.conftest import ModelSnapshot

aten = torch.ops.aten
VOCAB = 128
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEARS = {f"model.layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS}


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, length: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (1, length), generator=generator),
             "attention_mask": torch.ones(1, length, dtype=torch.long)} for _ in range(count)]


@pytest.fixture(scope="module")
def quantized():
    """(model, its GPTQ int4 g32 graph calibrated on 12-token windows)."""
    model = tiny_llama()
    qmodel = pt2q.quantize(model, pt2q.GPTQConfig(bits=4, group_size=32), token_batches(4, 12, seed=1),
                           progress=False)
    return model, qmodel


def fake_quantized_copy(model: nn.Module, qmodel) -> nn.Module:
    """A copy of `model` whose quantized layers hold the weights `qmodel` dequantizes (the reference)."""
    reference = copy.deepcopy(model)
    for name, layer in quantized_layers(qmodel).items():
        reference.get_submodule(name).weight.data = dequantized_weight(qmodel, layer.dequantize)
    return reference


def test_transfer_into_another_capture_is_exact(quantized):
    model, qmodel = quantized
    snapshot = ModelSnapshot(model)
    batch = token_batches(1, 7, seed=2)[0]
    target = capture_of(model, batch)
    target_code, target_tensors = target.code, dict(target.state_dict())

    result = transfer_quantized_weights(qmodel, target)

    source_layers, result_layers = quantized_layers(qmodel), quantized_layers(result)
    assert set(source_layers) == set(result_layers) == LINEARS
    assert set(result.meta[meta.WEIGHT_TRANSFER_REPORT].layers) == LINEARS
    for name, layer in source_layers.items():
        mine = result_layers[name].dequantize
        assert torch.equal(dequantized_weight(qmodel, layer.dequantize), dequantized_weight(result, mine)), name
        packed_source = qmodel.get_buffer(layer.dequantize.args[0].target)
        packed_result = result.get_buffer(mine.args[0].target)
        assert packed_result.data_ptr() != packed_source.data_ptr()  # the new graph owns its copy
    # The float weights of the quantized layers are gone; the LM head stays float.
    kept = {module_fqn(node) for node in result.graph.find_nodes(op="call_function", target=aten.linear.default)
            if node.args[1].op == "get_attr"}
    assert kept == {"lm_head"}
    assert not any(f"{name}.weight" in dict(result.named_parameters()) for name in LINEARS)
    # The result computes the fake-quantized model; target and model are untouched.
    with torch.no_grad():
        expected = fake_quantized_copy(model, qmodel)(**batch).logits
        assert torch.allclose(result(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert target.code == target_code and not target.graph.find_nodes(op="call_function", target=DEQUANTIZE_WEIGHT)
    assert all(torch.equal(target.state_dict()[key], value) for key, value in target_tensors.items())
    assert set(target.state_dict()) == set(target_tensors)
    snapshot.assert_unchanged()


class Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def capture_of(model, batch):
    return pt2q.capture(model, (), dict(batch))


def test_prefix_matches_a_wrapped_model_and_its_absence_names_the_layers(quantized):
    model, qmodel = quantized
    batch = token_batches(1, 5, seed=3)[0]
    target = capture_of(Wrapper(model), batch)
    result = transfer_quantized_weights(qmodel, target, prefix="inner.")
    assert set(quantized_layers(result)) == {f"inner.{name}" for name in LINEARS}
    with torch.no_grad():
        expected = fake_quantized_copy(model, qmodel)(**batch).logits
        assert torch.allclose(result(**batch), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightTransferError, match=r"14 quantized layer\(s\) have no .*model\.layers\.0\.self_attn"):
        transfer_quantized_weights(qmodel, target)


def test_a_missing_layer_is_named(quantized):
    _, qmodel = quantized
    shallower = capture_of(tiny_llama(num_hidden_layers=1), token_batches(1, 5, seed=4)[0])
    with pytest.raises(WeightTransferError) as error:
        transfer_quantized_weights(qmodel, shallower)
    message = str(error.value)
    assert "7 quantized layer(s)" in message and "model.layers.1.mlp.down_proj" in message
    assert "model.layers.0." not in message.split("(target float layers")[0]


def test_a_shape_mismatch_is_named(quantized):
    _, qmodel = quantized
    wider = capture_of(tiny_llama(intermediate_size=96), token_batches(1, 5, seed=5)[0])
    with pytest.raises(WeightTransferError, match=r"shapes differ: model\.layers\.0\.mlp\.gate_proj "
                                                  r"\(quantized \[128, 64\], target .*\[96, 64\]"):
        transfer_quantized_weights(qmodel, wider)


def test_a_float_source_is_refused(quantized):
    model, _ = quantized
    target = capture_of(model, token_batches(1, 5, seed=6)[0])
    with pytest.raises(WeightTransferError, match="no pt2q.dequantize_weight"):
        transfer_quantized_weights(target, target)

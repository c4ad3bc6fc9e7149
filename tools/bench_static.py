"""Static int8 on real all-MiniLM-L6-v2: pt2q's X86Quantizer vs torchao's X86InductorQuantizer.

Same process, same model, same calibration and evaluation text, same Inductor settings (freezing on).
Compile times are cold: every compile starts from empty Inductor caches (identical graphs would
otherwise reuse each other's kernels). Latencies are medians
over interleaved rounds, so machine noise hits every contender alike. A contender that crashes is
recorded with its error and the tail of its traceback. Writes JSON (stdout, or --out PATH).

    .venv/bin/python tools/bench_static.py --out bench_static.json
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

import pt2q  # noqa: E402
from pt2q import demo, textdata  # noqa: E402
from pt2q.backends import inductor  # noqa: E402


def pt2q_quantize(model, calib, saturation_guard="auto", mixed_bf16=False, smooth_quant=None):
    config = pt2q.StaticQuantConfig(saturation_guard=saturation_guard, mixed_bf16=mixed_bf16,
                                    smooth_quant=smooth_quant)
    return pt2q.quantize(model, config, calib, progress=False)


def pt2q_compile(qmodel, example, attention="aten"):
    compiled = inductor.compile(qmodel, example, attention=attention)
    kernels: dict[str, int] = {}
    for kernel in compiled.attention_kernels.values():
        kernels[kernel] = kernels.get(kernel, 0) + 1
    return compiled, {"int8_kernels": compiled.int8_kernels, "attention_kernels": kernels}


def torchao_quantize(model, calib, reduce_range=False):
    """torchao's documented PT2E recipe for X86 Inductor (`reduce_range=True`: its advice for CPUs
    without VNNI, 7-bit activations)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    exported = torch.export.export(model, (), calib[0]).module()
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib:
            prepared(**batch)
    return convert_pt2e(prepared)


def torchao_compile(qmodel, example):
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled = torch.compile(qmodel)
        compiled(**example)

    def run(**batch):
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(**batch)
    return run, {}


def contenders(int8_saturates: bool, native_bf16: bool = False) -> dict:
    """name -> (quantize, compile). Where int8 kernels saturate, both libraries' full-range results are
    kept to show what the guards are for, beside their guarded ones. Where the CPU computes bf16
    natively, pt2q's int8-mixed-bf16 (the ops that stay float run in bf16) is measured too, and the default
    pt2q build with pt2q's bf16 attention kernel instead of ATen's SDPA (opt-in: what the kernel is worth).
    `pt2q_smoothquant_auto`: SmoothQuant with per-layer alpha search, pt2q's most accurate static int8."""
    chosen = {"pt2q": (pt2q_quantize, pt2q_compile), "torchao": (torchao_quantize, torchao_compile),
              "pt2q_smoothquant_auto": (lambda m, c: pt2q_quantize(
                  m, c, smooth_quant=pt2q.SmoothQuantConfig(alpha="auto")), pt2q_compile)}
    if native_bf16:
        chosen["pt2q_attention_bf16"] = (pt2q_quantize, lambda q, e: pt2q_compile(q, e, attention="bf16"))
        chosen["pt2q_mixed_bf16"] = (lambda m, c: pt2q_quantize(m, c, mixed_bf16=True), pt2q_compile)
    if int8_saturates:
        chosen["pt2q_full_range"] = (lambda m, c: pt2q_quantize(m, c, saturation_guard="off"), pt2q_compile)
        chosen["torchao_reduce_range"] = (lambda m, c: torchao_quantize(m, c, reduce_range=True), torchao_compile)
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--eval-sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per contender per round")
    parser.add_argument("--repeats", type=int, default=2, help="quantize runs per contender (best is kept)")
    args = parser.parse_args(argv)

    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(args.calib_batches * args.batch_size, args.eval_sentences)
    calib = demo.encode_batches(tokenizer, calib_texts, args.batch_size, args.seq_len)
    evaluation = demo.encode_batches(tokenizer, eval_texts, args.batch_size, args.seq_len)
    example = evaluation[0]

    results: dict = {"settings": vars(args)}  # emit_json adds the machine: ISA, cores, versions
    isa = pt2q.isa.detect()
    chosen = contenders(isa.int8_saturates, isa.native_bf16)
    fp32_compiled, fp32_compile = demo.timed_cold(inductor.compile, pt2q.capture(model, (), example), example)
    results["fp32_inductor"] = {"compile_seconds": fp32_compile}
    runners = {"fp32_eager": model, "fp32_inductor": fp32_compiled}
    # Quantize with each contender `--repeats` times, alternating, and keep the best time: both do the
    # same work, so single runs would mostly compare machine noise.
    qmodels, quantize_times = {}, {name: [] for name in chosen}
    for _ in range(args.repeats):
        for name, (quantize_fn, _) in chosen.items():
            if name in results:
                continue  # crashed before
            try:
                qmodels[name], seconds = demo.timed(quantize_fn, model, calib)
                quantize_times[name].append(seconds)
            except Exception as error:  # noqa: BLE001 - a crash is a result to record
                results[name] = {"crashed": True, "stage": "quantize",
                                 "error": f"{type(error).__name__}: {error}"[:2000],
                                 "traceback_tail": traceback.format_exc().splitlines()[-12:]}
    for name, (_, compile_fn) in chosen.items():
        if name in results:
            continue
        try:
            (runner, figures), compile_seconds = demo.timed_cold(compile_fn, qmodels[name], example)
        except Exception as error:  # noqa: BLE001
            results[name] = {"crashed": True, "stage": "compile", "error": f"{type(error).__name__}: {error}"[:2000],
                             "traceback_tail": traceback.format_exc().splitlines()[-12:]}
            continue
        cosines = demo.embedding_cosines(model, runner, evaluation)
        results[name] = {"quantize_seconds": min(quantize_times[name]),
                         "quantize_seconds_all": quantize_times[name], "compile_seconds": compile_seconds,
                         "compile_vs_fp32_compile": compile_seconds / fp32_compile,
                         "mean_cosine": cosines.mean().item(), "min_cosine": cosines.min().item(), **figures}
        runners[name] = runner

    for name, latency in demo.interleaved_latencies(runners, example, args.rounds, args.runs).items():
        results.setdefault(name, {})["latency_seconds"] = latency
    fp32_latency = results["fp32_inductor"]["latency_seconds"]
    for name in chosen:
        if "latency_seconds" in results.get(name, {}):
            results[name]["int8_over_fp32_latency"] = results[name]["latency_seconds"] / fp32_latency
            results[name]["speedup_vs_fp32_inductor"] = fp32_latency / results[name]["latency_seconds"]
    # pt2q (auto guard) against torchao's recipe for this CPU: reduce_range where int8 saturates
    peer = "torchao_reduce_range" if "torchao_reduce_range" in chosen else "torchao"
    for mine in ("pt2q", "pt2q_smoothquant_auto"):
        if "latency_seconds" in results.get(peer, {}) and "latency_seconds" in results.get(mine, {}):
            results[f"{mine}_vs_torchao"] = {
                "peer": peer,
                "latency_ratio": results[mine]["latency_seconds"] / results[peer]["latency_seconds"],
                "speedup": results[peer]["latency_seconds"] / results[mine]["latency_seconds"],
                "quantize_time_ratio": results[mine]["quantize_seconds"] / results[peer]["quantize_seconds"],
                "mean_cosine_gain": results[mine]["mean_cosine"] - results[peer]["mean_cosine"],
                "target_met": results[peer]["latency_seconds"] / results[mine]["latency_seconds"] >= 1.15
                and results[mine]["mean_cosine"] >= results[peer]["mean_cosine"],
            }
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmoothQuant on real all-MiniLM-L6-v2: plain static int8 vs SmoothQuant (alpha 0.5, auto).

Same process, model, calibration batches (4 x 32x128) and evaluation text (256 sentences). Error is
1 - mean cosine between fp32 and int8 sentence embeddings (eager Q/DQ graphs, which the Inductor build
matches to ~1e-7). Plain int8 is measured with min/max observers (the reference the SmoothQuant
targets are stated against) and with the default histogram observers. Quantize times are the best of
`--repeats`. Inductor latency of plain vs SmoothQuant int8 is measured on cold compiles, interleaved.
Writes JSON (stdout, or --out PATH).

    .venv/bin/python tools/bench_smoothquant.py --out bench_smoothquant.json
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pt2q  # noqa: E402
from pt2q import demo, textdata  # noqa: E402
from pt2q.backends import inductor  # noqa: E402

REPORT_KEY = "pt2q_smooth_quant_report"


def configs() -> dict[str, pt2q.StaticQuantConfig]:
    return {
        "plain_minmax": pt2q.StaticQuantConfig(activation_observer="minmax"),
        "plain_histogram": pt2q.StaticQuantConfig(),
        "smoothquant_0.5": pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=0.5)),
        "smoothquant_auto": pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha="auto")),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout)")
    parser.add_argument("--repeats", type=int, default=2, help="quantize runs per config (best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per model per round")
    parser.add_argument("--no-latency", action="store_true", help="skip the Inductor compiles")
    args = parser.parse_args(argv)

    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(4 * 32, 256)
    calib = demo.encode_batches(tokenizer, calib_texts, 32, 128)
    evaluation = demo.encode_batches(tokenizer, eval_texts, 32, 128)
    example = evaluation[0]

    results: dict = {"settings": vars(args)}  # emit_json adds the machine: ISA, cores, versions
    qmodels = {}
    for name, config in configs().items():
        times = []
        for _ in range(args.repeats):
            qmodel, seconds = demo.timed(pt2q.quantize, model, config, calib, progress=False)
            times.append(seconds)
        cosines = demo.embedding_cosines(model, qmodel, evaluation)
        entry = {"quantize_seconds": min(times), "quantize_seconds_all": times,
                 "mean_cosine": cosines.mean().item(), "min_cosine": cosines.min().item(),
                 "error": 1 - cosines.mean().item()}
        report = qmodel.meta.get(REPORT_KEY)
        if report is not None:
            entry["groups"] = {"found": len(report.groups) + len(report.skipped), "smoothed": len(report.groups),
                               "absorbed": report.num_absorbed,
                               "explicit_mul": len(report.groups) - report.num_absorbed,
                               "skipped": len(report.skipped)}
            entry["alphas"] = [round(g.alpha, 3) for g in report.groups]
            entry["skipped_reasons"] = [f"{g.producer}: {g.reason}" for g in report.skipped]
        results[name] = entry
        qmodels[name] = qmodel

    for baseline in ("plain_minmax", "plain_histogram"):
        base_error = results[baseline]["error"]
        for name in ("smoothquant_0.5", "smoothquant_auto"):
            results[name][f"error_reduction_vs_{baseline}"] = 1 - results[name]["error"] / base_error
    results["smoothquant_0.5"]["quantize_time_vs_plain_histogram"] = (
        results["smoothquant_0.5"]["quantize_seconds"] / results["plain_histogram"]["quantize_seconds"])

    if not args.no_latency:
        compiled = {name: demo.timed_cold(inductor.compile, qmodels[name], example)
                    for name in ("plain_histogram", "smoothquant_0.5", "smoothquant_auto")}
        latencies = demo.interleaved_latencies({name: runner for name, (runner, _) in compiled.items()},
                                               example, args.rounds, args.runs)
        for name, (runner, compile_seconds) in compiled.items():
            results[name].update(compile_seconds=compile_seconds, int8_kernels=runner.int8_kernels,
                                 inductor_latency_seconds=latencies[name])
        plain_latency = results["plain_histogram"]["inductor_latency_seconds"]
        for name in ("smoothquant_0.5", "smoothquant_auto"):
            results[name]["inductor_latency_vs_plain"] = results[name]["inductor_latency_seconds"] / plain_latency

    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

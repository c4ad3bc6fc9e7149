"""Backends beyond Inductor on real all-MiniLM-L6-v2: FP8 lowered for Gaudi (emulated here), XPU int8.

Rows (same model, calibration and evaluation text in one process):
- fp8_<format>_<device>: FP8Config static (default scale method maxabs_hw), quantized, then lowered by
  `pt2q.backends.habana.lower` to HPU-signature ops, run by their CPU reference kernels (no Gaudi here):
  mean / min cosine of sentence embeddings vs fp32, HPU op counts, whether the lowered graph equals the
  Q/DQ graph, quantize and lowering times.
- fp8_e4m3_gaudi2_from_measurement: the same through pt2q.measure -> FP8Config(from_measurement=...).
- fp8_e4m3_gaudi2_dynamic: FP8 with run-time activation scales; fp8_e4m3_gaudi2_maxabs: exact max-|x|
  scales instead of the hardware-aligned default.
- int8_x86 / int8_xpu: StaticQuantConfig(backend="x86" | "xpu"): cosine of the Q/DQ graph (the
  reference semantics both devices implement) and, for xpu, of the graph lowered through Inductor's
  CPU path (`pt2q.backends.xpu`; no XPU device here), and quantize times.
Writes JSON (stdout, or --out PATH), starting with the machine record.

    .venv/bin/python tools/bench_backends.py --out bench_backends.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import pt2q  # noqa: E402
from pt2q import demo, textdata  # noqa: E402

FP8_ROWS = (("e4m3", "gaudi2"), ("e5m2", "gaudi2"), ("e4m3", "gaudi3"), ("e5m2", "gaudi3"))


def cosine_figures(model, runner, evaluation) -> dict:
    cosines = demo.embedding_cosines(model, runner, evaluation)
    return {"mean_cosine": cosines.mean().item(), "min_cosine": cosines.min().item()}


def hpu_op_counts(lowered) -> dict:
    counts: dict[str, int] = {}
    for node in lowered.graph.nodes:
        if node.op == "call_function" and hasattr(node.target, "namespace"):
            name = f"{node.target.namespace}.{node.target.__name__.split('.')[0]}"
            counts[name] = counts.get(name, 0) + 1
    return {name: count for name, count in sorted(counts.items()) if not name.startswith("aten.")}


def max_difference(a, b, evaluation) -> float:
    with torch.no_grad():
        return max((demo.sentence_embeddings(a(**batch), batch["attention_mask"])
                    - demo.sentence_embeddings(b(**batch), batch["attention_mask"])).abs().max().item()
                   for batch in evaluation[:2])


def fp8_row(model, calib, evaluation, dtype, device, from_measurement=False, activation="static",
            scale_method="maxabs_hw") -> dict:
    from pt2q.backends import habana

    row: dict = {}
    if from_measurement:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "minilm.fp8.json")
            _, row["measure_seconds"] = demo.timed(pt2q.measure, model, pt2q.FP8Config(dtype=dtype, device=device),
                                                   calib, path, progress=False)
            qmodel, row["quantize_seconds"] = demo.timed(
                pt2q.quantize, model, pt2q.FP8Config(dtype=dtype, device=device, from_measurement=path),
                example_inputs=calib[0], progress=False)
    else:
        config = pt2q.FP8Config(dtype=dtype, device=device, activation=activation, scale_method=scale_method)
        data = calib if activation == "static" else None
        qmodel, row["quantize_seconds"] = demo.timed(pt2q.quantize, model, config, data, example_inputs=calib[0],
                                                     progress=False)
    row["quantized_layers"] = pt2q.count_quantized_layers(qmodel)
    lowered, row["lower_seconds"] = demo.timed(habana.lower, qmodel, device=device)
    row["hpu_ops"] = hpu_op_counts(lowered)
    row["qdq"] = cosine_figures(model, qmodel, evaluation)
    row.update(cosine_figures(model, lowered, evaluation))
    row["lowered_vs_qdq_max_abs_difference"] = max_difference(lowered, qmodel, evaluation)
    return row


def int8_row(model, calib, evaluation, backend: str) -> dict:
    row: dict = {}
    qmodel, row["quantize_seconds"] = demo.timed(pt2q.quantize, model, pt2q.StaticQuantConfig(backend=backend),
                                                 calib, progress=False)
    row["quantized_layers"] = pt2q.count_quantized_layers(qmodel)
    row.update(cosine_figures(model, qmodel, evaluation))
    if backend == "xpu":
        from pt2q.backends import xpu

        compiled, row["compile_seconds"] = demo.timed_cold(xpu.compile_on_cpu, qmodel, evaluation[0])
        row["cpu_path"] = {**cosine_figures(model, compiled, evaluation),
                           "int8_kernels": getattr(compiled, "int8_kernels", None)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--eval-sentences", type=int, default=256)
    args = parser.parse_args(argv)

    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(args.calib_batches * args.batch_size, args.eval_sentences)
    calib = demo.encode_batches(tokenizer, calib_texts, args.batch_size, args.seq_len)
    evaluation = demo.encode_batches(tokenizer, eval_texts, args.batch_size, args.seq_len)

    jobs = {f"fp8_{dtype}_{device}": (fp8_row, (dtype, device)) for dtype, device in FP8_ROWS}
    jobs["fp8_e4m3_gaudi2_from_measurement"] = (lambda *a: fp8_row(*a, from_measurement=True), ("e4m3", "gaudi2"))
    jobs["fp8_e4m3_gaudi2_dynamic"] = (lambda *a: fp8_row(*a, activation="dynamic"), ("e4m3", "gaudi2"))
    jobs["fp8_e4m3_gaudi2_maxabs"] = (lambda *a: fp8_row(*a, scale_method="maxabs"), ("e4m3", "gaudi2"))
    jobs["int8_x86"] = (int8_row, ("x86",))
    jobs["int8_xpu"] = (int8_row, ("xpu",))
    results: dict = {"settings": vars(args)}
    for name, (function, extra) in jobs.items():
        try:
            results[name] = function(model, calib, evaluation, *extra)
        except Exception as error:  # noqa: BLE001 - a crash is a result to record
            results[name] = {"crashed": True, "error": f"{type(error).__name__}: {error}"[:2000],
                             "traceback_tail": traceback.format_exc().splitlines()[-12:]}
        print(f"{name}: {results[name]}", file=sys.stderr)
    if "mean_cosine" in results.get("int8_x86", {}) and "mean_cosine" in results.get("int8_xpu", {}):
        results["xpu_minus_x86_mean_cosine"] = results["int8_xpu"]["mean_cosine"] - results["int8_x86"]["mean_cosine"]
    fp8, int8 = results.get("fp8_e4m3_gaudi2", {}), results.get("int8_x86", {})
    if "quantize_seconds" in fp8 and "quantize_seconds" in int8:
        results["fp8_over_int8_quantize_time"] = fp8["quantize_seconds"] / int8["quantize_seconds"]
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

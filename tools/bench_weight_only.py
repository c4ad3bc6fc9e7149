"""Weight-only quantization: pt2q's RTN / HQQ / GPTQ / AWQ / TEQ / AutoRound against torchao, Intel Neural
Compressor, Intel's auto-round and the hqq package.

Part 1, accuracy on the real all-MiniLM-L6-v2: every method sees the same calibration text (128 sentences
in batches of 8 x 128 tokens) and is scored on the same 256 disjoint evaluation sentences, all in one
process: mean / min cosine of the pooled sentence embeddings against fp32 eager, quantize wall time and,
for pt2q, the `.pt2` archive size and the bytes of the packed linears. pt2q's models are scored eagerly
(the dequantize path, exact to fp32 rounding); peers' models eagerly too. `pt2q_gptq` is the default
GPTQConfig (the row the targets read); `pt2q_gptq_mse_clip` / `pt2q_gptq_no_mse_clip` set mse_clip either
way (the one equal to the default is recorded as {"same_as": "pt2q_gptq"}, not run twice).
Settings: W4 g32 sym / asym, W3 g32 asym / sym (W3 sym for AutoRound's W3 target; no INC rows there), W8
per channel. Rows per setting, each peer right after the pt2q row it compares with:
- `pt2q_rtn`, `pt2q_rtn_mse_clip`, `pt2q_gptq*`, `pt2q_awq` (with `inc_rtn` / `inc_gptq` / `inc_awq`);
- `pt2q_hqq`: HQQConfig at the setting's bits and group size, always asymmetric (HQQ fits a float zero
  point per group: sym settings run it with sym=False, said in the row's "note"); then `hqq_pkg`: the `hqq`
  package's Quantizer.quantize(axis=1) + dequantize of the same linears (pt2q_hqq's report: the encoder's
  and the pooler's, which the cosine does not read) in a copy of the model, the whole model timed;
- `pt2q_teq`: TEQConfig, 200 training steps per block;
- `pt2q_autoround`: AutoRoundConfig(iters=200, batch_size=1): a pt2q sample is one calibration batch (8
  sentences), so each step trains on 8 sentences; then `autoround_pkg`: auto-round (`auto_round.AutoRound`
  on a copy, fp32 with amp=False like pt2q, CPU) with the same 128 calibration sentences as its dataset
  (the tokenized batches: nothing downloaded), seqlen 128, nsamples 128, batch_size 8, iters 200; its
  quantize() leaves q/dq float weights, scored like the others; the row lists the linears it left float;
- `pt2q_autoround_bf16` / `autoround_pkg_bf16`: the same pair in bf16 (pt2q amp=True: bf16 autocast;
  auto-round amp=True, its CPU default: the block cast to bf16), both scored in fp32.
  Both pt2q AutoRound rows capture MiniLM with dynamic_shapes="batch_seq", so AutoRound cuts each batch's
  trailing padding (the row's positions_kept); the loss masks padding either way (so does auto-round's).
The trained rows run at the settings their targets read (TRAINED_SETTINGS: TEQ and the bf16 pair at
W4_g32_sym, AutoRound at W4_g32_sym and both W3 settings); --trained-everywhere runs them at every setting.
--quick cuts AutoRound's iters and TEQ's steps to 4 (both packages alike).

Autotune: one `pt2q.autotune` run on MiniLM (tools/bench_autotune.py's autotune_minilm, the same
calibration / evaluation text) over `get_woq_tuning_config(bits=4, group_size=32)` (RTN, RTN mse_clip, HQQ,
AWQ, GPTQ, TEQ, AutoRound; the trained ones at part 1's steps), every config before any fallback, tolerable
loss --autotune-tolerable-loss of the mean cosine; its trial table is under "autotune_woq".

Part 2, decode-step latency (one token, batch 1 and batch 8, no KV cache) of a LLaMA-shaped model with
random weights (hidden 2048, MLP 5632, 2 layers, vocabulary 1024 so the float LM head stays small):
fp32 and bf16 Inductor, torchao's weight-only configs under torch.compile, and pt2q RTN W8 / W4 compiled
with `pt2q.backends.inductor.compile` (its weight-only kernel lowering; `weight_only_kernels` is counted
when the backend exposes it; pt2q's W8 / W4 also pinned to ATen's kernels, the `*_aten_kernels` rows).
Latency = median over interleaved rounds; `latency_best_ms` the least disturbed round and `latency_cpu_ms`
the process CPU time per call (what a shared machine inflates least); speedups are against fp32 Inductor.
Run under ATEN_CPU_CAPABILITY=avx2 for the AVX2 kernels: Inductor's generated C++ follows that variable
too (`inductor_vec_isa` in the JSON).

On a machine shared with other busy processes, multi-threaded (OpenMP) kernels stall whenever one of
their threads is descheduled: `--threads 1` runs part 1 single-threaded (so quantize times compare the
work, not the stalls), and part 2 is measured at each of `--decode-threads` (default: all cores, and 1).
The 1-minute load average is recorded beside the timings. Partial results are written to --out after
every step (marked "partial": true) until the final JSON replaces them.

Peers (torchao, neural-compressor-pt, auto-round, hqq) are each guarded: one that is missing or crashes is
recorded as {"error": ..., "traceback_tail": [...]} and the benchmark goes on (a pt2q row alike). The
acceptance figures are written under "targets" with whether this run meets them (informational, nothing
is asserted).

    .venv/bin/python tools/bench_weight_only.py --threads 1 --out /tmp/bench_weight_only.json
    .venv/bin/python tools/bench_weight_only.py --quick --out /tmp/quick.json   # smoke run
    # one pair only (--methods takes shell-style patterns of row names), no decode part, no autotune:
    .venv/bin/python tools/bench_weight_only.py --threads 1 --settings W4_g32_sym --skip-decode --skip-autotune \
        --methods pt2q_autoround autoround_pkg --out /tmp/autoround_pair.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import fnmatch
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401

import pt2q  # noqa: E402
from pt2q import demo, textdata  # noqa: E402
from pt2q.backends import inductor  # noqa: E402

SETTINGS = {
    "W4_g32_sym": {"bits": 4, "group_size": 32, "sym": True},
    "W4_g32_asym": {"bits": 4, "group_size": 32, "sym": False},
    "W3_g32_asym": {"bits": 3, "group_size": 32, "sym": False},
    "W3_g32_sym": {"bits": 3, "group_size": 32, "sym": True},
    "W8_perchannel_sym": {"bits": 8, "group_size": -1, "sym": True},
}
# method -> config factory (setting, n): n is the training steps of AutoRound / TEQ (200; --quick: 4)
PT2Q_METHODS = {
    "pt2q_rtn": lambda s, n: pt2q.RTNConfig(**s),
    "pt2q_rtn_mse_clip": lambda s, n: pt2q.RTNConfig(**s, mse_clip=True),
    # HQQ fits a float zero point per group (HQQConfig.sym must be False): every setting runs it asymmetric,
    # the sym ones too (HQQ_SYM_NOTE in their row); its group size is the setting's
    "pt2q_hqq": lambda s, n: pt2q.HQQConfig(bits=s["bits"], group_size=s["group_size"], sym=False),
    "pt2q_gptq": lambda s, n: pt2q.GPTQConfig(**s),   # the default GPTQConfig: the row targets() reads
    "pt2q_gptq_mse_clip": lambda s, n: pt2q.GPTQConfig(**s, mse_clip=True),
    "pt2q_gptq_no_mse_clip": lambda s, n: pt2q.GPTQConfig(**s, mse_clip=False),
    "pt2q_gptq_act_order": lambda s, n: pt2q.GPTQConfig(**s, act_order=True),
    "pt2q_awq": lambda s, n: pt2q.AWQConfig(**s),
    "pt2q_teq": lambda s, n: pt2q.TEQConfig(**s, steps=n),
    # a pt2q AutoRound sample is one calibration batch as given (8 sentences x 128 tokens): batch_size=1
    # trains on 8 rows per step, as auto-round's batch_size=8 does (the autoround_pkg row)
    "pt2q_autoround": lambda s, n: pt2q.AutoRoundConfig(**s, iters=n, batch_size=1),
    # the same in bf16 autocast (amp=True); its peer is autoround_pkg_bf16, auto-round's own default on a
    # CPU with bf16 (amp=True casts the block to bf16)
    "pt2q_autoround_bf16": lambda s, n: pt2q.AutoRoundConfig(**s, iters=n, batch_size=1, amp=True),
}
# The trained algorithms take minutes per run (200 steps per block): they run at the settings their
# targets read, unless --trained-everywhere (AutoRound's peers follow their pt2q row).
TRAINED_SETTINGS = {
    "pt2q_teq": ("W4_g32_sym",),
    "pt2q_autoround": ("W4_g32_sym", "W3_g32_sym", "W3_g32_asym"),
    "pt2q_autoround_bf16": ("W4_g32_sym",),
}
# Rows captured with a dynamic sequence: AutoRound then skips the compute on padding (AutoRoundConfig.seqlen)
DYNAMIC_SEQ_METHODS = ("pt2q_autoround", "pt2q_autoround_bf16")
HQQ_SYM_NOTE = ("HQQ is asymmetric (float32 zero point per group): this sym setting runs it with sym=False, "
                "the setting's bits and group size; hqq_pkg likewise")
# INC methods per setting (its 3.x API; W8 per channel: RTN only, as a reference point).
INC_METHODS = {
    "W4_g32_sym": ("rtn", "gptq", "awq"),
    "W4_g32_asym": ("rtn", "gptq"),  # INC's AWQ takes ~15 min here: run at W4 sym and W3 asym only
    "W3_g32_asym": ("rtn", "gptq", "awq"),
    "W8_perchannel_sym": ("rtn",),
}  # none at W3_g32_sym (there for AutoRound's W3 target; W3_g32_asym has INC's rows)
AUTOROUND_PKG_BATCH_ROWS = 8  # auto-round's batch_size (sentences per step), as pt2q_autoround's one batch
# The weight-only autotune run: get_woq_tuning_config at this format, every config before any fallback
AUTOTUNE_FORMAT = {"bits": 4, "group_size": 32}
LLAMA_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 2,
               "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1024,
               "max_position_embeddings": 128}


CHECKPOINT: dict = {}  # {"path": ..., "results": ...}: partial results written after every step


def checkpoint() -> None:
    """Write the results so far to --out (marked partial): a run stopped half way keeps its figures."""
    if CHECKPOINT.get("path"):
        import json

        with open(CHECKPOINT["path"], "w") as file:
            json.dump({"partial": True, **CHECKPOINT["results"]}, file, indent=2)


def log(message: str) -> None:
    print(f"[bench_weight_only {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def failure(error: BaseException, **extra) -> dict:
    return {"error": f"{type(error).__name__}: {error}"[:2000],
            "traceback_tail": traceback.format_exc().splitlines()[-12:], **extra}


def cosine_figures(reference, candidate, batches) -> dict:
    cosines = demo.embedding_cosines(reference, candidate, batches)
    return {"mean_cos": cosines.mean().item(), "min_cos": cosines.min().item(), "sentences": cosines.numel()}


class Clock:
    """Wall and process CPU seconds of a block, and the 1-minute load average when it started: on a
    machine shared with other busy processes, wall time swings with their load and CPU time less."""

    def __enter__(self):
        self.load_average = load_average()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def figures(self) -> dict:
        return {"quantize_s": self.wall, "quantize_cpu_s": self.cpu, "load_average_1min_at_start": self.load_average}


def load_average() -> float | None:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


def archive_bytes(graph_module) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_wo_") as folder:
        path = os.path.join(folder, "model.pt2")
        pt2q.save(graph_module, path)
        return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- Part 1


def run_pt2q(model, config, calib, evaluation, keep: dict | None = None, dynamic_shapes=None) -> dict:
    """Quantize, time and score one pt2q config; `keep["layers"]` gets the quantized linears' module names."""
    with Clock() as clock:
        qmodel = pt2q.quantize(model, config, calib, dynamic_shapes=dynamic_shapes, progress=False)
    report = qmodel.meta.get("pt2q_weight_only_report")
    modules = [] if report is None else [info.get("module", node) for node, info in report.layers.items()]
    if keep is not None and report is not None:
        keep["layers"] = modules
    figures = {**cosine_figures(model, qmodel, evaluation), **clock.figures(),
               "archive_bytes": archive_bytes(qmodel), "config": repr(config)}
    if report is not None:
        figures.update(packed_bytes=report.packed_bytes, float_bytes=report.float_bytes,
                       quantized_linears=len(report.layers), kept_float=len(report.kept_float),
                       calibration_s=report.calibration_seconds)
        if config.algorithm == "hqq":
            figures["quantized_layer_names"] = modules
        if "autoround_positions_kept" in report.findings:
            figures["positions_kept"] = report.findings["autoround_positions_kept"]
    if dynamic_shapes is not None:
        figures["dynamic_shapes"] = dynamic_shapes
    return figures


def run_torchao(model, config, evaluation) -> dict:
    from torchao.quantization import quantize_

    candidate = copy.deepcopy(model)
    with Clock() as clock:
        quantize_(candidate, config)
    return {**cosine_figures(model, candidate, evaluation), **clock.figures(), "config": repr(config)}


def torchao_minilm_peers() -> dict:
    """setting -> {method name: torchao config factory}: its weight-only configs that run on CPU."""
    from torchao.quantization import Int8WeightOnlyConfig

    peers = {"W8_perchannel_sym": {"torchao_int8wo": Int8WeightOnlyConfig}}
    # torchao 0.18's Int4WeightOnlyConfig has no CPU layout (plain needs the mslk package, tile_packed_to_4d
    # CUDA); the CPU one is the prototype Int4OpaqueTensor config: asymmetric (tinygemm qparams), grouped.
    def int4_cpu():
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        return PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False)
    peers["W4_g32_asym"] = {"torchao_int4wo_cpu_prototype": int4_cpu}
    return peers


def run_inc(model, method: str, setting: dict, calib, evaluation) -> dict:
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig, convert, prepare, quantize
    from transformers import BatchEncoding

    def run_fn(prepared):
        with torch.no_grad():
            for batch in calib:
                prepared(**batch)

    common = {"bits": setting["bits"], "group_size": setting["group_size"], "use_sym": setting["sym"]}
    candidate = copy.deepcopy(model)
    clock = Clock().__enter__()
    if method == "rtn":
        config = RTNConfig(**common, use_layer_wise=False)
        quantized = convert(prepare(candidate, config))
    elif method == "gptq":
        config = GPTQConfig(**common)
        prepared = prepare(candidate, config, example_inputs=calib[0])
        run_fn(prepared)
        quantized = convert(prepared)
    elif method == "awq":
        config = AWQConfig(**common)
        # INC's AWQ calls example_inputs.to(device): a BatchEncoding is the dict that has .to()
        quantized = quantize(candidate, config, run_fn=run_fn, example_inputs=BatchEncoding(calib[0]))
    else:
        raise ValueError(method)
    clock.__exit__()
    return {**cosine_figures(model, quantized, evaluation), **clock.figures(),
            "config": {k: v for k, v in config.to_dict().items() if not isinstance(v, (dict, list))}
            if hasattr(config, "to_dict") else repr(config)}


def linear_weights(model) -> dict:
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def run_autoround_pkg(model, tokenizer, setting: dict, calib, evaluation, iters: int, seq_len: int,
                      amp: bool = False) -> dict:
    """Intel's `auto-round` (SignRound) on a copy of the model: the same calibration batches (its dataset
    given as the tokenized batches, so it reads no hub), fp32 (amp=False, as pt2q's default) or its own
    default amp=True (bf16 on a CPU with bf16), CPU, its defaults otherwise. Its quantize() leaves the
    fake-quantized (q/dq) float weights in the model."""
    import auto_round
    from auto_round import AutoRound

    candidate = copy.deepcopy(model)
    before = linear_weights(candidate)
    rows = sum(batch["input_ids"].shape[0] for batch in calib)
    logger = logging.getLogger("autoround")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its per-block INFO lines
    try:
        with Clock() as clock:
            compressor = AutoRound(candidate, tokenizer=tokenizer, bits=setting["bits"],
                                   group_size=setting["group_size"], sym=setting["sym"], dataset=calib,
                                   iters=iters, nsamples=rows, seqlen=seq_len, batch_size=AUTOROUND_PKG_BATCH_ROWS,
                                   device_map="cpu", amp=amp)
            quantized, layer_config = compressor.quantize()
    finally:
        logger.setLevel(level)
    quantized = quantized.float()  # amp=True leaves the model in bf16: scored in fp32 like every other row
    if amp:  # a layer left unquantized then differs from the original only by the bf16 cast
        before = {name: weight.to(torch.bfloat16).float() for name, weight in before.items()}
    after = linear_weights(quantized)
    unquantized = [name for name, weight in before.items() if torch.equal(weight, after[name])]
    first = next(iter(layer_config.values()), {}) if isinstance(layer_config, dict) else {}
    return {**cosine_figures(model, quantized, evaluation), **clock.figures(),
            "version": f"auto-round {auto_round.__version__}",
            "config": {"bits": setting["bits"], "group_size": setting["group_size"], "sym": setting["sym"],
                       "iters": iters, "nsamples": rows, "seqlen": seq_len, "batch_size": AUTOROUND_PKG_BATCH_ROWS,
                       "amp": amp, "device_map": "cpu",
                       "enable_torch_compile": getattr(compressor, "enable_torch_compile", None),
                       "scale_dtype": str(first.get("scale_dtype")) if isinstance(first, dict) else None},
            "quantized_linears": len(before) - len(unquantized), "unquantized_layers": unquantized}


def run_hqq_pkg(model, setting: dict, evaluation, layers: list | None) -> dict:
    """The `hqq` package's quantize + dequantize (Quantizer, groups along the input dimension: axis=1, its
    defaults otherwise: optimize=True, float zero points) of each weight in `layers`, in a copy."""
    from importlib import metadata

    from hqq.core.quantize import Quantizer

    candidate = copy.deepcopy(model)
    modules = dict(candidate.named_modules())
    source = "the linears pt2q_hqq quantized (its report)"
    if layers is None:
        layers = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
        source = "every nn.Linear (pt2q_hqq did not run)"
    group_size = None if setting["group_size"] == -1 else setting["group_size"]  # None: one group per row
    with Clock() as clock, torch.no_grad():
        for name in layers:
            weight = modules[name].weight
            codes, meta = Quantizer.quantize(weight.detach().clone(), nbits=setting["bits"], group_size=group_size,
                                             axis=1, bitpack=False, device="cpu", compute_dtype=torch.float32)
            weight.copy_(Quantizer.dequantize(codes, meta).reshape(weight.shape))
    return {**cosine_figures(model, candidate, evaluation), **clock.figures(),
            "version": f"hqq {metadata.version('hqq')}",
            "config": {"nbits": setting["bits"], "group_size": group_size, "axis": 1, "optimize": True,
                       "round_zero": False, "compute_dtype": "float32"},
            "quantized_linears": len(layers), "layers": source,
            "layers_note": "the cosine reads last_hidden_state: the pooler (pooler.dense) is quantized, not scored"}


def inc_version() -> str | None:
    from importlib import metadata

    for name in ("neural-compressor-pt", "neural-compressor"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{name} {metadata.version(name)}"
    return None


def selected(args, method: str) -> bool:
    """Whether --methods (shell-style patterns of row names; none given: every row) selects `method`."""
    return not args.methods or any(fnmatch.fnmatchcase(method, pattern) for pattern in args.methods)


def minilm_part(args, part: dict) -> dict:
    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(args.calib_sentences, args.eval_sentences)
    calib = demo.encode_batches(tokenizer, calib_texts, args.batch_size, args.seq_len)
    evaluation = demo.encode_batches(tokenizer, eval_texts, args.batch_size, args.seq_len)
    part.update({"calib_batches": len(calib), "eval_batches": len(evaluation),
                 "batch": [args.batch_size, args.seq_len],
                 "fp32_archive_bytes": archive_bytes(pt2q.capture(model, (), calib[0]))})
    settings = {name: SETTINGS[name] for name in args.settings}
    torchao_peers, inc_ready = {}, None
    if not args.skip_peers:
        try:
            torchao_peers = torchao_minilm_peers()
        except Exception as error:  # noqa: BLE001 - a peer failing is a result
            part["torchao_error"] = failure(error)
        try:
            import neural_compressor.torch.quantization  # noqa: F401
            logging.getLogger("neural_compressor").setLevel(logging.WARNING)  # its per-step INFO lines
            inc_ready = inc_version()
            part["inc_version"] = inc_ready
        except Exception as error:  # noqa: BLE001
            part["inc_error"] = failure(error)
    for name, setting in settings.items():
        results = part[name] = {}
        # Each peer runs right after the pt2q method it compares with (same algorithm), so that the
        # quantize times of a pair see about the same machine load.
        jobs = []
        steps = args.train_steps
        default_gptq = PT2Q_METHODS["pt2q_gptq"](setting, steps)
        hqq_layers: dict = {}  # the linears pt2q_hqq quantized: hqq_pkg quantizes the same
        for method, make_config in PT2Q_METHODS.items():
            if method.startswith("pt2q_gptq_") and make_config(setting, steps) == default_gptq:
                # this variant is the default config: not run twice
                jobs.append((method, lambda d=default_gptq: {"same_as": "pt2q_gptq", "config": repr(d)}))
                continue
            if method in TRAINED_SETTINGS and name not in TRAINED_SETTINGS[method] and not args.trained_everywhere:
                continue  # (see TRAINED_SETTINGS)
            algorithm = method.removeprefix("pt2q_")
            keep = hqq_layers if algorithm == "hqq" else None
            note = {"note": HQQ_SYM_NOTE} if algorithm == "hqq" and setting["sym"] else {}
            shapes = "batch_seq" if method in DYNAMIC_SEQ_METHODS else None
            jobs.append((method, lambda make=make_config, k=keep, n=note, d=shapes: {
                **run_pt2q(model, make(setting, steps), calib, evaluation, keep=k, dynamic_shapes=d), **n}))
            if args.skip_peers:
                continue
            if algorithm in INC_METHODS.get(name, ()):
                jobs.append((f"inc_{algorithm}", None if inc_ready is None else
                             lambda a=algorithm: run_inc(model, a, setting, calib, evaluation)))
            if algorithm in ("autoround", "autoround_bf16"):
                amp = algorithm == "autoround_bf16"
                jobs.append((f"autoround_pkg{'_bf16' if amp else ''}", lambda amp=amp: run_autoround_pkg(
                    model, tokenizer, setting, calib, evaluation, steps, args.seq_len, amp=amp)))
            if algorithm == "hqq":
                jobs.append(("hqq_pkg", lambda: {**run_hqq_pkg(model, setting, evaluation, hqq_layers.get("layers")),
                                                 **({"note": HQQ_SYM_NOTE} if setting["sym"] else {})}))
        if not args.skip_peers:
            for method, make_config in torchao_peers.get(name, {}).items():
                jobs.append((method, lambda make=make_config: run_torchao(model, make(), evaluation)))
        jobs = [(method, job) for method, job in jobs if selected(args, method)]
        for method, job in jobs:
            log(f"minilm {name} {method}")
            if job is None:
                results[method] = {"error": "neural_compressor.torch is not importable: see inc_error"}
                continue
            try:
                results[method] = job()
            except Exception as error:  # noqa: BLE001 - a crash (ours or a peer's) is a result
                results[method] = failure(error)
            gc.collect()
            checkpoint()
    return part


def autotune_part(args, part: dict) -> dict:
    """One pt2q.autotune run on MiniLM (tools/bench_autotune.py's autotune_minilm, on the same text as part
    1) over get_woq_tuning_config at AUTOTUNE_FORMAT: every config first, then fallbacks of the best."""
    import dataclasses

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_autotune

    tuning = pt2q.get_woq_tuning_config(**AUTOTUNE_FORMAT, tolerable_loss=args.autotune_tolerable_loss,
                                        max_trials=args.autotune_max_trials, timeout_s=args.autotune_timeout_s,
                                        fallback_after="all_configs")
    # the trained configs at the same steps as part 1's rows (AutoRound: one 8-sentence batch per step)
    for index, config in enumerate(tuning.config_set):
        if isinstance(config, pt2q.AutoRoundConfig):
            tuning.config_set[index] = dataclasses.replace(config, iters=args.train_steps, batch_size=1)
        elif isinstance(config, pt2q.TEQConfig):
            tuning.config_set[index] = dataclasses.replace(config, steps=args.train_steps)
    part["load_average_1min_at_start"] = load_average()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # autotune prints its trial table: stdout carries the JSON
        part.update(bench_autotune.autotune_minilm(
            calib_sentences=args.calib_sentences, eval_sentences=args.eval_sentences, batch_size=args.batch_size,
            seq_len=args.seq_len, tuning=tuning))
    part["wall_s"] = time.perf_counter() - start
    return part


# ---------------------------------------------------------------------------------------------- Part 2


def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_SHAPE, use_cache=False)
    return LlamaForCausalLM(config).eval()


def logits_of(function):
    def run(**batch):
        output = function(**batch)
        return output[0] if isinstance(output, (tuple, list)) else output.logits
    return run


def compile_pt2q_float(model, example):
    compiled = inductor.compile(pt2q.capture(model, (), example), example)
    return compiled, {}


def compile_pt2q_rtn(model, example, config):
    start = time.perf_counter()
    qmodel = pt2q.quantize(model, config, example_inputs=example, progress=False)
    quantize_s = time.perf_counter() - start
    compiled = inductor.compile(qmodel, example)
    figures = {"quantize_s": quantize_s, "config": repr(config)}
    kernels = getattr(compiled, "weight_only_kernels", None)
    if kernels is not None:
        figures["weight_only_kernels"] = dict(collections.Counter(kernels.values()))
    else:
        figures["weight_only_kernels"] = "attribute not present (backend without weight-only lowering)"
    report = qmodel.meta.get("pt2q_weight_only_report")
    if report is not None:
        figures.update(packed_bytes=report.packed_bytes, float_bytes=report.float_bytes)
    return compiled, figures


def compile_torchao(model, example, make_config):
    from torchao.quantization import quantize_

    start = time.perf_counter()
    quantize_(model, make_config())
    quantize_s = time.perf_counter() - start
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(**example)
    return compiled, {"quantize_s": quantize_s, "config": repr(make_config()),
                      "compile": "torch.compile (default Inductor settings, no freezing)"}


def decode_contenders(skip_peers: bool) -> dict:
    """name -> (model dtype, compile(model copy in that dtype, example) -> (callable, figures))."""
    chosen = {
        "fp32_inductor": (torch.float32, compile_pt2q_float),
        "bf16_inductor": (torch.bfloat16, compile_pt2q_float),
        "pt2q_rtn_w8_perchannel": (torch.float32, lambda m, e: compile_pt2q_rtn(
            m, e, pt2q.RTNConfig(bits=8, group_size=-1))),
        "pt2q_rtn_w4_g32": (torch.float32, lambda m, e: compile_pt2q_rtn(m, e, pt2q.RTNConfig(bits=4, group_size=32))),
        "pt2q_rtn_w4_g128": (torch.float32, lambda m, e: compile_pt2q_rtn(
            m, e, pt2q.RTNConfig(bits=4, group_size=128))),
    }
    # The same formats on ATen's kernels (the weight-only kernel table's other column), for comparison
    from pt2q.backends.inductor.weight_only import KERNELS_ENV

    def aten_kernels(compile_fn):
        def run(model, example):
            previous = os.environ.get(KERNELS_ENV)
            os.environ[KERNELS_ENV] = "aten"
            try:
                return compile_fn(model, example)
            finally:
                if previous is None:
                    os.environ.pop(KERNELS_ENV)
                else:
                    os.environ[KERNELS_ENV] = previous
        return run

    for name in ("pt2q_rtn_w8_perchannel", "pt2q_rtn_w4_g32", "pt2q_rtn_w4_g128"):
        dtype, compile_fn = chosen[name]
        chosen[f"{name}_aten_kernels"] = (dtype, aten_kernels(compile_fn))
    if not skip_peers:
        def int8():
            from torchao.quantization import Int8WeightOnlyConfig
            return Int8WeightOnlyConfig(set_inductor_config=False)

        def int4(group_size):
            def make():
                from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
                return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
            return make

        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            chosen[f"torchao_int8wo_{tag}"] = (dtype, lambda m, e, f=int8: compile_torchao(m, e, f))
            chosen[f"torchao_int4wo_g32_{tag}"] = (dtype, lambda m, e, f=int4(32): compile_torchao(m, e, f))
        chosen["torchao_int4wo_g128_bf16"] = (torch.bfloat16, lambda m, e, f=int4(128): compile_torchao(m, e, f))
    return chosen


def decode_part(args, part: dict) -> dict:
    model = llama_model()
    part["model"] = {"class": "LlamaForCausalLM", **LLAMA_SHAPE, "use_cache": False,
                     "parameters": sum(p.numel() for p in model.parameters())}
    default_threads = torch.get_num_threads()
    try:
        for threads in args.decode_threads:
            # Inductor's C++ kernels fix their OpenMP thread count when generated: compile per thread count
            torch.set_num_threads(threads or default_threads)
            decode_runs(args, model, part.setdefault(f"threads_{torch.get_num_threads()}", {}))
    finally:
        torch.set_num_threads(default_threads)
    return part


def decode_runs(args, model, part: dict) -> dict:
    from torch._inductor import cpu_vec_isa

    chosen = decode_contenders(args.skip_peers)
    # Inductor picks its generated code's ISA separately from ATen (it honours ATEN_CPU_CAPABILITY too)
    part["inductor_vec_isa"] = str(cpu_vec_isa.pick_vec_isa())
    part["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    for batch_size in args.decode_batches:
        generator = torch.Generator().manual_seed(batch_size)
        example = {"input_ids": torch.randint(0, LLAMA_SHAPE["vocab_size"], (batch_size, 1), generator=generator)}
        with torch.no_grad():
            reference = model(**example).logits.float()
        results = part[f"batch_{batch_size}"] = {}
        runners = {}
        for name, (dtype, compile_fn) in chosen.items():
            log(f"decode {torch.get_num_threads()} threads, batch {batch_size}: {name}")
            try:
                copy_ = copy.deepcopy(model).to(dtype)
                (runner, figures), compile_s = demo.timed_cold(compile_fn, copy_, example)
                runner = logits_of(runner)
                with torch.no_grad():
                    got = runner(**example).float()
                cos = torch.nn.functional.cosine_similarity(got.flatten(1), reference.flatten(1), dim=-1)
                results[name] = {"setup_s": compile_s, "logits_cos_vs_fp32_eager": cos.min().item(), **figures}
                runners[name] = runner
            except Exception as error:  # noqa: BLE001
                results[name] = failure(error)
            gc.collect()
            checkpoint()
        log(f"decode batch {batch_size}: timing {len(runners)} contenders")
        results["load_average_1min_before"] = load_average()
        # Interleaved rounds (as demo.interleaved_latencies), each call timed by the wall clock and by the
        # process's CPU time. latency = the median over rounds of each round's median wall time; best = the
        # least disturbed round; cpu = the same median of CPU time, which a machine shared with busy
        # processes inflates least (at 1 thread it is the kernel's own time, cache and memory contention aside)
        rounds = {name: {"": [], "best_": [], "cpu_": []} for name in runners}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    runner(**example)  # warm-up
                    wall, cpu = [], []
                    for _ in range(args.runs):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        runner(**example)
                        cpu.append(time.process_time() - start_cpu)
                        wall.append(time.perf_counter() - start)
                    for key, values in (("", wall), ("best_", wall), ("cpu_", cpu)):
                        rounds[name][key].append(statistics.median(values))
        results["load_average_1min_after"] = load_average()
        for key, pick in (("", statistics.median), ("best_", min), ("cpu_", statistics.median)):
            latencies = {name: pick(values[key]) for name, values in rounds.items()}
            fp32 = latencies.get("fp32_inductor")
            bf16 = latencies.get("bf16_inductor")
            for name, latency in latencies.items():
                results[name][f"latency_{key}ms"] = latency * 1e3
                if fp32:
                    results[name][f"speedup_{key}vs_fp32_inductor"] = fp32 / latency
                if bf16:
                    results[name][f"speedup_{key}vs_bf16_inductor"] = bf16 / latency
        del runners
        gc.collect()
        checkpoint()
    return part


# ---------------------------------------------------------------------------------------------- targets


def _get(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def targets(results: dict) -> dict:
    """The acceptance figures, with this run's numbers beside them (informational: nothing asserted)."""
    minilm, decode = results.get("minilm", {}), results.get("decode", {})
    out = {}
    gptq = _get(minilm, "W4_g32_sym", "pt2q_gptq")
    inc_gptq = _get(minilm, "W4_g32_sym", "inc_gptq")
    out["minilm_W4_g32_sym_gptq_mean_cos>=0.985"] = {
        "row": "pt2q_gptq (the default GPTQConfig)", "config": _get(gptq, "config"),
        "value": _get(gptq, "mean_cos"), "met": None if _get(gptq, "mean_cos") is None else gptq["mean_cos"] >= 0.985}
    for clock in ("quantize_s", "quantize_cpu_s"):
        ours, theirs = _get(gptq, clock), _get(inc_gptq, clock)
        out[f"minilm_W4_g32_sym_gptq_faster_than_inc_gptq ({clock})"] = {
            "pt2q": ours, "inc": theirs, "met": None if None in (ours, theirs) else ours < theirs}
    awq_vs_rtn = {}
    for setting, methods in minilm.items():
        if isinstance(methods, dict) and "pt2q_awq" in methods and "pt2q_rtn" in methods:
            awq, rtn = _get(methods, "pt2q_awq", "mean_cos"), _get(methods, "pt2q_rtn", "mean_cos")
            awq_vs_rtn[setting] = {"awq": awq, "rtn": rtn, "met": None if None in (awq, rtn) else awq >= rtn}
    out["minilm_awq_mean_cos>=rtn"] = awq_vs_rtn
    w3 = {m: v["mean_cos"] for m, v in minilm.get("W3_g32_asym", {}).items()
          if m.startswith("pt2q_") and isinstance(v, dict) and "mean_cos" in v}
    best = max(w3, key=w3.get) if w3 else None
    out["minilm_W3_g32_asym_best_mean_cos>=0.95"] = {"best": best, "value": w3.get(best),
                                                     "met": None if best is None else w3[best] >= 0.95}
    # AutoRound: accuracy above 0.99 and above our GPTQ's, in less time than auto-round's at the same
    # iters and samples (both rows record them)
    autoround = _get(minilm, "W4_g32_sym", "pt2q_autoround")
    ours, gptq_cos = _get(autoround, "mean_cos"), _get(gptq, "mean_cos")
    out["minilm_W4_g32_sym_autoround_mean_cos>=0.99_and>gptq"] = {
        "config": _get(autoround, "config"), "value": ours, "gptq": gptq_cos,
        "met": None if None in (ours, gptq_cos) else ours >= 0.99 and ours > gptq_cos}
    for suffix in ("", "_bf16"):   # fp32 against fp32, and bf16 autocast against auto-round's CPU default
        mine_row, their_row = (_get(minilm, "W4_g32_sym", f"pt2q_autoround{suffix}"),
                               _get(minilm, "W4_g32_sym", f"autoround_pkg{suffix}"))
        entry = out[f"minilm_W4_g32_sym_autoround{suffix}_faster_than_auto_round{suffix}"] = {
            "auto_round_config": _get(their_row, "config"), "pt2q_mean_cos": _get(mine_row, "mean_cos"),
            "auto_round_mean_cos": _get(their_row, "mean_cos")}
        for clock in ("quantize_s", "quantize_cpu_s"):
            mine, theirs = _get(mine_row, clock), _get(their_row, clock)
            entry.update({f"pt2q_{clock}": mine, f"auto_round_{clock}": theirs,
                          f"met{'_cpu' if 'cpu' in clock else ''}": None if None in (mine, theirs) else mine < theirs})
    # HQQ: at least the hqq package's accuracy, in less time
    hqq, hqq_pkg = _get(minilm, "W4_g32_sym", "pt2q_hqq"), _get(minilm, "W4_g32_sym", "hqq_pkg")
    entry = out["minilm_W4_g32_sym_hqq_mean_cos>=hqq_pkg_and_faster"] = {
        "note": HQQ_SYM_NOTE, "pt2q_mean_cos": _get(hqq, "mean_cos"), "hqq_pkg_mean_cos": _get(hqq_pkg, "mean_cos")}
    for clock in ("quantize_s", "quantize_cpu_s"):
        entry[f"pt2q_{clock}"], entry[f"hqq_pkg_{clock}"] = _get(hqq, clock), _get(hqq_pkg, clock)
    figures = (entry["pt2q_mean_cos"], entry["hqq_pkg_mean_cos"], entry["pt2q_quantize_s"], entry["hqq_pkg_quantize_s"])
    entry["met"] = None if None in figures else figures[0] >= figures[1] and figures[2] < figures[3]
    w3_autoround = {}
    for setting in ("W3_g32_sym", "W3_g32_asym"):
        value = _get(minilm, setting, "pt2q_autoround", "mean_cos")
        if value is not None:
            w3_autoround[setting] = {"value": value, "met": value >= 0.97}
    out["minilm_W3_g32_autoround_mean_cos>=0.97"] = w3_autoround
    for threads, runs in decode.items():
        if not threads.startswith("threads_"):
            continue
        b1 = runs.get("batch_1", {})
        for tag, name, factor in (("int4_g32", "pt2q_rtn_w4_g32", 3.0), ("int4_g128", "pt2q_rtn_w4_g128", 3.0),
                                  ("int8", "pt2q_rtn_w8_perchannel", 2.0)):
            entry = out[f"decode_{threads}_b1_{tag}_speedup>={factor:g}x_and_faster_than_bf16"] = {
                "contender": name, "kernels": _get(b1, name, "weight_only_kernels"),
                "isa": runs.get("aten_cpu_capability")}
            for key in ("", "best_", "cpu_"):  # wall median, the least disturbed round, CPU time
                bf16 = _get(b1, "bf16_inductor", f"latency_{key}ms")
                speedup = _get(b1, name, f"speedup_{key}vs_fp32_inductor")
                latency = _get(b1, name, f"latency_{key}ms")
                entry.update({f"speedup_{key}vs_fp32_inductor": speedup, f"latency_{key}ms": latency,
                              f"bf16_{key}ms": bf16,
                              f"met{'_' + key[:-1] if key else ''}": None if None in (speedup, latency, bf16)
                              else speedup >= factor and latency < bf16})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path (default: stdout only)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 calibration / 2 evaluation batches, "
                                                             "few latency rounds")
    parser.add_argument("--skip-peers", action="store_true", help="pt2q only (no torchao, no INC)")
    parser.add_argument("--skip-decode", action="store_true", help="skip part 2 (LLaMA decode latency)")
    parser.add_argument("--skip-minilm", action="store_true", help="skip part 1 (MiniLM accuracy)")
    parser.add_argument("--skip-autotune", action="store_true", help="skip the weight-only autotune run on MiniLM")
    parser.add_argument("--methods", nargs="+", metavar="PATTERN",
                        help="part 1 rows to run, as shell-style patterns of their names (e.g. 'pt2q_autoround' "
                             "'autoround_pkg', or '*hqq*'); default: every row")
    parser.add_argument("--autotune-tolerable-loss", type=float, default=0.01,
                        help="the autotune run's tolerable relative loss of mean cosine (0.01: cosine >= 0.99)")
    parser.add_argument("--autotune-max-trials", type=int, default=10)
    parser.add_argument("--autotune-timeout-s", type=float, default=3600)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--trained-everywhere", action="store_true",
                        help="run TEQ / AutoRound (and auto-round) at every setting, not only those in TRAINED_SETTINGS")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for part 1 (0: torch's default, all cores); 1 keeps a busy shared "
                             "machine's OpenMP stalls out of the quantize times")
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--decode-threads", nargs="+", type=int, default=[0, 1],
                        help="intra-op thread counts for part 2 (0: torch's default, all cores). On a machine "
                             "shared with other busy processes, multi-threaded Inductor kernels stall at OpenMP "
                             "barriers; the 1-thread figures show the kernels without that")
    args = parser.parse_args(argv)
    args.batch_size, args.seq_len = 8, 128
    args.calib_sentences, args.eval_sentences = (16, 16) if args.quick else (128, 256)
    args.rounds, args.runs = (2, 3) if args.quick else (7, 10)
    args.train_steps = 4 if args.quick else 200  # AutoRound iters / TEQ steps, ours and auto-round's

    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    # torch.compile of many copies of one model class recompiles its forward per copy: without a higher
    # limit, Dynamo would silently run later contenders eagerly
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    start = time.perf_counter()
    results: dict = {"settings": vars(args)}  # emit_json puts the machine record first
    CHECKPOINT.update(path=args.out, results=results)
    default_threads = torch.get_num_threads()
    results["load_average_1min_at_start"] = load_average()
    if not args.skip_minilm:
        torch.set_num_threads(args.threads or default_threads)
        results["minilm_threads"] = torch.get_num_threads()
        minilm_part(args, results.setdefault("minilm", {}))
        torch.set_num_threads(default_threads)
    if not args.skip_autotune:
        torch.set_num_threads(args.threads or default_threads)
        log("autotune: weight-only config set on MiniLM")
        try:
            autotune_part(args, results.setdefault("autotune_woq", {}))
        except Exception as error:  # noqa: BLE001 - a crash is a result
            results["autotune_woq"] = failure(error)
        results["autotune_threads"] = torch.get_num_threads()
        torch.set_num_threads(default_threads)
        checkpoint()
    if not args.skip_decode:
        decode_part(args, results.setdefault("decode", {}))
    results["targets"] = targets(results)
    results["total_runtime_s"] = time.perf_counter() - start
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

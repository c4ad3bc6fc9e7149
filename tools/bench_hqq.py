"""HQQ against round to nearest and the `hqq` package on the real all-MiniLM-L6-v2 weights: error and time.

For each format (bits 3 / 4, groups of 32 / 64 along the input dimension) and each of MiniLM's 37 linear
weights, the weight is quantized and dequantized by:
- `rtn`, `rtn_mse`: pt2q's asymmetric round to nearest (uint8 zero point), without / with mse_clip;
- `hqq_pkg`: the `hqq` package (0.2.8: `Quantizer.quantize(..., axis=1)`, groups along the input
  dimension like pt2q's; its defaults otherwise), when installed: a reference, never used by pt2q itself;
- `hqq_zero_only`: pt2q's HQQ with fit_scale=False (HQQ's published step: the zero point alone);
- `hqq`: pt2q's HQQ with its defaults (float32 zero points);
- `hqq_int_zero`: pt2q's HQQ result with each zero point rounded to an integer in [0, 2**bits - 1], then
  the scale re-fitted to it by least squares and the codes re-rounded, alternately, 20 rounds, each group
  keeping its best: what storing HQQ's zero points as uint8 would give.
Errors over all 37 weights together: `rel_sq` = sum (w - w')^2 / sum w^2, `l1` = mean |w - w'|.
Times: the whole model's 37 weights quantized, in this process with 1 thread, best of `--repeat` runs.

    python tools/bench_hqq.py [--json out.json] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pt2q.algorithms.hqq import hqq_quantize
from pt2q.algorithms.rtn import WeightFormat, _split, grouped, rtn_quantize
from pt2q.demo import load_minilm

FORMATS = ((3, 32), (4, 32), (3, 64), (4, 64))


def integer_zero(weight: torch.Tensor, fmt: WeightFormat, rounds: int = 20) -> torch.Tensor:
    """HQQ's parameters with the zero point rounded to an integer code and the scale re-fitted to it."""
    result = hqq_quantize(weight, fmt)
    top = (1 << fmt.bits) - 1
    groups = _split(grouped(weight, fmt), fmt, weight.shape[1])
    scale, zero = result.scale.unsqueeze(-1), torch.round(result.zero_point).clamp(0, top).unsqueeze(-1)
    best_error, best = None, None
    for _ in range(rounds):
        centred = torch.round(groups / scale + zero).clamp(0, top) - zero
        reconstruction = centred * scale
        error = (groups - reconstruction).pow(2).sum(-1)
        if best is None:
            best_error, best = error, reconstruction
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better.unsqueeze(-1), reconstruction, best)
        norm = centred.pow(2).sum(-1, keepdim=True)
        fitted = (groups * centred).sum(-1, keepdim=True) / norm.clamp_min(1e-30)
        scale = torch.where((norm > 0) & (fitted > 0), fitted, scale)
    return best.reshape(weight.shape)


def hqq_package(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(weight.clone(), nbits=bits, group_size=group_size, axis=1, bitpack=False,
                                     device="cpu", compute_dtype=torch.float32)
    return ((codes.float() - meta["zero"]) * meta["scale"]).reshape(weight.shape)


def methods(bits: int, group_size: int) -> dict:
    fmt = WeightFormat(bits=bits, group_size=group_size, sym=False)
    table = {"rtn": lambda w: rtn_quantize(w, fmt).dequantize(),
             "rtn_mse": lambda w: rtn_quantize(w, fmt, mse_clip=True).dequantize()}
    try:
        import hqq  # noqa: F401 - only to know whether the reference is there
        table["hqq_pkg"] = lambda w: hqq_package(w, bits, group_size)
    except ImportError:
        pass
    table["hqq_zero_only"] = lambda w: hqq_quantize(w, fmt, fit_scale=False).dequantize()
    table["hqq"] = lambda w: hqq_quantize(w, fmt).dequantize()
    table["hqq_int_zero"] = lambda w: integer_zero(w, fmt)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, model = load_minilm()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norm = sum(w.pow(2).sum().item() for w in weights)
    numel = sum(w.numel() for w in weights)
    results = {}
    for bits, group_size in FORMATS:
        row = results[f"W{bits} g{group_size}"] = {}
        print(f"W{bits} g{group_size} ({len(weights)} weights, {numel} values)")
        for name, method in methods(bits, group_size).items():
            seconds = []
            for _ in range(args.repeat if name in ("hqq", "hqq_pkg") else 1):
                start = time.perf_counter()
                outputs = [method(w) for w in weights]
                seconds.append(time.perf_counter() - start)
            rel_sq = sum((w - o).pow(2).sum().item() for w, o in zip(weights, outputs)) / norm
            l1 = sum((w - o).abs().sum().item() for w, o in zip(weights, outputs)) / numel
            row[name] = {"rel_sq": rel_sq, "l1": l1, "seconds": min(seconds)}
            print(f"  {name:14s} rel_sq {rel_sq:.5f}  l1 {l1:.4e}  {min(seconds):6.2f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()

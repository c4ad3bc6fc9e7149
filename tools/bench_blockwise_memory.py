"""Peak memory of blockwise GPTQ against model depth: what calibration needs beyond the model must stay flat.

LLaMA configs (hidden 512, MLP 1376, random weights) of 4, 8, 16 and 32 layers are each quantized with
GPTQ W4 g128 in a fresh process (so one run's allocations never hide in another's peak). Per depth:
RSS after building the model, after `prepare` (which holds its own copy of the weights), the peak while
`calibrate` runs block by block (sampled every 5 ms), and the time. The figure to watch is
`calibrate_peak_above_prepared_mib`: one block's inputs, Hessians and statistics, the same at any depth.

    python tools/bench_blockwise_memory.py --out bench_blockwise_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEPTHS = (4, 8, 16, 32)
MIB = 2 ** 20


def child(depth: int, samples: int, seq_len: int) -> dict:
    import torch
    import transformers

    import pt2q
    from pt2q.demo_llm import PeakRSS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=depth,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=1024,
                                      max_position_embeddings=seq_len)
    model = transformers.LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 1024, (1, seq_len))} for _ in range(samples)]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = PeakRSS.current()
    prepared = pt2q.prepare(model, pt2q.GPTQConfig(bits=4, group_size=128, n_samples=samples), batches[0])
    rss_prepared = PeakRSS.current()
    with PeakRSS() as memory:
        start = time.perf_counter()
        pt2q.calibrate(prepared, batches, progress=False)
        seconds = time.perf_counter() - start
    qmodel = pt2q.convert(prepared)
    report = qmodel.meta["pt2q_weight_only_report"]
    return {"layers": depth, "model_mib": model_bytes / MIB, "rss_model_mib": rss_model / MIB,
            "rss_prepared_mib": rss_prepared / MIB, "calibrate_peak_mib": memory.peak / MIB,
            "calibrate_peak_above_prepared_mib": (memory.peak - rss_prepared) / MIB,
            "rss_after_calibrate_mib": PeakRSS.current() / MIB, "calibrate_seconds": seconds,
            "seconds_per_block": seconds / depth, "quantized_linears": len(report.layers)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.samples, args.seq_len)))
        return 0
    from pt2q.demo import emit_json

    runs = []
    for depth in args.depths:
        result = subprocess.run([sys.executable, __file__, "--child", str(depth), "--samples", str(args.samples),
                                 "--seq-len", str(args.seq_len)], capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise SystemExit(f"depth {depth} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{depth} layers: {runs[-1]}", file=sys.stderr)
    extra = [run["calibrate_peak_above_prepared_mib"] for run in runs]
    emit_json({"benchmark": "blockwise_memory", "algorithm": "GPTQ W4 g128",
               "calibration": {"windows": args.samples, "seq_len": args.seq_len}, "runs": runs,
               "calibrate_peak_above_prepared_mib": {"min": min(extra), "max": max(extra),
                                                     "max_over_min": max(extra) / max(min(extra), 1e-9)}},
              args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

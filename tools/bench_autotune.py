"""pt2q.autotune on real all-MiniLM-L6-v2: the int8 config set of `pt2q.get_int8_tuning_config()` searched
with a tolerance tight enough that static int8 alone fails, so that fallbacks (the most damaged layers by
the dump tool's per-node SQNR kept fp32) run.

eval_fn is the mean cosine between the model's sentence embeddings and fp32's (masked mean pooling, as in
`pt2q.demo`) over evaluation sentences disjoint from the calibration text; the fp32 embeddings are
computed once. Models are scored eagerly (Q/DQ graphs; no Inductor compile). Prints the trial table on
stderr and JSON on stdout (or --out PATH): the machine, the settings, every trial and the choice.
`autotune_minilm(...)` is the same run as a function, for other benchmarks to call.

    .venv/bin/python tools/bench_autotune.py --out /tmp/bench_autotune.json
    .venv/bin/python tools/bench_autotune.py --tolerable-loss 0.002 --max-trials 6
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import pt2q  # noqa: E402
from pt2q import demo, textdata  # noqa: E402
from pt2q.autotune import config_summary  # noqa: E402 - the module (pt2q.autotune is the function)


def embedding_fidelity(reference_model, batches: list[dict]):
    """eval_fn(model) -> mean cosine of `model`'s sentence embeddings against `reference_model`'s over
    `batches` (the reference embeddings are computed once, here)."""
    with torch.no_grad():
        references = [demo.sentence_embeddings(reference_model(**batch), batch["attention_mask"]) for batch in batches]

    def eval_fn(model) -> float:
        cosines = []
        with torch.no_grad():
            for batch, reference in zip(batches, references):
                embeddings = demo.sentence_embeddings(model(**batch), batch["attention_mask"])
                cosines.append((embeddings * reference).sum(-1))
        return torch.cat(cosines).mean().item()

    return eval_fn


def autotune_minilm(tolerable_loss: float = 0.004, max_trials: int | None = 10, timeout_s: float | None = 1800,
                    calib_sentences: int = 64, eval_sentences: int = 128, batch_size: int = 16,
                    seq_len: int = 128, fallback_after: str = "each_config", verbose: bool = True,
                    tuning: pt2q.TuningConfig | None = None) -> dict:
    """Run pt2q.autotune on MiniLM with `get_int8_tuning_config` and return the figures as JSON data.

    tuning: a TuningConfig to search instead (e.g. `pt2q.get_woq_tuning_config(...)`); its own
    tolerable_loss, max_trials, timeout_s and fallback_after then apply, and those arguments are ignored."""
    tokenizer, model = demo.load_minilm()
    calib_texts, eval_texts = textdata.split(calib_sentences, eval_sentences)
    calib = demo.encode_batches(tokenizer, calib_texts, batch_size, seq_len)
    evaluation = demo.encode_batches(tokenizer, eval_texts, batch_size, seq_len)
    if tuning is None:
        tuning = pt2q.get_int8_tuning_config(tolerable_loss=tolerable_loss, max_trials=max_trials,
                                             timeout_s=timeout_s, fallback_after=fallback_after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = pt2q.autotune(model, tuning, embedding_fidelity(model, evaluation), calib, verbose=verbose)
    return {"model": "all-MiniLM-L6-v2", "eval_fn": "mean cosine of sentence embeddings vs fp32 (eager)",
            "calib_batches": len(calib), "eval_sentences": len(evaluation) * batch_size,
            "batch": [batch_size, seq_len], "threads": torch.get_num_threads(),
            "config_set": [config_summary(c) for c in tuning.config_set],
            "max_trials": tuning.max_trials, "timeout_s": tuning.timeout_s, "fallback_after": tuning.fallback_after,
            "quantized_layers_of_chosen": pt2q.count_quantized_layers(result.model),
            "warnings": [str(w.message) for w in caught if str(w.message).startswith("pt2q.autotune")],
            **result.as_dict()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON to this path")
    parser.add_argument("--tolerable-loss", type=float, default=0.004)
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--calib-sentences", type=int, default=64)
    parser.add_argument("--eval-sentences", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fallback-after", choices=("each_config", "all_configs"), default="each_config")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="[bench_autotune %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pt2q.autotune").setLevel(logging.INFO)  # one progress line per trial
    if args.threads:
        torch.set_num_threads(args.threads)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the printed trial table goes to stderr; stdout carries the JSON only
    try:
        results = autotune_minilm(args.tolerable_loss, args.max_trials, args.timeout_s, args.calib_sentences,
                                  args.eval_sentences, args.batch_size, args.seq_len, args.fallback_after)
    finally:
        sys.stdout = stdout
    demo.emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

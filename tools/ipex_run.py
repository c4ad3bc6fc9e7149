"""Run the IPEX backend for real on the small BERT-like classifier: `make test-ipex` runs both halves.

    .venv/bin/python tools/ipex_run.py export --dir DIR              # pt2q's venv (torch 2.13)
    PYTHONPATH=. <ipex-venv>/bin/python tools/ipex_run.py run --dir DIR   # IPEX's venv (torch 2.8)

`export` quantizes tests/backends/ipex_tiny_bert.py with pt2q (static int8, SmoothQuant alpha 0.5) and
writes to DIR pt2q's quantities (quantities.json) and, for held-out batches, the inputs with the fp32 and
pt2q Q/DQ logits (reference.pt). `run` quantizes the same model with IPEX twice: with IPEX's own
calibration, and with pt2q's quantities patched into IPEX's qconf (pt2q.backends.ipex.quantize). It
prints, for each, the int8 ops in the frozen TorchScript graph and the logits' agreement with fp32 and
with pt2q's Q/DQ graph, writes the figures to DIR/ipex_run.json, and exits 1 when the patched model has no
int8 op or strays from pt2q's Q/DQ graph further than IPEX's own calibration strays from fp32 (plus a
margin): pt2q's scales must be what IPEX ran on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CALIBRATION_BATCHES = 4
EVAL_BATCHES = 16
EVAL_SEED = 1000
ALPHA = 0.5


def _agreement(logits, reference) -> dict[str, float]:
    import torch

    cosine = torch.nn.functional.cosine_similarity(logits, reference, dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "max_abs_error": (logits - reference).abs().max().item(),
            "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def export(folder: Path) -> int:
    import torch

    import pt2q
    from pt2q.backends.ipex import extract_quantities, save_quantities
    from tests.backends import ipex_tiny_bert

    model = ipex_tiny_bert.build()
    calibration = ipex_tiny_bert.batches(CALIBRATION_BATCHES)
    evaluation = ipex_tiny_bert.batches(EVAL_BATCHES, seed=EVAL_SEED)
    config = pt2q.StaticQuantConfig(smooth_quant=pt2q.SmoothQuantConfig(alpha=ALPHA))
    qmodel = pt2q.quantize(model, config, calibration, example_inputs=calibration[0])
    folder.mkdir(parents=True, exist_ok=True)
    quantities = extract_quantities(qmodel)
    save_quantities(quantities, folder / "quantities.json")
    with torch.no_grad():
        reference = {"inputs": evaluation,
                     "fp32": torch.cat([model(**batch) for batch in evaluation]),
                     "pt2q_qdq": torch.cat([qmodel(**batch) for batch in evaluation])}
    torch.save(reference, folder / "reference.pt")
    print(f"pt2q {pt2q.__version__} on torch {torch.__version__}: {len(quantities)} int8 layers, "
          f"{qmodel.meta['pt2q_smooth_quant_report'].summary()}")
    print(f"pt2q Q/DQ vs fp32: {json.dumps(_agreement(reference['pt2q_qdq'], reference['fp32']))}")
    print(f"wrote {folder / 'quantities.json'} and {folder / 'reference.pt'}")
    return 0


def run(folder: Path) -> int:
    import torch

    from pt2q.backends.ipex import import_ipex, quantize
    from pt2q.backends.ipex.backend import IpexQuantized
    from tests.backends import ipex_tiny_bert

    ipex = import_ipex()
    reference = torch.load(folder / "reference.pt", weights_only=True)
    evaluation = reference["inputs"]
    model = ipex_tiny_bert.build()
    calibration = ipex_tiny_bert.batches(CALIBRATION_BATCHES)

    with_pt2q = quantize(model, folder / "quantities.json", calibration, work_dir=folder)
    # IPEX alone, for comparison: convert from the qconf IPEX saved before the patch.
    prepared = ipex.quantization.prepare(model, ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=ALPHA),
                                         example_kwarg_inputs=calibration[0], inplace=False)
    prepared.load_qconf_summary(qconf_summary=str(with_pt2q.qconf_path))
    converted = ipex.quantization.convert(prepared)
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(converted, example_kwarg_inputs=calibration[0],
                                                  check_trace=False, strict=False))
    ipex_alone = IpexQuantized(traced, with_pt2q.report, with_pt2q.qconf_path, with_pt2q.qconf_path,
                               with_pt2q.example_inputs)

    results = {"torch": torch.__version__, "intel_extension_for_pytorch": ipex.__version__,
               "patch": with_pt2q.report.summary(), "kept_ipex": with_pt2q.report.kept_ipex}
    with torch.no_grad():
        fp32_here = torch.cat([model(**batch) for batch in evaluation])
    results["fp32_same_as_pt2q_venv_max_abs"] = (fp32_here - reference["fp32"]).abs().max().item()
    for label, quantized in (("ipex_own_calibration", ipex_alone), ("ipex_with_pt2q_scales", with_pt2q)):
        int8_ops = quantized.int8_ops()
        with torch.no_grad():
            logits = torch.cat([quantized(**batch) for batch in evaluation])
        results[label] = {"int8_ops": int8_ops, "vs_fp32": _agreement(logits, reference["fp32"]),
                          "vs_pt2q_qdq": _agreement(logits, reference["pt2q_qdq"])}
    results["pt2q_qdq_vs_fp32"] = _agreement(reference["pt2q_qdq"], reference["fp32"])
    (folder / "ipex_run.json").write_text(json.dumps(results, indent=2))

    print(f"torch {results['torch']}, IPEX {results['intel_extension_for_pytorch']}")
    print(results["patch"])
    print("int8 ops IPEX kept its own calibration for:", ", ".join(results["kept_ipex"]) or "none")
    print(f"fp32 logits here vs pt2q's venv: max abs {results['fp32_same_as_pt2q_venv_max_abs']:.3g}")
    print(f"{'model':<24}{'int8 ops':>10}  {'vs fp32: cos mean/min, max abs, top-1':<42}"
          f"{'vs pt2q Q/DQ: cos mean/min, max abs, top-1'}")

    def row(figures):
        return (f"{figures['cosine_mean']:.5f}/{figures['cosine_min']:.5f}, {figures['max_abs_error']:.4f}, "
                f"{figures['top1_agreement']:.3f}")

    print(f"{'pt2q Q/DQ (torch 2.13)':<24}{'-':>10}  {row(results['pt2q_qdq_vs_fp32']):<42}-")
    for label in ("ipex_own_calibration", "ipex_with_pt2q_scales"):
        figures = results[label]
        print(f"{label:<24}{sum(figures['int8_ops'].values()):>10}  {row(figures['vs_fp32']):<42}"
              f"{row(figures['vs_pt2q_qdq'])}")
    print("int8 node kinds (with pt2q's scales):", json.dumps(results["ipex_with_pt2q_scales"]["int8_ops"]))

    failures = []
    patched = results["ipex_with_pt2q_scales"]
    if not patched["int8_ops"]:
        failures.append("the IPEX model with pt2q's scales has no int8 op")
    own_error = 1.0 - results["ipex_own_calibration"]["vs_fp32"]["cosine_min"]
    patched_error = 1.0 - patched["vs_pt2q_qdq"]["cosine_min"]
    if patched_error > 2.0 * own_error + 1e-4:
        failures.append(f"IPEX with pt2q's scales strays from pt2q's Q/DQ graph (1 - min cosine {patched_error:.2e}) "
                        f"more than IPEX's own int8 strays from fp32 ({own_error:.2e})")
    for failure in failures:
        print("FAIL:", failure)
    print("ipex_run: " + ("FAILED" if failures else "OK") + f" (figures in {folder / 'ipex_run.json'})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["export", "run"])
    parser.add_argument("--dir", type=Path, required=True, help="folder for quantities, references, qconfs")
    options = parser.parse_args(argv)
    return export(options.dir) if options.stage == "export" else run(options.dir)


if __name__ == "__main__":
    raise SystemExit(main())

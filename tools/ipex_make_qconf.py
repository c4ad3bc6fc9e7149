"""Make the IPEX qconf summary the CI tests patch (tests/backends/data/ipex_tiny_bert_qconf.json).

Runs in IPEX's venv (torch 2.8 + intel-extension-for-pytorch 2.8; `make test-ipex` builds one):

    PYTHONPATH=. <ipex-venv>/bin/python tools/ipex_make_qconf.py [--out-dir tests/backends/data]

It builds the seeded small BERT-like classifier of tests/backends/ipex_tiny_bert.py, prepares it with
IPEX's SmoothQuant qconfig (alpha 0.5, as pt2q.backends.ipex.quantize does), calibrates on the same
seeded batches the CI tests give pt2q, and saves IPEX's qconf summary. Beside it goes a provenance file
(versions, seed, batches, command) that the tests read. Only IPEX can write such a file: its tensor ids
and op indices come from IPEX's own trace of the model.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CALIBRATION_BATCHES = 4
ALPHA = 0.5
QCONF_NAME = "ipex_tiny_bert_qconf.json"
PROVENANCE_NAME = "ipex_tiny_bert_qconf.provenance.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "tests" / "backends" / "data")
    options = parser.parse_args(argv)

    import torch
    import intel_extension_for_pytorch as ipex
    from pt2q.jsonfile import write_json_atomic
    from tests.backends import ipex_tiny_bert

    torch.manual_seed(ipex_tiny_bert.SEED)
    model = ipex_tiny_bert.build()
    batches = ipex_tiny_bert.batches(CALIBRATION_BATCHES)
    mapping = ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=ALPHA)
    prepared = ipex.quantization.prepare(model, mapping, example_kwarg_inputs=batches[0], inplace=False)
    with torch.no_grad():
        for batch in batches:
            prepared(**batch)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    qconf_path = options.out_dir / QCONF_NAME
    staging = options.out_dir / f".{QCONF_NAME}.ipex"
    prepared.save_qconf_summary(qconf_summary=str(staging))  # IPEX writes in place: stage, then move
    staging.replace(qconf_path)
    provenance = {
        "made_by": "tools/ipex_make_qconf.py",
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "intel_extension_for_pytorch": ipex.__version__,
        "model": "tests/backends/ipex_tiny_bert.py build(seed=%d)" % ipex_tiny_bert.SEED,
        "calibration": f"ipex_tiny_bert.batches({CALIBRATION_BATCHES})",
        "qconfig": f"ipex.quantization.get_smooth_quant_qconfig_mapping(alpha={ALPHA})",
        "cpu": platform.processor() or platform.machine(),
    }
    write_json_atomic(options.out_dir / PROVENANCE_NAME, provenance)
    print(f"wrote {qconf_path} ({qconf_path.stat().st_size} bytes) with torch {torch.__version__}, "
          f"IPEX {ipex.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""IPEX backend (legacy): static int8 through Intel Extension for PyTorch's own prepare / convert, with
pt2q's SmoothQuant factors and quantization parameters patched into the qconf summary IPEX produced.

IPEX ended active development with 2.8 and needs torch 2.8, so this backend lives beside the main path
(pt2q.backends.inductor). Importing it never imports IPEX:

- `extract_quantities(qmodel)` / `save_quantities` / `load_quantities` (quantities.py): pt2q's
  per-layer input scale / zero point, weight scales and SmoothQuant factors, as JSON-ready data. Run in
  pt2q's venv (torch 2.13).
- `patch_qconf(qconf, quantities)` / `patch_qconf_file` / `read_qconf` / `check_loadable` (qconf.py):
  the patcher, plain JSON code, tested in CI against a qconf that IPEX 2.8 produced
  (tests/backends/data/).
- `quantize(model, quantities, calib_data, example_inputs)` (backend.py): the IPEX flow. Runs where
  IPEX imports (torch 2.8, `make test-ipex` builds such a venv); elsewhere it raises
  pt2q.errors.BackendUnavailable that says how to get IPEX and which backend to use instead.
"""
from .backend import IPEX_TORCH, IpexQuantized, import_ipex, ipex_unavailable_reason, quantize
from .qconf import (QconfError, QconfPatchReport, check_loadable, int8_module_entries, patch_qconf, patch_qconf_file,
                    read_qconf)
from .quantities import (QUANTITIES_FORMAT, QuantitiesError, extract_quantities, load_quantities, save_quantities,
                         validate_quantities)

__all__ = ["IPEX_TORCH", "IpexQuantized", "QUANTITIES_FORMAT", "QconfError", "QconfPatchReport", "QuantitiesError",
           "check_loadable", "extract_quantities", "import_ipex", "int8_module_entries", "ipex_unavailable_reason",
           "load_quantities", "patch_qconf", "patch_qconf_file", "quantize", "read_qconf", "save_quantities",
           "validate_quantities"]

"""pt2q: graph-mode quantization for PyTorch 2 (torch.export + torchao PT2E) on Intel CPU, XPU and Gaudi."""
import logging as _logging

# torchao logs a line per optional CUDA extension it cannot load on a CPU build: noise for our users.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

from . import isa  # noqa: E402,F401 - pt2q.isa.detect(): what this CPU's int8/bf16 kernels can do
# Before the api import: importing the submodule pt2q.smooth_quant binds that name to the module, and the
# api import below rebinds it to the function pt2q.smooth_quant().
from .smooth_quant import SmoothQuantConfig  # noqa: E402
from .api import (calibrate, convert, count_quantized_layers, load, measure, prepare, prepare_qat, quantize, save,  # noqa: E402
                  smooth_quant)
from .measurement import Measurement  # noqa: E402
from .capture import capture  # noqa: E402
from .config import (AWQConfig, AutoRoundConfig, DynamicQuantConfig, FP8Config, GPTQConfig, RTNConfig, StaticQuantConfig,  # noqa: E402
                     TEQConfig, WeightOnlyQuantConfig)
from .errors import (BackendUnavailable, CalibrationError, CaptureError, ConfigError, DeviceError,  # noqa: E402
                     MeasurementError, NotPreparedError, Pt2qError, WeightTransferError)
from .quantizers import FP8Quantizer, X86Quantizer, XPUQuantizer  # noqa: E402
from .weight_transfer import transfer_quantized_weights  # noqa: E402
from .device import target_device  # noqa: E402
from .targets import compile  # noqa: E402,A001 - pt2q.compile(qmodel, example_inputs, backend="auto")
# pt2q.autotune is the function (importing the submodule first binds the name to the module).
from .autotune import TuningResult, autotune, get_int8_tuning_config, get_woq_tuning_config  # noqa: E402
from .config import TuningConfig  # noqa: E402
from .config import HQQConfig  # noqa: E402
from .errors import CoverageError, TuningError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AWQConfig", "AutoRoundConfig", "BackendUnavailable", "DeviceError", "FP8Config", "FP8Quantizer", "GPTQConfig", "Measurement",
    "MeasurementError", "measure", "RTNConfig", "CalibrationError", "CaptureError", "ConfigError", "DynamicQuantConfig", "NotPreparedError", "Pt2qError",
    "SmoothQuantConfig", "StaticQuantConfig", "TEQConfig", "WeightOnlyQuantConfig", "X86Quantizer", "XPUQuantizer", "calibrate", "capture", "convert",
    "count_quantized_layers", "load", "prepare", "prepare_qat", "quantize", "save", "smooth_quant", "transfer_quantized_weights",
    "WeightTransferError", "compile", "target_device", "HQQConfig",
    "CoverageError", "TuningConfig", "TuningError", "TuningResult", "autotune", "get_int8_tuning_config", "get_woq_tuning_config",
]


def __getattr__(name: str):
    if name == "debug":  # the graph dump tool, imported on first use only
        import importlib

        return importlib.import_module(".debug", __name__)
    raise AttributeError(f"module 'pt2q' has no attribute {name!r}")

"""Exceptions raised by pt2q. Each message names the node, argument or field at fault and what to do."""


class Pt2qError(Exception):
    """Base class of every error pt2q raises on purpose."""


class CaptureError(Pt2qError):
    """`torch.export` could not capture the model. `.export_error` holds the original exception."""

    def __init__(self, message: str, export_error: BaseException | None = None):
        super().__init__(message)
        self.export_error = export_error


class ConfigError(Pt2qError, ValueError):
    """A configuration field or rule is unknown or has an invalid value."""


class CalibrationError(Pt2qError, ValueError):
    """Calibration data is missing, empty, non-finite, or does not fit the captured graph."""


class NotPreparedError(Pt2qError, TypeError):
    """`convert` was given a model that `prepare` did not produce (it carries no observers)."""


class WeightTransferError(Pt2qError, ValueError):
    """The quantized weights of one graph cannot be carried into the other (the message names the layers)."""


class DeviceError(Pt2qError, ValueError):
    """An unknown target device name (the message lists the valid ones)."""


class BackendUnavailable(Pt2qError, RuntimeError):
    """A backend's hardware or library is not present here (no XPU device, no IPEX, no Habana stack);
    the message says what is missing and which backend runs instead."""


class MeasurementError(Pt2qError, ValueError):
    """An FP8 measurement file cannot be used: unreadable, truncated, or taken on another model (the
    message names the first node whose name or shape differs)."""


class TuningError(Pt2qError, RuntimeError):
    """`pt2q.autotune` cannot score a model: the user's `eval_fn` raised, or returned something that is not
    one finite number. The message names the trial and its config (or the fp32 baseline); `.trial` is the
    trial number (None for the baseline) and the eval_fn's own exception is chained."""

    def __init__(self, message: str, trial: int | None = None):
        super().__init__(message)
        self.trial = trial


class CoverageError(Pt2qError, RuntimeError):
    """`require_full_coverage=True` and a weighted op was left in float without the config asking for it;
    the message names the first one, `.report` is the whole `pt2q.coverage.CoverageReport`."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report

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

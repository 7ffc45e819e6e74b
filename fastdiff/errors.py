"""Exception types raised by fastdiff."""


class FastdiffError(Exception):
    """Base class for fastdiff errors that are not plain argument errors."""


class OptionError(ValueError):
    """A bad value for one named option (`option`: the parameter's name, e.g. "num_steps" or "eta"), so that a
    caller with its own names for them (the CLI's flags) can say which of its arguments was wrong."""

    def __init__(self, message: str, *, option: str) -> None:
        super().__init__(message)
        self.option = option


class CheckpointError(FastdiffError):
    """A checkpoint, ONNX file or engine exists but cannot be read (corrupt, truncated, wrong content)."""


class StaleWeightsError(FastdiffError):
    """Weights changed in a way a graph, compiled loop or exported model built from them cannot follow."""


class OutputError(FastdiffError, OSError):
    """An output file could not be written (disk full, I/O error); the message names the file.

    Also an OSError, so callers that handle failed writes as OSError keep working.
    """


class BackendUnavailableError(FastdiffError):
    """A backend was requested explicitly but cannot run on this machine."""


class NonFiniteError(FastdiffError):
    """Sampling produced NaN or inf; `step` is the first step after which it was seen."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def missing_extra(package: str, extra: str) -> ImportError:
    """The ImportError raised when an optional dependency is absent, naming the extra to install."""
    return ImportError(f'{package} is not installed; install it with: pip install "fastdiff[{extra}]"')

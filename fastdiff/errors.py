"""Exception types raised by fastdiff."""


class FastdiffError(Exception):
    """Base class for fastdiff errors that are not plain argument errors."""


class CheckpointError(FastdiffError):
    """A checkpoint, ONNX file or engine exists but cannot be read (corrupt, truncated, wrong content)."""


class BackendUnavailableError(FastdiffError):
    """A backend was requested explicitly but cannot run on this machine."""


def missing_extra(package: str, extra: str) -> ImportError:
    """The ImportError raised when an optional dependency is absent, naming the extra to install."""
    return ImportError(f'{package} is not installed; install it with: pip install "fastdiff[{extra}]"')

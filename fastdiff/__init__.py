"""fastdiff: fast diffusion-model sampling."""

from fastdiff.errors import CheckpointError, FastdiffError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "FastdiffError", "__version__"]

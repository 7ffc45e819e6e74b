"""fastdiff: fast diffusion-model sampling.

Optional dependencies (diffusers, onnxruntime, openvino, tensorrt) are imported only when a feature needs them;
so are the modules of sharded sampling and of the diffusers adapters (`_LAZY`), which most programs never use.
"""

import importlib
from typing import TYPE_CHECKING, Any

from fastdiff.accelerate import AccelerationReport, as_denoiser, report
from fastdiff.accelerate import accelerate as accelerate
from fastdiff.engine import SamplingEngine
from fastdiff.engine.weights import update_weights
from fastdiff.errors import (
    BackendUnavailableError,
    CheckpointError,
    FastdiffError,
    NonFiniteError,
    StaleWeightsError,
)
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.pretrained import Pretrained, load_checkpoint, load_pretrained
from fastdiff.samplers import DDIMSampler, DDPMSampler, StepTable, ddim_invert, inpaint, sample, sdedit
from fastdiff.schedule import NoiseSchedule

if TYPE_CHECKING:
    from fastdiff.distributed import ShardError, merge, sample_to_dir
    from fastdiff.integrations.diffusers import accelerate_pipeline, from_diffusers_scheduler

__version__ = "0.1.0"

# Public names imported on first use, by module.
_LAZY = {
    "ShardError": "fastdiff.distributed",
    "merge": "fastdiff.distributed",
    "sample_to_dir": "fastdiff.distributed",
    "accelerate_pipeline": "fastdiff.integrations.diffusers",
    "from_diffusers_scheduler": "fastdiff.integrations.diffusers",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AccelerationReport",
    "BackendUnavailableError",
    "CheckpointError",
    "DDIMSampler",
    "DDPMSampler",
    "FastdiffError",
    "MLPDenoiser",
    "NoiseSchedule",
    "NonFiniteError",
    "Pretrained",
    "SamplingEngine",
    "ShardError",
    "StaleWeightsError",
    "StepTable",
    "UNet",
    "UNetConfig",
    "__version__",
    "accelerate",
    "accelerate_pipeline",
    "as_denoiser",
    "ddim_invert",
    "from_diffusers_scheduler",
    "inpaint",
    "load_checkpoint",
    "load_pretrained",
    "merge",
    "report",
    "sample",
    "sample_to_dir",
    "sdedit",
    "update_weights",
]

"""fastdiff: fast diffusion-model sampling.

Optional dependencies (triton, diffusers, onnxruntime, tensorrt) are imported only when a feature needs them.
"""

from fastdiff.accelerate import AccelerationReport, as_denoiser, report
from fastdiff.accelerate import accelerate as accelerate
from fastdiff.distributed import ShardError, merge, sample_to_dir
from fastdiff.engine import SamplingEngine
from fastdiff.errors import (
    BackendUnavailableError,
    CheckpointError,
    FastdiffError,
    NonFiniteError,
    StaleWeightsError,
)
from fastdiff.integrations.diffusers import accelerate_pipeline, from_diffusers_scheduler
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.pretrained import Pretrained, load_checkpoint, load_pretrained
from fastdiff.samplers import DDIMSampler, DDPMSampler, StepTable, ddim_invert, inpaint, sample, sdedit
from fastdiff.schedule import NoiseSchedule
from fastdiff.weights import update_weights

__version__ = "0.1.0"

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

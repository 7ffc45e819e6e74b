"""fastdiff: fast diffusion-model sampling."""

from fastdiff.errors import CheckpointError, FastdiffError
from fastdiff.integrations.diffusers import from_diffusers_scheduler
from fastdiff.samplers import DDIMSampler, DDPMSampler, StepTable, ddim_invert, inpaint, sample, sdedit
from fastdiff.schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DDIMSampler",
    "DDPMSampler",
    "FastdiffError",
    "NoiseSchedule",
    "StepTable",
    "__version__",
    "ddim_invert",
    "from_diffusers_scheduler",
    "inpaint",
    "sample",
    "sdedit",
]

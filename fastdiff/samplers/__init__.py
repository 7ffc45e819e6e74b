"""Samplers as StepTables, one module per family, and the registry that names them.

Importing this package registers every family (`SAMPLERS`, `DIFFUSERS_BUILDERS`). The loop and the guidance
helpers live in `fastdiff.loop` and `fastdiff.guidance`; they are re-exported here for existing callers.
"""

from fastdiff.guidance import batch_conds, guidance_conds, null_class_cond
from fastdiff.loop import (
    Generator,
    callback_info,
    check_model_output,
    check_shape,
    check_x,
    ddim_invert,
    infer_device,
    inpaint,
    randn,
    run_table,
    sample,
    sdedit,
)
from fastdiff.samplers.base import PREDICTION_TYPES, Sampler
from fastdiff.samplers.ddim import DDIMSampler
from fastdiff.samplers.ddpm import DDPMSampler
from fastdiff.samplers.dpm_solver import DPMSolverMultistepSampler
from fastdiff.samplers.euler import EulerAncestralSampler, EulerSampler
from fastdiff.samplers.flow import FlowMatchEulerSampler
from fastdiff.samplers.lcm import LCMSampler
from fastdiff.samplers.registry import (
    DIFFUSERS_BUILDERS,
    SAMPLERS,
    SamplerEntry,
    build_sampler,
    register,
    register_diffusers,
)
from fastdiff.samplers.unipc import UniPCMultistepSampler
from fastdiff.table import TABLE_COLUMNS, StepTable, sampler_table

__all__ = [
    "DIFFUSERS_BUILDERS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TABLE_COLUMNS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "FlowMatchEulerSampler",
    "Generator",
    "LCMSampler",
    "Sampler",
    "SamplerEntry",
    "StepTable",
    "UniPCMultistepSampler",
    "batch_conds",
    "build_sampler",
    "callback_info",
    "check_model_output",
    "check_shape",
    "check_x",
    "ddim_invert",
    "guidance_conds",
    "infer_device",
    "inpaint",
    "null_class_cond",
    "randn",
    "register",
    "register_diffusers",
    "run_table",
    "sample",
    "sampler_table",
    "sdedit",
]

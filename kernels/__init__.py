"""fastdiff.kernels: fused ops, each a validating wrapper with a plain-PyTorch reference twin (`<op>.py`) and its
Triton kernels (`<op>_triton.py`, imported on first Triton use, so `import fastdiff` does not load triton)."""

from fastdiff.kernels.attention import attention, attention_reference
from fastdiff.kernels.backend import available
from fastdiff.kernels.group_norm import group_norm_silu, group_norm_silu_reference
from fastdiff.kernels.sampler_step import TABLE_COLUMNS, sampler_step, sampler_step_reference

__all__ = [
    "TABLE_COLUMNS",
    "attention",
    "attention_reference",
    "available",
    "group_norm_silu",
    "group_norm_silu_reference",
    "sampler_step",
    "sampler_step_reference",
]

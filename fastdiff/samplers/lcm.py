"""Latent consistency model sampling (Luo et al. 2023, Algorithm 1) as a StepTable, with the numbers of diffusers'
LCMScheduler.

Each row evaluates the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with
c_skip = sigma_data^2 / ((t k)^2 + sigma_data^2), c_out = t k / sqrt((t k)^2 + sigma_data^2) (sigma_data = 0.5,
k = timestep_scaling), and re-noises it to the next timestep: x_prev = sqrt(abar_next) f + sqrt(1 - abar_next) z.
The last row returns f itself. The timesteps are a subset of the `original_inference_steps`-step schedule the model
was distilled on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.checks import integral
from fastdiff.samplers.base import PREDICTION_TYPES, Sampler, check_choice, clip_value, prediction_coeffs
from fastdiff.samplers.euler import diffusers_schedule
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import StepTable

SIGMA_DATA = 0.5


def lcm_timesteps(
    num_train_timesteps: int,
    num_steps: int | None,
    original_inference_steps: int,
    strength: float = 1.0,
    timesteps: Sequence[int] | None = None,
) -> np.ndarray:
    """diffusers' LCMScheduler.set_timesteps: `num_steps` evenly chosen from the distillation schedule
    k-1, 2k-1, ... (k = T // original_inference_steps, its first `strength` fraction), in descending order; or the
    custom `timesteps`, of which img2img (`strength` < 1) keeps the last fraction."""
    T = num_train_timesteps
    if isinstance(original_inference_steps, bool) or not 1 <= int(original_inference_steps) <= T:
        raise ValueError(
            f"original_inference_steps must be an int in [1, {T}], got {original_inference_steps!r}"
        )
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        if ts.size < 1 or (ts < 0).any() or ts[0] >= T or (np.diff(ts) >= 0).any():
            raise ValueError(f"timesteps must be descending integers in [0, {T})")
        keep = min(int(ts.size * strength), ts.size)
        return ts[ts.size - keep :].copy()
    k = T // int(original_inference_steps)
    origin = (np.arange(1, int(original_inference_steps * strength) + 1) * k - 1)[::-1]
    steps = integral(num_steps)
    if steps is None or not 1 <= steps <= len(origin):
        raise ValueError(
            f"num_steps must be an int in [1, {len(origin)}] (original_inference_steps x strength = "
            f"{original_inference_steps} x {strength}), got {num_steps!r}"
        )
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)].copy()


def boundary_scalings(timesteps: np.ndarray, timestep_scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) of the consistency function at each timestep."""
    scaled = timesteps.astype(np.float64) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip, c_out


class LCMSampler(Sampler):
    """Multi-step latent consistency sampling (typically 1-8 steps of a distilled model). Options as diffusers'
    LCMScheduler: `original_inference_steps`, `timestep_scaling`, `clip_sample` / `clip_sample_range`, dynamic
    `thresholding` (`dynamic_thresholding_ratio`, `sample_max_value`), custom `timesteps`
    and img2img `strength`."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = 4,
        prediction_type: str = "epsilon",
        *,
        original_inference_steps: int = 50,
        timestep_scaling: float = 10.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not (
            isinstance(timestep_scaling, (int, float))
            and math.isfinite(timestep_scaling)
            and timestep_scaling > 0
        ):
            raise ValueError(f"timestep_scaling must be a positive number, got {timestep_scaling!r}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        ts = lcm_timesteps(
            schedule.num_train_timesteps, num_steps, original_inference_steps, strength, timesteps
        )
        abar_all = schedule.alphas_cumprod.numpy()
        abar = abar_all[ts]
        # Re-noised to the next timestep of the list, and not after the last row (so diffusers' set_alpha_to_one,
        # the final alpha of other schedulers, never matters here).
        abar_next = np.append(abar_all[ts[1:]], 1.0)
        renoise = np.arange(ts.size) < ts.size - 1
        scale = np.where(renoise, np.sqrt(abar_next), 1.0)
        a, b, p, q = prediction_coeffs(abar, prediction_type)
        c_skip, c_out = boundary_scalings(ts, timestep_scaling)
        self.c_skip, self.c_out = c_skip, c_out
        self.table = StepTable.from_columns(
            torch.from_numpy(ts),
            kind="lcm",
            clip=None if thresholding else clip_value(clip_sample, clip_sample_range),
            threshold=(dynamic_thresholding_ratio, sample_max_value) if thresholding else None,
            a=a,
            b=b,
            p=p,
            q=q,
            c=scale * c_out,
            e=scale * c_skip,
            s=np.where(renoise, np.sqrt(1.0 - abar_next), 0.0),
        )

    def __repr__(self) -> str:
        return f"LCMSampler(num_steps={self.num_steps}, prediction_type={self.prediction_type!r})"


def from_diffusers_lcm(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    original_inference_steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    strength: float = 1.0,
) -> LCMSampler:
    """The LCMSampler of a diffusers LCMScheduler (or its config), with `set_timesteps`' own arguments."""
    schedule, config = diffusers_schedule(scheduler_or_config, "LCMScheduler")
    if num_steps is None and timesteps is None:
        raise ValueError("LCMScheduler: run 'set_timesteps' before 'step'")
    return LCMSampler(
        schedule,
        None if timesteps is not None else num_steps,
        config.get("prediction_type", "epsilon"),
        original_inference_steps=int(original_inference_steps or config.get("original_inference_steps", 50)),
        timestep_scaling=float(config.get("timestep_scaling", 10.0)),
        clip_sample=bool(config.get("clip_sample", False)),
        clip_sample_range=float(config.get("clip_sample_range", 1.0)),
        thresholding=bool(config.get("thresholding", False)),
        dynamic_thresholding_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
        sample_max_value=float(config.get("sample_max_value", 1.0)),
        timesteps=timesteps,
        strength=strength,
    )


register("lcm", LCMSampler)
register_diffusers("LCMScheduler", from_diffusers_lcm)

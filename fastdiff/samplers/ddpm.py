"""DDPM: ancestral sampling (Ho et al. 2020, Algorithm 2) as a StepTable, with the numbers of diffusers' DDPMScheduler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.samplers.base import (
    PREDICTION_TYPES,
    Sampler,
    check_choice,
    clip_value,
    prediction_coeffs,
    sampler_timesteps,
    threshold_value,
)
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import StepTable

VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED = ("learned", "learned_range")


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), any number of steps.

    With fewer steps than the schedule, the betas are respaced as in improved DDPM (Nichol & Dhariwal 2021):
    beta'_i = 1 - abar(t_i) / abar(t_{i+1}). `variance`: `fixed_small` (posterior beta tilde) or `fixed_large`
    (beta), the same through their logs (`fixed_small_log`, `fixed_large_log`: std = exp(log(var) / 2)), or learned
    by the model, which then returns 2C channels: `learned` (the variance itself: std = sqrt(v)) or `learned_range`
    (improved DDPM's interpolation between the two fixed log variances, v in [-1, 1]). `thresholding` is Imagen's
    dynamic thresholding of x0 (instead of clipping). `timesteps` replaces the spaced ones (strictly descending).
    Numbers match diffusers' DDPMScheduler, except `fixed_large_log`, for which diffusers returns NaN (it takes the
    square root of log(beta) < 0) and we use the GLIDE meaning its comment names: std = exp(log(beta) / 2).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = None,
        variance: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        *,
        spacing: str = "leading",
        steps_offset: int = 0,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timesteps: Sequence[int] | torch.Tensor | None = None,
    ):
        check_choice("variance", variance, VARIANCES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.schedule = schedule
        self.variance = variance
        self.prediction_type = prediction_type
        ts = sampler_timesteps(schedule, num_steps, spacing, steps_offset, timesteps)
        abar_all = schedule.alphas_cumprod.numpy()
        abar = abar_all[ts.numpy()]
        abar_prev = np.append(abar[1:], 1.0)
        beta = 1.0 - abar / abar_prev
        a, b, p, q = prediction_coeffs(abar, prediction_type)
        c = np.sqrt(abar_prev) * beta / (1.0 - abar)
        e = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
        small = np.maximum((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
        noisy = ts.numpy() > 0
        lv = {}
        if variance in LEARNED:
            std = np.ones_like(abar)  # sigma_v carries it
            if variance == "learned":  # sigma_v = exp(0.5 * log v) = sqrt(v)
                lv = {"lv1": np.ones_like(abar)}
            else:  # log var = frac * log(beta) + (1 - frac) * log(small), frac = (v + 1) / 2
                min_log, max_log = np.log(small), np.log(beta)
                lv = {"lv0": (max_log + min_log) / 2, "lv1": (max_log - min_log) / 2}
        elif variance == "fixed_small":
            std = np.sqrt(small)
        elif variance == "fixed_small_log":
            std = np.exp(0.5 * np.log(small))
        elif variance == "fixed_large":
            std = np.sqrt(beta)
        else:
            std = np.exp(0.5 * np.log(beta))
        threshold = threshold_value(thresholding, dynamic_thresholding_ratio, sample_max_value)
        self.table = StepTable.from_columns(
            ts,
            kind=f"ddpm-{variance}",
            clip=None if threshold else clip_value(clip_sample, clip_sample_range),
            threshold=threshold,
            learned_variance=variance if variance in LEARNED else None,
            s=np.where(noisy, std, 0.0),
            **{name: np.where(noisy, col, 0.0) for name, col in lv.items()},
            a=a,
            b=b,
            p=p,
            q=q,
            c=c,
            e=e,
        )

    def __repr__(self) -> str:
        return (
            f"DDPMSampler(num_steps={self.num_steps}, variance={self.variance!r}, "
            f"prediction_type={self.prediction_type!r})"
        )


def diffusers_sampler_kwargs(config: Any) -> dict[str, Any]:
    """The options shared by diffusers' DDPMScheduler and DDIMScheduler configs, as sampler keywords."""
    return {
        "prediction_type": config.get("prediction_type", "epsilon"),
        "clip_sample": bool(config.get("clip_sample", True)),
        "clip_sample_range": float(config.get("clip_sample_range", 1.0)),
        "spacing": config.get("timestep_spacing", "leading"),
        "steps_offset": int(config.get("steps_offset", 0)),
        "thresholding": bool(config.get("thresholding", False)),
        "dynamic_thresholding_ratio": float(config.get("dynamic_thresholding_ratio", 0.995)),
        "sample_max_value": float(config.get("sample_max_value", 1.0)),
    }


def from_diffusers_ddpm(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    eta: float = 0.0,
    timesteps: Sequence[int] | torch.Tensor | None = None,
) -> DDPMSampler:
    """The DDPMSampler of a diffusers DDPMScheduler (or its config) at `num_steps` steps, or at custom `timesteps`
    (diffusers' `set_timesteps(timesteps=[...])`; a scheduler on which that was called gives its own). `eta` must
    be 0: it is accepted so that callers can pass DDIM's step argument to any scheduler."""
    if eta != 0:
        raise ValueError(f"eta={eta!r}: DDPM has no eta (it is DDIM's stochasticity)")
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if timesteps is None and getattr(scheduler_or_config, "custom_timesteps", False):
        timesteps = scheduler_or_config.timesteps.cpu()
    if timesteps is not None:
        num_steps = None
    return DDPMSampler(
        NoiseSchedule.from_diffusers(scheduler_or_config),
        num_steps,
        variance=config.get("variance_type", "fixed_small"),
        timesteps=timesteps,
        **diffusers_sampler_kwargs(config),
    )


register("ddpm", DDPMSampler)
register_diffusers("DDPMScheduler", from_diffusers_ddpm)

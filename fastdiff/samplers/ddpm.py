"""DDPM: ancestral sampling (Ho et al. 2020, Algorithm 2) as a StepTable, with the numbers of diffusers' DDPMScheduler."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastdiff.samplers.base import PREDICTION_TYPES, Sampler, check_choice, clip_value, prediction_coeffs
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import StepTable

VARIANCES = ("fixed_small", "fixed_large")


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), any number of steps.

    With fewer steps than the schedule, the betas are respaced as in improved DDPM (Nichol & Dhariwal 2021):
    beta'_i = 1 - abar(t_i) / abar(t_{i+1}). `variance` is `fixed_small` (posterior beta tilde) or `fixed_large`
    (beta). Numbers match diffusers' DDPMScheduler.
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
    ):
        check_choice("variance", variance, VARIANCES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.schedule = schedule
        self.variance = variance
        self.prediction_type = prediction_type
        n = schedule.num_train_timesteps if num_steps is None else num_steps
        ts = schedule.timesteps(n, spacing, steps_offset)
        abar_all = schedule.alphas_cumprod.numpy()
        abar = abar_all[ts.numpy()]
        abar_prev = np.append(abar[1:], 1.0)
        beta = 1.0 - abar / abar_prev
        a, b, p, q = prediction_coeffs(abar, prediction_type)
        c = np.sqrt(abar_prev) * beta / (1.0 - abar)
        e = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
        if variance == "fixed_small":
            var = np.maximum((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
        else:
            var = beta
        s = np.where(ts.numpy() > 0, np.sqrt(var), 0.0)
        self.table = StepTable.from_columns(
            ts,
            kind=f"ddpm-{variance}",
            clip=clip_value(clip_sample, clip_sample_range),
            a=a,
            b=b,
            p=p,
            q=q,
            c=c,
            e=e,
            s=s,
        )

    def __repr__(self) -> str:
        return (
            f"DDPMSampler(num_steps={self.num_steps}, variance={self.variance!r}, "
            f"prediction_type={self.prediction_type!r})"
        )


def diffusers_sampler_kwargs(config: Any) -> dict[str, Any]:
    """The options shared by diffusers' DDPMScheduler and DDIMScheduler configs, as sampler keywords."""
    if config.get("thresholding", False):
        raise ValueError(
            "schedulers with thresholding=True are not supported (dynamic thresholding is not a table)"
        )
    return {
        "prediction_type": config.get("prediction_type", "epsilon"),
        "clip_sample": bool(config.get("clip_sample", True)),
        "clip_sample_range": float(config.get("clip_sample_range", 1.0)),
        "spacing": config.get("timestep_spacing", "leading"),
        "steps_offset": int(config.get("steps_offset", 0)),
    }


def from_diffusers_ddpm(scheduler_or_config: Any, num_steps: int, *, eta: float = 0.0) -> DDPMSampler:
    """The DDPMSampler of a diffusers DDPMScheduler (or its config) at `num_steps` steps (`eta` must be 0: it is
    accepted so that callers can pass DDIM's step argument to any scheduler)."""
    if eta != 0:
        raise ValueError(f"eta={eta!r}: DDPM has no eta (it is DDIM's stochasticity)")
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise ValueError(f"variance_type {variance!r} is not supported; use one of {VARIANCES}")
    schedule = NoiseSchedule.from_diffusers(scheduler_or_config)
    return DDPMSampler(schedule, num_steps, variance=variance, **diffusers_sampler_kwargs(config))


register("ddpm", DDPMSampler)
register_diffusers("DDPMScheduler", from_diffusers_ddpm)

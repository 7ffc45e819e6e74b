"""Adapters between fastdiff and diffusers. diffusers itself is imported only inside the functions that need it."""

from __future__ import annotations

from typing import Any

from fastdiff.samplers import DDIMSampler, DDPMSampler, Sampler
from fastdiff.schedule import NoiseSchedule


def _sampler_kwargs(config: Any) -> dict[str, Any]:
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


def from_diffusers_scheduler(scheduler: Any, num_steps: int, *, eta: float = 0.0) -> Sampler:
    """The fastdiff sampler with the numbers of a diffusers DDPMScheduler or DDIMScheduler at `num_steps` steps.

    `eta` is DDIM's stochasticity (diffusers passes it to `step()`, so it is not part of the scheduler's config).
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or name not in ("DDPMScheduler", "DDIMScheduler"):
        raise TypeError(f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler, got {name}")
    schedule = NoiseSchedule.from_diffusers(scheduler)
    kwargs = _sampler_kwargs(config)
    if name == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type {variance!r} is not supported; use fixed_small or fixed_large")
        return DDPMSampler(schedule, num_steps, variance=variance, **kwargs)
    return DDIMSampler(
        schedule, num_steps, eta=eta, set_alpha_to_one=bool(config.get("set_alpha_to_one", True)), **kwargs
    )

"""DDIM (Song et al. 2021) and its inversion as StepTables, with the numbers of diffusers' DDIMScheduler."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastdiff.samplers.base import (
    PREDICTION_TYPES,
    Sampler,
    check_choice,
    clip_value,
    prediction_coeffs,
    threshold_value,
)
from fastdiff.samplers.ddpm import diffusers_sampler_kwargs
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import StepTable


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12) with stochasticity `eta` (0: deterministic, 1: DDPM-like).

    Numbers match diffusers' DDIMScheduler, including its previous timestep t - T // num_steps for every spacing
    and `set_alpha_to_one` for the final step. `thresholding` is Imagen's dynamic thresholding of x0 (instead of
    clipping).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        *,
        steps_offset: int = 0,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.schedule = schedule
        self.eta = float(eta)
        self.prediction_type = prediction_type
        ts = schedule.timesteps(num_steps, spacing, steps_offset)
        abar_all = schedule.alphas_cumprod.numpy()
        final = 1.0 if set_alpha_to_one else abar_all[0]
        prev_t = ts.numpy() - schedule.num_train_timesteps // num_steps
        abar = abar_all[ts.numpy()]
        self._abar_prev = np.where(prev_t >= 0, abar_all[np.maximum(prev_t, 0)], final)
        a, b, p, q = prediction_coeffs(abar, prediction_type)
        var = (1.0 - self._abar_prev) / (1.0 - abar) * (1.0 - abar / self._abar_prev)
        std = self.eta * np.sqrt(var)
        if not np.abs(std).max() <= np.finfo(np.float32).max:
            raise ValueError(
                f"eta={eta!r} is too large: the noise scale overflows float32 (eta is normally in [0, 1])"
            )
        threshold = threshold_value(thresholding, dynamic_thresholding_ratio, sample_max_value)
        self.table = StepTable.from_columns(
            ts,
            kind="ddim",
            clip=None if threshold else clip_value(clip_sample, clip_sample_range),
            threshold=threshold,
            a=a,
            b=b,
            p=p,
            q=q,
            c=np.sqrt(self._abar_prev),
            d=np.sqrt(np.maximum(1.0 - self._abar_prev - std**2, 0.0)),
            s=std,
        )

    def __repr__(self) -> str:
        return f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, prediction_type={self.prediction_type!r})"

    def inverse_table(self) -> StepTable:
        """The eta = 0 inversion table: each decode step run backwards, x0 -> x_T.

        Inversion step k goes from the level the decode's step n-1-k lands on to that step's level, calling the
        model at the higher level's timestep (the usual approximation eps(x_t) ~ eps(x_{t-1})).
        """
        if self.eta != 0:
            raise ValueError(f"DDIM inversion needs a deterministic sampler (eta=0), got eta={self.eta}")
        abar_all = self.schedule.alphas_cumprod.numpy()
        ts = self.table.timesteps.flip(0)
        abar_from = self._abar_prev[::-1].copy()
        abar_to = abar_all[ts.numpy()]
        a, b, p, q = prediction_coeffs(abar_from, self.prediction_type)
        return StepTable.from_columns(
            ts, kind="ddim-inverse", a=a, b=b, p=p, q=q, c=np.sqrt(abar_to), d=np.sqrt(1.0 - abar_to)
        )


def from_diffusers_ddim(scheduler_or_config: Any, num_steps: int, *, eta: float = 0.0) -> DDIMSampler:
    """The DDIMSampler of a diffusers DDIMScheduler (or its config) at `num_steps` steps; `eta` is what diffusers
    passes to `step()` (not part of the config)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    return DDIMSampler(
        NoiseSchedule.from_diffusers(scheduler_or_config),
        num_steps,
        eta=eta,
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        **diffusers_sampler_kwargs(config),
    )


register("ddim", DDIMSampler)
register_diffusers("DDIMScheduler", from_diffusers_ddim)

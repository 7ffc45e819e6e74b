"""Flow-matching Euler (rectified flow: SD3, Flux) as a StepTable, with the numbers of diffusers'
FlowMatchEulerDiscreteScheduler.

The state is x_sigma = (1 - sigma) x0 + sigma z and the model predicts the velocity m = z - x0 (prediction type
"flow"), so x0 = x - sigma m and eps = x + (1 - sigma) m. A row is Euler's step along the velocity,
x_prev = x + (sigma_next - sigma) m = x + (sigma_next - sigma) (eps - x0); with `stochastic` sampling (diffusers'
stochastic_sampling) it is instead x_prev = (1 - sigma_next) x0 + sigma_next z.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.samplers.base import Sampler
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import FlowSchedule
from fastdiff.table import StepTable


class FlowMatchEulerSampler(Sampler):
    """Euler sampling of a flow-matching model on a `FlowSchedule` (its shift, or the dynamic shift `mu`; custom
    `sigmas` / `timesteps` as diffusers' `set_timesteps` takes them), deterministic or `stochastic`."""

    prediction_type = "flow"

    def __init__(
        self,
        schedule: FlowSchedule,
        num_steps: int | None = 28,
        *,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        stochastic: bool = False,
    ):
        if not isinstance(schedule, FlowSchedule):
            raise TypeError(
                f"schedule must be a FlowSchedule (flow matching), got {type(schedule).__name__}; "
                "noise-prediction models sample with euler, ddim, dpmpp-2m, ..."
            )
        self.schedule = schedule
        self.stochastic = bool(stochastic)
        ts, sig = schedule.sigmas(num_steps, mu=mu, sigmas=sigmas, timesteps=timesteps)
        sigma, nxt = sig[:-1], sig[1:]
        self.sigmas = sig
        one = np.ones_like(sigma)
        if self.stochastic:
            update = {"c": 1.0 - nxt, "s": nxt}
        else:
            dt = nxt - sigma
            update = {"c": -dt, "d": dt, "e": one}
        self.table = StepTable.from_columns(
            torch.from_numpy(ts.copy()), kind="flow-euler", a=one, b=-sigma, p=one, q=1.0 - sigma, **update
        )

    def __repr__(self) -> str:
        return f"FlowMatchEulerSampler(num_steps={self.num_steps}, stochastic={self.stochastic})"

    def noised(self, x0: torch.Tensor, row: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 at row `row`'s noise level: (1 - sigma) x0 + sigma noise."""
        return self.schedule.q_sample(x0, float(self.sigmas[row]), noise)


def from_diffusers_flow_match(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
    timesteps: Sequence[float] | None = None,
) -> FlowMatchEulerSampler:
    """The FlowMatchEulerSampler of a diffusers FlowMatchEulerDiscreteScheduler (or its config), with
    `set_timesteps`' `mu`, `sigmas` and `timesteps`."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if num_steps is None and sigmas is None and timesteps is None:
        raise ValueError("FlowMatchEulerDiscreteScheduler: run 'set_timesteps' before 'step'")
    return FlowMatchEulerSampler(
        FlowSchedule.from_diffusers(scheduler_or_config),
        num_steps,
        mu=mu,
        sigmas=sigmas,
        timesteps=timesteps,
        stochastic=bool(config.get("stochastic_sampling", False)),
    )


register("flow-euler", FlowMatchEulerSampler)
register_diffusers("FlowMatchEulerDiscreteScheduler", from_diffusers_flow_match)

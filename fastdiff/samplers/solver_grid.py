"""The noise levels of diffusers' multistep solvers (DPMSolverMultistepScheduler, UniPCMultistepScheduler).

Both step in the log-SNR lambda = log(alpha / sigma) between levels given as sigmas: variance-preserving ones
(sigma_t = sqrt((1 - abar_t) / abar_t), alpha = 1 / sqrt(1 + sigma^2), sigma = sigma_t * alpha) or flow-matching
ones (alpha = 1 - sigma). `set_timesteps` computes the levels of the steps in float32, then appends the final level
(0, or the smallest training sigma). This module reproduces those float32 numbers exactly (the timesteps, which
index the model, bit for bit); the solvers then compute their coefficients from them in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff.samplers.base import PREDICTION_TYPES
from fastdiff.schedule import SPACINGS, NoiseSchedule

FINAL_SIGMAS = ("zero", "sigma_min")
# The solvers' prediction types: the table ones plus flow matching's velocity (x0 = x - sigma * m).
SOLVER_PREDICTION_TYPES = (*PREDICTION_TYPES, "flow_prediction")


def train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sqrt((1 - abar_t) / abar_t) per training timestep, in float32 torch arithmetic as diffusers computes it (its
    `** 0.5` is not always numpy's correctly rounded sqrt)."""
    abar = schedule.alphas_cumprod.float()
    return (((1 - abar) / abar) ** 0.5).numpy()


def spaced_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int, last: int
) -> np.ndarray:
    """The solvers' `timestep_spacing` (num_steps + 1 points, the last dropped), up to training timestep `last`."""
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -num_train_timesteps / num_steps).round() - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts.astype(np.int64)


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    """User-given timesteps: a non-empty, strictly descending sequence of ints in [0, T)."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-d sequence of ints, got {timesteps!r}")
    if (np.diff(ts) >= 0).any() or ts.min() < 0 or ts.max() >= num_train_timesteps:
        raise ValueError(
            f"timesteps must be strictly descending ints in [0, {num_train_timesteps}), got {ts.tolist()}"
        )
    return ts.astype(np.int64)


def compensated(x_coef: np.ndarray, other_coef: np.ndarray, share: np.ndarray) -> np.ndarray:
    """`other_coef` adjusted for the float32 rounding of `x_coef`, the coefficient of the state x in the same sum.

    The device applies the table in float32. Where x's coefficient is large (1 / alpha at high noise, alpha_t /
    alpha_s of a noise-prediction step) the sum cancels to something small, and the rounding error of that one
    coefficient times x would dominate it. x is alpha x0 + sigma eps; `share` is how much of x lies along the
    other term's buffer (sigma for an eps term, alpha for an x0 term), so moving the rounding error there leaves
    only the other coefficient's own rounding: the float32 sum is as exact as diffusers' (whose float32
    coefficients correlate that way by construction). The float64 table then differs from the exact coefficients
    by about 1e-8 relative, within float32's rounding.
    """
    return other_coef + (x_coef - x_coef.astype(np.float32).astype(np.float64)) * share


def distinct_order(lam: np.ndarray, newest: int, order: int) -> int:
    """The highest order <= `order` whose levels newest - order + 1 .. newest are distinct: two equal levels
    (duplicate timesteps) have no divided difference, where diffusers divides by zero."""
    while order > 1 and len(set(lam[newest - order + 1 : newest + 1].tolist())) < order:
        order -= 1
    return order


@dataclass(frozen=True)
class SolverGrid:
    """The levels of a solver run: `timesteps[i]` (what the model sees at step i) and `sigmas[i]` for i = 0..n,
    sigmas[n] being the final level; float32 values held in float64. `flow`: alpha = 1 - sigma (else VP)."""

    timesteps: torch.Tensor
    sigmas: np.ndarray
    flow: bool

    @classmethod
    def of(cls, timesteps: np.ndarray, sigmas: np.ndarray, final_sigma: float, flow: bool) -> SolverGrid:
        """The grid as diffusers stores it: int64 timesteps (truncated), sigmas + [final] rounded to float32."""
        full = np.concatenate([np.asarray(sigmas, dtype=np.float64), [final_sigma]]).astype(np.float32)
        return cls(torch.from_numpy(np.asarray(timesteps).astype(np.int64)), full.astype(np.float64), flow)

    @property
    def alpha_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, sigma) of each level: the state is alpha * x0 + sigma * noise."""
        if self.flow:
            return 1.0 - self.sigmas, self.sigmas
        alpha = 1.0 / np.sqrt(self.sigmas**2 + 1.0)
        return alpha, self.sigmas * alpha

    @property
    def lambdas(self) -> np.ndarray:
        """log(alpha / sigma) of each level (+inf at sigma = 0). Consecutive levels within a few float32 steps of
        lambda count as one: karras / lu sigmas end on sigma_min up to rounding, and final_sigmas_type="sigma_min"
        appends it again; that step's length is rounding (diffusers' float32 lambdas make it 0; an SDE step would
        add noise of sqrt(h)), not a step to take."""
        alpha, sigma = self.alpha_sigma
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.log(alpha) - np.log(sigma)
            resolution = 4 * np.spacing(np.abs(lam).astype(np.float32)).astype(np.float64)
        for i in range(len(lam) - 1):
            if np.isfinite(lam[i + 1]) and abs(lam[i + 1] - lam[i]) <= resolution[i]:
                lam[i + 1] = lam[i]
        return lam

    def prediction_columns(self, prediction_type: str) -> dict[str, np.ndarray]:
        """(a, b, p, q) of the steps: x0 = a x + b m, eps = p x + q m for the model output m."""
        alpha, sigma = (v[:-1] for v in self.alpha_sigma)
        one, zero = np.ones_like(alpha), np.zeros_like(alpha)
        if prediction_type == "epsilon":
            a, b, p, q = 1.0 / alpha, compensated(1.0 / alpha, -sigma / alpha, sigma), zero, one
        elif prediction_type == "sample":
            a, b, p, q = zero, one, 1.0 / sigma, compensated(1.0 / sigma, -alpha / sigma, alpha)
        elif prediction_type == "v_prediction":
            a, b, p, q = alpha, -sigma, sigma, alpha
        elif prediction_type == "flow_prediction":
            # diffusers: x0 = x - sigma_t * m with the level's raw sigma; eps follows from x = alpha x0 + sigma eps
            raw = self.sigmas[:-1]
            a, b, p, q = one, -raw, (1.0 - alpha) / sigma, alpha * raw / sigma
        else:
            raise ValueError(
                f"prediction_type must be one of {SOLVER_PREDICTION_TYPES}, got {prediction_type!r}"
            )
        return {"a": a, "b": b, "p": p, "q": q}

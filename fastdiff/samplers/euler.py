"""Euler and Euler ancestral (Karras et al. 2022, Algorithm 2; k-diffusion's sample_euler / sample_euler_ancestral)
as StepTables, with the numbers of diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.

The state is sigma-space x = x0 + sigma * eps (the schedule's x_t divided by sqrt(abar_t)); the model sees
k_in * x with k_in = 1 / sqrt(sigma^2 + 1) and x_T = init_sigma * z. Per row, with d = (x - x0) / sigma_hat the
ODE derivative (the table's eps column):

    Euler:            x_prev = x + (sigma_next - sigma_hat) * d + sqrt(sigma_hat^2 - sigma^2) * s_noise * z'
    Euler ancestral:  x_prev = x + (sigma_down - sigma) * d + sigma_up * z

where Euler's churn (s_churn > 0) raises sigma to sigma_hat = sigma (1 + gamma) by adding noise z' before the
update; since x0 is read off the un-churned x, the churn noise reaches x_prev through both terms, which the s
column folds together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.samplers.base import Sampler, check_choice
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.schedule import SIGMA_SPACINGS, SPACINGS, NoiseSchedule, sigma_spacing_of, spaced_sigmas
from fastdiff.table import StepTable

EULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INTERPOLATIONS = ("linear", "log_linear")
FINAL_SIGMAS = ("zero", "sigma_min")
TIMESTEP_TYPES = ("discrete", "continuous")


def sigma_schedule(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    interpolation: str = "linear",
    sigma_spacing: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma: str = "zero",
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' EulerDiscreteScheduler.set_timesteps in float64: fractional model timesteps,
    one per step, and the sigmas, step i going from sigmas[i] to sigmas[i + 1]: num_steps + 1 of them ending in the
    final sigma, except with log_linear interpolation, where diffusers spaces num_steps + 1 sigmas and appends the
    final one after them (so the last step ends at the smallest training sigma). `timesteps` (interpolated) or
    `sigmas` (used as given, the last one included; their timesteps from `schedule.sigma_to_t`) replace the spaced
    ones."""
    check_choice("spacing", spacing, SPACINGS)
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    if sigma_spacing is not None:
        check_choice("sigma_spacing", sigma_spacing, SIGMA_SPACINGS)
    if timesteps is not None and sigmas is not None:
        raise ValueError("give timesteps or sigmas, not both")
    train = schedule.sigmas.numpy()
    T = schedule.num_train_timesteps
    if sigmas is not None:
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if sig.size < 2 or not np.isfinite(sig).all() or (sig < 0).any():
            raise ValueError(
                "sigmas must hold at least two finite non-negative values (the last is the final one)"
            )
        return schedule.sigma_to_t(sig[:-1]), sig
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        if ts.size < 1 or not np.isfinite(ts).all() or (ts < 0).any() or (ts > T - 1).any():
            raise ValueError(f"timesteps must be a non-empty sequence of numbers in [0, {T - 1}]")
        if sigma_spacing is not None:
            raise ValueError(f"custom timesteps cannot be combined with {sigma_spacing} sigmas")
        num_steps = ts.size
    elif spacing == "linspace":  # fractional here, unlike DDIM's rounded linspace
        ts = np.linspace(0.0, T - 1, num_steps)[::-1].copy()
    else:
        ts = schedule.timesteps(num_steps, spacing, steps_offset).numpy().astype(np.float64)
    if interpolation == "linear":
        sig = np.interp(ts, np.arange(T), train)
    else:
        sig = np.exp(np.linspace(math.log(train[-1]), math.log(train[0]), num_steps + 1))
    if sigma_spacing is not None:
        lo = sig[-1] if sigma_min is None else float(sigma_min)
        hi = sig[0] if sigma_max is None else float(sigma_max)
        sig = spaced_sigmas(sigma_spacing, lo, hi, num_steps)
        ts = schedule.sigma_to_t(sig)
    return ts, np.append(sig, train[0] if final_sigma == "sigma_min" else 0.0)


def _x0_coeffs(
    prediction_type: str, sigma: np.ndarray, sigma_hat: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with x0 = a x + b m in sigma space, as diffusers' Euler schedulers read x0 off the model output."""
    one, zero = np.ones_like(sigma), np.zeros_like(sigma)
    if prediction_type == "epsilon":
        return one, -sigma_hat
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma / np.sqrt(sigma**2 + 1.0)
    return zero, one


def euler_columns(
    prediction_type: str, sigma: np.ndarray, sigma_hat: np.ndarray, target: np.ndarray, churn: np.ndarray
) -> dict[str, np.ndarray]:
    """The columns of x_prev = x + (target - sigma_hat) d + churn' z, with d = (x - x0) / sigma_hat the table's eps
    and churn the amplitude of the noise added to x before the update (its share of d is folded into s).

    With epsilon prediction d is the model output itself and the row is x + dt * eps. Otherwise it is the same
    update written as x_prev = (target / sigma_hat) x + (1 - target / sigma_hat) x0: its coefficients come exact
    from float64, where x + dt * d would cancel two terms of the size of x in float32 (x is ~sigma_max z at the
    first steps, the result ~x0).
    """
    a, b = _x0_coeffs(prediction_type, sigma, sigma_hat)
    dt = target - sigma_hat
    columns = {
        "k_in": 1.0 / np.sqrt(sigma**2 + 1.0),
        "a": a,
        "b": b,
        "p": (1.0 - a) / sigma_hat,
        "q": -b / sigma_hat,
        "s": churn * (1.0 + (1.0 - a) * dt / sigma_hat),
    }
    if prediction_type == "epsilon":
        return {**columns, "d": dt, "e": np.ones_like(sigma)}
    return {**columns, "c": -dt / sigma_hat, "e": target / sigma_hat}


def _init_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """diffusers' `init_noise_sigma`: the largest sigma, or sqrt(sigma^2 + 1) with leading spacing."""
    top = float(sigmas.max())
    return top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1.0)


class _SigmaSampler(Sampler):
    """What Euler and Euler ancestral share: the sigma schedule and the way SDEdit / inpainting noise x0."""

    sigmas: np.ndarray

    def noised(self, x0: torch.Tensor, row: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 at row `row`'s noise level in sigma space: x0 + sigma * noise."""
        return x0 + float(self.sigmas[row]) * noise

    def _check_common(self, prediction_type: str, choices: Sequence[str]) -> None:
        check_choice("prediction_type", prediction_type, choices)
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(self.schedule).__name__}")


class EulerSampler(_SigmaSampler):
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022), optionally with churn
    (`s_churn`, `s_tmin`, `s_tmax`, `s_noise`: Algorithm 2's stochastic step, as diffusers' `step()` takes them).

    Every option of diffusers' EulerDiscreteScheduler: `spacing` (its timestep_spacing), `interpolation`,
    `sigma_spacing` ("karras", "exponential", "beta") with `sigma_min` / `sigma_max`, `final_sigma` ("zero",
    "sigma_min"), `timestep_type` ("continuous" with v_prediction: the model's timestep is 0.25 log sigma), and
    custom `timesteps` or `sigmas` in place of num_steps.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = 50,
        prediction_type: str = "epsilon",
        *,
        spacing: str = "linspace",
        steps_offset: int = 0,
        interpolation: str = "linear",
        sigma_spacing: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigma: str = "zero",
        timestep_type: str = "discrete",
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ):
        self.schedule = schedule
        self.prediction_type = prediction_type
        self._check_common(prediction_type, EULER_PREDICTION_TYPES)
        check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(s_tmax, (int, float)) and s_tmax >= 0):
            raise ValueError(f"s_tmax must be a number >= 0, got {s_tmax!r}")
        if num_steps is None and timesteps is None and sigmas is None:
            raise ValueError("give num_steps, timesteps or sigmas")
        ts, sig = sigma_schedule(
            schedule,
            num_steps,
            spacing=spacing,
            steps_offset=steps_offset,
            interpolation=interpolation,
            sigma_spacing=sigma_spacing,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            final_sigma=final_sigma,
            timesteps=timesteps,
            sigmas=sigmas,
        )
        continuous = timestep_type == "continuous" and prediction_type == "v_prediction"
        # continuous timesteps: one step per sigma but the last, even with log_linear's extra one
        n = sig.size - 1 if continuous else ts.size
        sigma, nxt = sig[:n], sig[1 : n + 1]
        if (sigma <= 0).any():
            raise ValueError("every sigma a step starts from must be positive")
        if continuous:
            ts = 0.25 * np.log(sigma)
        gamma = np.where(
            (s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (sig.size - 1), 2**0.5 - 1), 0.0
        )
        sigma_hat = sigma * (gamma + 1.0)
        self.churn = s_noise * np.sqrt(sigma_hat**2 - sigma**2)
        self.sigmas = sig
        self.table = StepTable.from_columns(
            torch.from_numpy(ts.copy()),
            kind="euler",
            init_sigma=_init_sigma(sig, spacing),
            **euler_columns(prediction_type, sigma, sigma_hat, nxt, self.churn),
        )

    def __repr__(self) -> str:
        return f"EulerSampler(num_steps={self.num_steps}, prediction_type={self.prediction_type!r})"


class EulerAncestralSampler(_SigmaSampler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1): an Euler step down to sigma_down, then fresh
    noise of sigma_up, with sigma_up^2 + sigma_down^2 = sigma_next^2. The numbers of diffusers'
    EulerAncestralDiscreteScheduler (epsilon and v_prediction)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = 50,
        prediction_type: str = "epsilon",
        *,
        spacing: str = "linspace",
        steps_offset: int = 0,
        timesteps: Sequence[float] | None = None,
    ):
        self.schedule = schedule
        self.prediction_type = prediction_type
        self._check_common(prediction_type, ("epsilon", "v_prediction"))
        if num_steps is None and timesteps is None:
            raise ValueError("give num_steps or timesteps")
        ts, sig = sigma_schedule(
            schedule, num_steps, spacing=spacing, steps_offset=steps_offset, timesteps=timesteps
        )
        sigma, nxt = sig[:-1], sig[1:]
        # sigma_up^2 = nxt^2 (sigma^2 - nxt^2) / sigma^2 and sigma_down = nxt^2 / sigma, without a rounding below 0
        up = nxt * np.sqrt(sigma**2 - nxt**2) / sigma
        columns = euler_columns(prediction_type, sigma, sigma, nxt**2 / sigma, np.zeros_like(sigma))
        columns["s"] = up
        self.sigmas = sig
        self.table = StepTable.from_columns(
            torch.from_numpy(ts.copy()),
            kind="euler-ancestral",
            init_sigma=_init_sigma(sig, spacing),
            **columns,
        )

    def __repr__(self) -> str:
        return f"EulerAncestralSampler(num_steps={self.num_steps}, prediction_type={self.prediction_type!r})"


def diffusers_schedule(scheduler_or_config: Any, class_name: str) -> tuple[NoiseSchedule, Any]:
    """(the NoiseSchedule, the config) of a diffusers scheduler of `class_name` or of its config: the scheduler's own
    alphas_cumprod (a config is instantiated with diffusers, which defines them, zero-SNR rescaling included)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    scheduler = scheduler_or_config
    if getattr(scheduler, "alphas_cumprod", None) is None:
        import diffusers

        scheduler = getattr(diffusers, class_name).from_config(config)
    kind = str(config.get("beta_schedule", "custom"))
    try:
        return NoiseSchedule(scheduler.alphas_cumprod.double().cpu(), kind=kind), config
    except ValueError as err:  # e.g. zero-SNR rescaling: alphas_cumprod reaching 0, or rising in float32
        raise ValueError(f"{class_name} with this config is not supported: {err}") from None


def _training_timesteps(schedule: NoiseSchedule) -> np.ndarray:
    """Every training timestep, descending: the schedule diffusers' Euler schedulers step through before
    set_timesteps (num_steps=None in the builders below)."""
    return np.arange(schedule.num_train_timesteps - 1, -1, -1, dtype=np.float64)


def from_diffusers_euler(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> EulerSampler:
    """The EulerSampler of a diffusers EulerDiscreteScheduler (or its config): `timesteps` / `sigmas` as
    `set_timesteps` takes them, the churn options as `step()` takes them; num_steps=None is the state before
    set_timesteps."""
    schedule, config = diffusers_schedule(scheduler_or_config, "EulerDiscreteScheduler")
    unset = num_steps is None and timesteps is None and sigmas is None
    return EulerSampler(
        schedule,
        None if timesteps is not None or sigmas is not None or unset else num_steps,
        config.get("prediction_type", "epsilon"),
        spacing=config.get("timestep_spacing", "linspace"),
        steps_offset=int(config.get("steps_offset", 0)),
        interpolation="linear" if unset else config.get("interpolation_type", "linear"),
        sigma_spacing=None if unset else sigma_spacing_of(config),
        sigma_min=config.get("sigma_min"),
        sigma_max=config.get("sigma_max"),
        final_sigma="zero" if unset else config.get("final_sigmas_type", "zero"),
        timestep_type=config.get("timestep_type", "discrete"),
        timesteps=_training_timesteps(schedule) if unset else timesteps,
        sigmas=sigmas,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
    )


def from_diffusers_euler_ancestral(scheduler_or_config: Any, num_steps: int | None) -> EulerAncestralSampler:
    """The EulerAncestralSampler of a diffusers EulerAncestralDiscreteScheduler (or its config); num_steps=None is
    the state before set_timesteps."""
    schedule, config = diffusers_schedule(scheduler_or_config, "EulerAncestralDiscreteScheduler")
    return EulerAncestralSampler(
        schedule,
        num_steps,
        config.get("prediction_type", "epsilon"),
        spacing=config.get("timestep_spacing", "linspace"),
        steps_offset=int(config.get("steps_offset", 0)),
        timesteps=_training_timesteps(schedule) if num_steps is None else None,
    )


# By name (CLI, benchmarks) with leading spacing, as DDIM: linspace and trailing start at t = T - 1, where a cosine
# schedule's sigma is ~2e4 (the shipped digits model's: x0 = x - sigma * eps there amplifies any eps error 2e4x).
register("euler", EulerSampler, spacing="leading")
register("euler-a", EulerAncestralSampler, spacing="leading")
register_diffusers("EulerDiscreteScheduler", from_diffusers_euler)
register_diffusers("EulerAncestralDiscreteScheduler", from_diffusers_euler_ancestral)

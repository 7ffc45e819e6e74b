"""DPM-Solver++ and DPM-Solver, multistep, orders 1-3 (Lu et al. 2022), as StepTables: diffusers'
DPMSolverMultistepScheduler.

Step i goes from level s0 = i to level t = i + 1 in lambda = log(alpha / sigma), h = lambda_t - lambda_s0, with
the data prediction D = x0 (DPM-Solver++, history "x0") or the noise prediction D = eps (DPM-Solver, history "eps")
of this call and the previous one or two (h1, h2). diffusers writes the update with the divided differences
D1 = (D_i - D_{i-1}) / r0 (r0 = h_{i-1} / h) and, at third order, D2; expanded, it is one linear combination

    x_{i+1} = e x + w0 D_i + w1 D_{i-1} + w2 D_{i-2} (+ s z for the SDE variants)

so (e, w0 -> c or d, w1 -> f1, w2 -> f2, s) are the row's columns. The warm-up (first order at the first step,
second order at the second) and `lower_order_final` only choose which order a row gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastdiff.samplers.base import Sampler, check_choice, solver_num_steps
from fastdiff.samplers.euler import diffusers_schedule
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.samplers.solver_grid import (
    FINAL_SIGMAS,
    SOLVER_PREDICTION_TYPES,
    SolverGrid,
    check_custom_timesteps,
    compensated,
    distinct_order,
    spaced_timesteps,
    train_sigmas,
)
from fastdiff.schedule import SPACINGS, FlowSchedule, NoiseSchedule, sigma_spacing_of, spaced_sigmas
from fastdiff.table import StepTable

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
VARIANCE_TYPES = (None, "learned", "learned_range")


def dpm_grid(
    schedule: NoiseSchedule,
    num_steps: int | None,
    *,
    spacing: str,
    steps_offset: int,
    final_sigmas_type: str,
    lambda_min_clipped: float,
    sigmas_spacing: str | None,
    use_lu_lambdas: bool,
    use_flow_sigmas: bool,
    flow_shift: float,
    timesteps: Sequence[int] | None,
) -> SolverGrid:
    """The levels of DPMSolverMultistepScheduler.set_timesteps (same float32 numbers, same int64 timesteps)."""
    T = schedule.num_train_timesteps
    sig32 = train_sigmas(schedule)
    log_sigmas = np.log(sig32)
    # Karras / lu timesteps are rounded, except for the cosine schedule (diffusers' squaredcos_cap_v2 exception).
    rounds = schedule.kind not in ("cosine", "squaredcos_cap_v2")
    if timesteps is not None:
        if sigmas_spacing is not None or use_lu_lambdas or use_flow_sigmas:
            raise ValueError(
                "custom timesteps cannot be combined with karras / exponential / beta / lu / flow sigmas"
            )
        ts = check_custom_timesteps(timesteps, T)
        sigmas = np.interp(ts, np.arange(T), sig32)
    elif sigmas_spacing is not None:
        sigmas = spaced_sigmas(sigmas_spacing, float(sig32[0]), float(sig32[-1]), num_steps)
        ts = schedule.sigma_to_t(sigmas, log_sigmas)
        if sigmas_spacing == "karras" and rounds:
            ts = ts.round()
    elif use_lu_lambdas:
        lam_min, lam_max = float(log_sigmas[0]), float(log_sigmas[-1])
        sigmas = np.exp(lam_max + np.linspace(0, 1, num_steps) * (lam_min - lam_max))
        ts = schedule.sigma_to_t(sigmas, log_sigmas)
        if rounds:
            ts = ts.round()
    elif use_flow_sigmas:
        base = np.flip(1.0 - np.linspace(1, 1 / T, num_steps + 1))[:-1].copy()
        sigmas = FlowSchedule(T, flow_shift).sigmas(num_steps, sigmas=base)[1][:-1]
        ts = sigmas * T
    else:
        # lambda_min_clipped: the last usable training timestep (diffusers searches its float32 lambdas)
        abar32 = schedule.alphas_cumprod.float()
        lam32 = (abar32.sqrt().log() - (1 - abar32).sqrt().log()).numpy()
        last = T - int(np.searchsorted(lam32[::-1], lambda_min_clipped))
        ts = spaced_timesteps(T, num_steps, spacing, steps_offset, last)
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
        sigmas = np.interp(ts, np.arange(T), sig32)
    final = float(sig32[0]) if final_sigmas_type == "sigma_min" else 0.0
    return SolverGrid.of(ts, sigmas, final, use_flow_sigmas)


def dpm_orders(
    num_steps: int,
    solver_order: int,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    begin: int,
) -> list[int]:
    """The order of each step as diffusers' step() picks it, warming up from row `begin`."""
    short = lower_order_final and num_steps < 15
    orders = []
    for i in range(num_steps):
        done = i - begin  # steps taken before this one (diffusers' lower_order_nums)
        if solver_order == 1 or done < 1 or (i == num_steps - 1 and (euler_at_final or short or final_zero)):
            orders.append(1)
        elif solver_order == 2 or done < 2 or (i == num_steps - 2 and short):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _expansion(
    algorithm_type: str, solver_type: str, order: int, h: float, alpha_t: float, sigma_t: float
) -> tuple[float, float, float, float]:
    """(g0, g1, g2, s): x_t = e x + g0 D0 + g1 D1 + g2 D2 + s z in diffusers' divided differences D0, D1, D2."""
    sde = algorithm_type.startswith("sde")
    g1 = g2 = 0.0
    if algorithm_type.endswith("++"):  # data prediction: integrates e^{-h} (e^{-2h} for the SDE)
        hh = 2.0 * h if sde else h
        em = math.expm1(-hh)  # -1 at h = inf (the final step to sigma = 0, always first order)
        g0 = -alpha_t * em
        if order == 2 and solver_type == "midpoint":
            g1 = 0.5 * g0
        elif order > 1:  # third order always takes the heun-type D1 term
            g1 = alpha_t * (em / hh + 1.0)
        if order == 3:
            g2 = alpha_t * ((-em - hh) / hh**2 - 0.5) if sde else -alpha_t * ((em + hh) / hh**2 - 0.5)
        s = sigma_t * math.sqrt(max(-em, 0.0)) if sde else 0.0  # a backward step (h < 0) adds no noise
    else:  # noise prediction: integrates e^{h}; the SDE doubles the eps terms
        ep, k = math.expm1(h), (2.0 if sde else 1.0)
        g0 = -k * sigma_t * ep
        if order == 2 and solver_type == "midpoint":
            g1 = 0.5 * g0
        elif order > 1:
            g1 = -k * sigma_t * (ep / h - 1.0)
        if order == 3:
            g2 = -sigma_t * ((ep - h) / h**2 - 0.5)
        s = sigma_t * math.sqrt(max(math.expm1(2.0 * h), 0.0)) if sde else 0.0
    return g0, g1, g2, s


def dpm_columns(
    grid: SolverGrid, orders: Sequence[int], algorithm_type: str, solver_type: str
) -> dict[str, np.ndarray]:
    """The solver columns (e, c or d, f1, f2, s) of each step."""
    n = len(orders)
    alpha, sigma = grid.alpha_sigma
    lam = grid.lambdas
    data = algorithm_type.endswith("++")
    e, w0, w1, w2, s = (np.zeros(n) for _ in range(5))
    for i, order in enumerate(orders):
        h = float(lam[i + 1] - lam[i])
        if h == 0:  # a zero-length step (e.g. karras sigmas ending on sigma_min twice): x stays
            e[i] = 1.0
            continue
        order = distinct_order(lam, i, order)
        e[i] = sigma[i + 1] / sigma[i] if data else alpha[i + 1] / alpha[i]
        if algorithm_type.startswith("sde") and data:
            e[i] *= math.exp(-h)
        g0, g1, g2, s[i] = _expansion(
            algorithm_type, solver_type, order, h, float(alpha[i + 1]), float(sigma[i + 1])
        )
        if order == 1:
            w0[i] = g0
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            w0[i], w1[i] = g0 + g1 / r0, -g1 / r0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), D1_k = (D_k - D_k+1) / r_k
            p = g1 * (1 + r0 / (r0 + r1)) + g2 / (r0 + r1)
            q = -g1 * r0 / (r0 + r1) - g2 / (r0 + r1)
            w0[i], w1[i], w2[i] = g0 + p / r0, -p / r0 + q / r1, -q / r1
    if not data:  # e = alpha_t / alpha_s is large at high noise, against w0 * eps
        w0 = compensated(e, w0, sigma[:-1])
    return {"e": e, "c" if data else "d": w0, "f1": w1, "f2": w2, "s": s}


class DPMSolverMultistepSampler(Sampler):
    """Multistep DPM-Solver++ / DPM-Solver (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"),
    orders 1-3, and their SDE variants: the numbers of diffusers' DPMSolverMultistepScheduler.

    The option names are diffusers' config keys (`spacing` is `timestep_spacing`). `use_karras_sigmas`,
    `use_exponential_sigmas`, `use_beta_sigmas`, `use_lu_lambdas` and `use_flow_sigmas` choose the levels; the model
    is called at diffusers' int64 timesteps. `thresholding` (dynamic, Imagen) needs a data-prediction algorithm.
    `begin_index`: the row a run starts at (img2img), where the warm-up to full order restarts (rows before it
    are first order).
    `variance_type` "learned" / "learned_range": the model returns 2C channels; the variance half is not used.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = 20,
        *,
        algorithm_type: str = "dpmsolver++",
        solver_order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        prediction_type: str = "epsilon",
        spacing: str = "linspace",
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        variance_type: str | None = None,
        timesteps: Sequence[int] | None = None,
        begin_index: int = 0,
    ):
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        check_choice("prediction_type", prediction_type, SOLVER_PREDICTION_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("spacing", spacing, SPACINGS)
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        data = algorithm_type.endswith("++")
        if not data and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type='zero' is not supported for algorithm_type={algorithm_type!r}; use 'sigma_min'"
            )
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError(
                "algorithm_type='sde-dpmsolver' has no third order (diffusers has none): use solver_order <= 2"
            )
        if thresholding and not data:
            raise ValueError(
                "thresholding=True needs a data-prediction algorithm_type ('dpmsolver++' or 'sde-dpmsolver++'): "
                "the noise-prediction history would hold eps recomputed from the thresholded x0"
            )
        if not data and prediction_type == "flow_prediction":
            raise ValueError(
                f"prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++', got {algorithm_type!r}"
            )
        if variance_type is not None and prediction_type != "epsilon":
            raise ValueError("variance_type 'learned' / 'learned_range' goes with prediction_type='epsilon'")
        num_steps = solver_num_steps(schedule, num_steps, timesteps, "timesteps", begin_index)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.algorithm_type = algorithm_type
        self.solver_order = solver_order
        self.stochastic = algorithm_type.startswith("sde")
        self.grid = dpm_grid(
            schedule,
            num_steps,
            spacing=spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped,
            sigmas_spacing=sigma_spacing_of(
                {
                    "use_karras_sigmas": use_karras_sigmas,
                    "use_exponential_sigmas": use_exponential_sigmas,
                    "use_beta_sigmas": use_beta_sigmas,
                }
            ),
            use_lu_lambdas=use_lu_lambdas,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            timesteps=timesteps,
        )
        orders = dpm_orders(
            num_steps,
            solver_order,
            lower_order_final,
            euler_at_final,
            final_sigmas_type == "zero",
            begin_index,
        )
        columns = {
            **self.grid.prediction_columns(prediction_type),
            **dpm_columns(self.grid, orders, algorithm_type, solver_type),
        }
        slots = max(orders) - 1
        self.table = StepTable.from_columns(
            self.grid.timesteps,
            kind=f"{algorithm_type}-{solver_order}",
            threshold=(dynamic_thresholding_ratio, sample_max_value) if thresholding else None,
            history=("x0" if data else "eps") if slots else None,
            history_slots=slots,
            learned_variance=variance_type,
            **columns,
        )

    def __repr__(self) -> str:
        return (
            f"DPMSolverMultistepSampler(num_steps={self.num_steps}, algorithm_type={self.algorithm_type!r}, "
            f"solver_order={self.solver_order}, prediction_type={self.prediction_type!r})"
        )


DIFFUSERS_OPTIONS = (
    "algorithm_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "lambda_min_clipped",
    "prediction_type",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "variance_type",
)


def diffusers_options(config: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The sampler keywords of a diffusers config: the keys in `names` it has, plus `spacing`."""
    options = {name: config[name] for name in names if name in config}
    if "timestep_spacing" in config:
        options["spacing"] = config["timestep_spacing"]
    return options


def from_diffusers_dpm(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    timesteps: Sequence[int] | None = None,
    mu: float | None = None,
    begin_index: int = 0,
) -> DPMSolverMultistepSampler:
    """The DPMSolverMultistepSampler of a diffusers DPMSolverMultistepScheduler (or its config); `timesteps` and
    `mu` are set_timesteps' (mu: the dynamic flow shift, flow_shift = e^mu)."""
    schedule, config = diffusers_schedule(scheduler_or_config, "DPMSolverMultistepScheduler")
    options = diffusers_options(config, DIFFUSERS_OPTIONS)
    if mu is not None:
        if not (
            config.get("use_dynamic_shifting", False)
            and config.get("time_shift_type", "exponential") == "exponential"
        ):
            raise ValueError("mu needs use_dynamic_shifting=True with time_shift_type='exponential'")
        options["flow_shift"] = math.exp(mu)
    return DPMSolverMultistepSampler(
        schedule,
        num_steps,
        timesteps=timesteps,
        begin_index=begin_index,
        **options,
    )


# The names use Stable Diffusion's scheduler spacing ("leading": the first step at T - T // (n + 1)); diffusers'
# class default "linspace" starts at t = T - 1, where a cosine schedule's x0 = (x - sigma eps) / alpha divides by
# alpha ~ 5e-5 and 10-step samples of our digits model come out wrong.
register("dpmpp-2m", DPMSolverMultistepSampler, solver_order=2, spacing="leading")
register("dpmpp-3m", DPMSolverMultistepSampler, solver_order=3, spacing="leading")
register_diffusers("DPMSolverMultistepScheduler", from_diffusers_dpm)

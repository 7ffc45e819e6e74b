"""UniPC (Zhao et al. 2023), multistep predictor-corrector, orders 1-3, bh1 / bh2, as StepTables: diffusers'
UniPCMultistepScheduler.

With m_k the converted model output of call k (x0 when `predict_x0`, else eps; history h1..h3 = m_{i-1..i-3}),
step i first corrects its input (UniC: from the previous step's corrected state xs, with m_i, the history and
solved coefficients rho_c), then predicts the next state from the corrected one (UniP, rho_p). Both are linear in
(xs, m_i, h1, h2, h3), so the corrector is the row's xc columns and the predictor its c / d, e (on xc) and f columns.

The noise-prediction corrector has a term in this call's eps, which the table's xc has no column for. There, xs
holds the corrected state without that term k_i eps_i; the predictor adds it through d (e k_i eps_i) and the next
row's corrector through h1 (where eps_i then is). The states each row returns are diffusers' exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastdiff.samplers.base import Sampler, check_choice, solver_num_steps
from fastdiff.samplers.dpm_solver import diffusers_options
from fastdiff.samplers.euler import diffusers_schedule
from fastdiff.samplers.registry import register, register_diffusers
from fastdiff.samplers.solver_grid import (
    FINAL_SIGMAS,
    SOLVER_PREDICTION_TYPES,
    SolverGrid,
    compensated,
    distinct_order,
    spaced_timesteps,
    train_sigmas,
)
from fastdiff.schedule import SPACINGS, FlowSchedule, NoiseSchedule, sigma_spacing_of, spaced_sigmas
from fastdiff.table import StepTable

SOLVER_TYPES = ("bh1", "bh2")
TIME_SHIFT_TYPES = ("exponential", "linear")


def unipc_grid(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: str,
    steps_offset: int,
    final_sigmas_type: str,
    sigmas_spacing: str | None,
    sigma_min: float | None,
    sigma_max: float | None,
    use_flow_sigmas: bool,
    flow_shift: float,
    mu: float | None,
    time_shift_type: str,
    shift_terminal: float | None,
    sigmas: Sequence[float] | None,
) -> SolverGrid:
    """The levels of UniPCMultistepScheduler.set_timesteps (same float32 numbers, same int64 timesteps)."""
    T = schedule.num_train_timesteps
    ts = spaced_timesteps(T, num_steps, spacing, steps_offset, T)
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
    sig32 = train_sigmas(schedule)
    if sigmas_spacing is not None:
        if sigmas is not None:
            raise ValueError("custom sigmas cannot be combined with karras / exponential / beta sigmas")
        lo = float(sig32[0]) if sigma_min is None else sigma_min
        hi = float(sig32[-1]) if sigma_max is None else sigma_max
        levels = spaced_sigmas(sigmas_spacing, lo, hi, num_steps)
        if sigmas_spacing == "karras" and use_flow_sigmas:
            levels = levels / (levels + 1)
            ts = levels * T
        else:
            ts = schedule.sigma_to_t(levels, np.log(sig32))
            if sigmas_spacing == "karras":
                ts = ts.round()
        final = float(levels[-1])
    elif use_flow_sigmas:
        base = np.linspace(1, 1 / T, num_steps + 1)[:-1] if sigmas is None else np.asarray(sigmas, np.float64)
        flow = FlowSchedule(
            T,
            flow_shift,
            use_dynamic_shifting=mu is not None,
            time_shift_type=time_shift_type,
            shift_terminal=shift_terminal,
        )
        levels = flow.sigmas(len(base), mu=mu, sigmas=base)[1][:-1]
        if abs(levels[0] - 1) < 1e-6:
            levels[0] -= 1e-6
        ts = levels * T
        final = float(levels[-1])
    else:
        if sigmas is not None:
            raise ValueError("custom sigmas need use_flow_sigmas=True (as in diffusers)")
        levels = np.interp(ts, np.arange(T), sig32)
        final = float(sig32[0])
    return SolverGrid.of(ts, levels, final if final_sigmas_type == "sigma_min" else 0.0, use_flow_sigmas)


def unipc_orders(num_steps: int, solver_order: int, lower_order_final: bool, begin: int) -> list[int]:
    """The order of each step's predictor as diffusers' step() picks it, warming up from row `begin`."""
    return [
        min(min(solver_order, num_steps - i) if lower_order_final else solver_order, max(i - begin, 0) + 1)
        for i in range(num_steps)
    ]


def _rhos(
    lam: np.ndarray, s0: int, t: int, order: int, predict_x0: bool, solver_type: str, corrector: bool
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(h_phi_1, B_h, rks, rhos) of one UniP (corrector=False) or UniC update from level s0 to level t using the
    levels s0-1, s0-2, ... (order - 1 of them), as diffusers' multistep_uni_{p,c}_bh_update computes them."""
    h = float(lam[t] - lam[s0])
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    rks = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0])
    if order == 1:
        return h_phi_1, b_h, rks[:-1], np.array([0.5]) if corrector else np.zeros(0)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    if corrector:
        rhos = np.linalg.solve(R, b)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rks[:-1], rhos


def unipc_columns(
    grid: SolverGrid,
    orders: Sequence[int],
    predict_x0: bool,
    solver_type: str,
    disable_corrector: Sequence[int],
    begin: int,
) -> dict[str, np.ndarray]:
    """The corrector (xc_*) and predictor (c or d, e, f*) columns of each step."""
    n = len(orders)
    alpha, sigma = grid.alpha_sigma
    lam = grid.lambdas
    cols = {
        name: np.zeros(n)
        for name in ("xc_s", "xc_0", "xc_1", "xc_2", "xc_3", "c", "d", "e", "f1", "f2", "f3")
    }
    cols["xc_x"] = np.ones(n)
    # k * eps_{i-1}: the previous corrector's term in its own eps, left out of xs (noise prediction only)
    k_prev = 0.0
    for i in range(n):
        k_i = 0.0
        if i > begin and (i - 1) not in disable_corrector and lam[i] != lam[i - 1]:
            order = distinct_order(lam, i - 1, orders[i - 1])
            h_phi_1, b_h, rks, rhos = _rhos(lam, i - 1, i, order, predict_x0, solver_type, True)
            scale = alpha[i] if predict_x0 else sigma[i]
            k = -scale * b_h
            xs = sigma[i] / sigma[i - 1] if predict_x0 else alpha[i] / alpha[i - 1]
            cols["xc_x"][i] = 0.0
            cols["xc_s"][i] = xs
            # D1s = (m_{i-1-j} - m_{i-1}) / rk_j and D1_t = m_i - m_{i-1}, expanded
            cols["xc_1"][i] = -scale * h_phi_1 - k * (rhos[:-1] / rks).sum() - k * rhos[-1] + xs * k_prev
            for j in range(1, order):
                cols[f"xc_{j + 1}"][i] = k * rhos[j - 1] / rks[j - 1]
            if predict_x0:
                cols["xc_0"][i] = k * rhos[-1]
            else:
                k_i = k * rhos[-1]
        k_prev = k_i
        if lam[i + 1] == lam[i]:  # a zero-length step: the state stays
            cols["e"][i], cols["d"][i] = 1.0, k_i
            continue
        order = distinct_order(lam, i, orders[i])
        h_phi_1, b_h, rks, rhos = _rhos(lam, i, i + 1, order, predict_x0, solver_type, False)
        scale = alpha[i + 1] if predict_x0 else sigma[i + 1]
        k = -scale * b_h
        e = sigma[i + 1] / sigma[i] if predict_x0 else alpha[i + 1] / alpha[i]
        cols["e"][i] = e
        w0 = -scale * h_phi_1 - (k * (rhos / rks).sum() if order > 1 else 0.0)
        cols["c" if predict_x0 else "d"][i] = w0 + e * k_i
        for j in range(1, order):
            cols[f"f{j}"][i] = k * rhos[j - 1] / rks[j - 1]
    if (
        not predict_x0
    ):  # e = alpha_t / alpha_s is large at high noise, against d * eps (xc ~ alpha x0 + sigma eps)
        cols["d"] = compensated(cols["e"], cols["d"], sigma[:-1])
    return cols


class UniPCMultistepSampler(Sampler):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), orders 1-3, B(h) "bh1" or
    "bh2", corrector on (except at the steps in `disable_corrector`): the numbers of diffusers'
    UniPCMultistepScheduler.

    Option names are diffusers' config keys (`spacing` is `timestep_spacing`). `predict_x0` chooses the data (x0)
    or noise (eps) formulation; `thresholding` applies to the data one. `begin_index`: the row a run starts at
    (img2img), where the warm-up to full order restarts and the first corrector is skipped (rows before it are
    first order, without corrector).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = 20,
        *,
        solver_order: int = 2,
        solver_type: str = "bh2",
        predict_x0: bool = True,
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        final_sigmas_type: str = "zero",
        prediction_type: str = "epsilon",
        spacing: str = "linspace",
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        begin_index: int = 0,
    ):
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        check_choice("prediction_type", prediction_type, SOLVER_PREDICTION_TYPES)
        check_choice("spacing", spacing, SPACINGS)
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if not predict_x0 and prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True")
        if not predict_x0 and final_sigmas_type == "zero":
            raise ValueError(
                "predict_x0=False with final_sigmas_type='zero': the last step's noise-prediction update is "
                "0 * inf (diffusers returns NaN); use final_sigmas_type='sigma_min' or predict_x0=True"
            )
        if final_sigmas_type == "zero" and not lower_order_final and solver_order > 1:
            raise ValueError(
                "final_sigmas_type='zero' with lower_order_final=False: the last step's higher-order terms divide "
                "by an infinite step (diffusers returns NaN); use lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        num_steps = solver_num_steps(schedule, num_steps, sigmas, "sigmas", begin_index)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.solver_order = solver_order
        self.predict_x0 = bool(predict_x0)
        self.grid = unipc_grid(
            schedule,
            num_steps,
            spacing=spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            sigmas_spacing=sigma_spacing_of(
                {
                    "use_karras_sigmas": use_karras_sigmas,
                    "use_exponential_sigmas": use_exponential_sigmas,
                    "use_beta_sigmas": use_beta_sigmas,
                }
            ),
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            mu=mu,
            time_shift_type=time_shift_type,
            shift_terminal=shift_terminal,
            sigmas=sigmas,
        )
        orders = unipc_orders(num_steps, solver_order, lower_order_final, begin_index)
        columns = {
            **self.grid.prediction_columns(prediction_type),
            **unipc_columns(
                self.grid, orders, self.predict_x0, solver_type, tuple(disable_corrector), begin_index
            ),
        }
        self.table = StepTable.from_columns(
            self.grid.timesteps,
            kind=f"unipc-{solver_type}-{solver_order}",
            threshold=(dynamic_thresholding_ratio, sample_max_value) if thresholding and predict_x0 else None,
            history="x0" if predict_x0 else "eps",
            history_slots=solver_order,
            uses_xs=True,
            **columns,
        )

    def __repr__(self) -> str:
        return (
            f"UniPCMultistepSampler(num_steps={self.num_steps}, solver_order={self.solver_order}, "
            f"predict_x0={self.predict_x0}, prediction_type={self.prediction_type!r})"
        )


DIFFUSERS_OPTIONS = (
    "solver_order",
    "solver_type",
    "predict_x0",
    "lower_order_final",
    "disable_corrector",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "use_flow_sigmas",
    "flow_shift",
    "time_shift_type",
    "shift_terminal",
    "final_sigmas_type",
    "prediction_type",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


def from_diffusers_unipc(
    scheduler_or_config: Any,
    num_steps: int | None,
    *,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
    begin_index: int = 0,
) -> UniPCMultistepSampler:
    """The UniPCMultistepSampler of a diffusers UniPCMultistepScheduler (or its config); `sigmas` and `mu` are
    set_timesteps' (custom flow sigmas; the dynamic shift of `use_dynamic_shifting`)."""
    schedule, config = diffusers_schedule(scheduler_or_config, "UniPCMultistepScheduler")
    if config.get("solver_p") is not None:
        raise ValueError("solver_p (a second scheduler as the predictor) is not supported")
    if config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("use_dynamic_shifting=True needs mu (set_timesteps(..., mu=...))")
    return UniPCMultistepSampler(
        schedule,
        num_steps,
        sigmas=sigmas,
        mu=mu if config.get("use_dynamic_shifting", False) else None,
        begin_index=begin_index,
        **diffusers_options(config, DIFFUSERS_OPTIONS),
    )


register("unipc", UniPCMultistepSampler, spacing="leading")  # as dpmpp-2m (see dpm_solver.py)
register_diffusers("UniPCMultistepScheduler", from_diffusers_unipc)

"""DPM-Solver++ / DPM-Solver multistep (fastdiff.samplers.dpm_solver) against diffusers' DPMSolverMultistepScheduler.

Parity criterion (binding, issue 12): after the whole loop, max |ours - diffusers_fp32| <= 1e-5, or, where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64), at
most 2x diffusers' own distance to its float64 result (from diffusers_fp32 and from the float64 result). Checked
over random configurations of every option (algorithm types incl. the SDE ones, orders 1-3, midpoint / heun,
lower_order_final, euler_at_final, karras / exponential / beta / lu / flow sigmas, final_sigmas_type, every
prediction type, spacing, thresholding, beta schedules) at 1/4/10/25/50 steps, with generator noise (SDE variants)
and without, using an analytic model; every step must run through the table (`sampler_step`).
"""

import numpy as np
import pytest
import torch
from _solver_parity import SHAPE, STEPS, TOL, analytic_model, diffusers_loop, distances, ours, rng

import fastdiff
from fastdiff.samplers import DPMSolverMultistepSampler

diffusers = pytest.importorskip("diffusers")
dpm_module = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_multistep")

N_CASES = 60


def dpm_case(case: int) -> tuple[dict, int, int | None]:
    """A random DPMSolverMultistepScheduler config (only combinations diffusers accepts), its steps and noise seed."""
    r = rng(case)
    algorithm = r.choice(["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"])
    config = {
        "beta_schedule": r.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "algorithm_type": algorithm,
        "solver_order": r.choice([1, 2, 3]),
        "solver_type": r.choice(["midpoint", "heun"]),
        "lower_order_final": r.random() < 0.7,
        "euler_at_final": r.random() < 0.2,
        "final_sigmas_type": r.choice(["zero", "sigma_min"]),
        "prediction_type": r.choice(["epsilon", "sample", "v_prediction"]),
        "timestep_spacing": r.choice(["linspace", "leading", "trailing"]),
    }
    if config["beta_schedule"] == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)
    levels = r.choice(["train"] * 3 + ["karras"] * 2 + ["exponential", "beta", "lu", "flow"])
    if levels == "flow":
        config.update(use_flow_sigmas=True, flow_shift=r.choice([1.0, 3.0]))
        if algorithm.endswith("++") and r.random() < 0.7:
            config["prediction_type"] = "flow_prediction"
    elif levels == "lu":
        config["use_lu_lambdas"] = True
    elif levels != "train":
        config[f"use_{levels}_sigmas"] = True
    if config["timestep_spacing"] == "leading" and r.random() < 0.5:
        config["steps_offset"] = 1
    if r.random() < 0.2 and levels == "train":
        config["lambda_min_clipped"] = -5.1
    if not algorithm.endswith("++"):
        config["final_sigmas_type"] = (
            "sigma_min"  # diffusers refuses "zero" for the noise-prediction algorithms
        )
    elif r.random() < 0.3 and config["prediction_type"] != "flow_prediction":
        config.update(
            thresholding=True, sample_max_value=r.choice([0.5, 1.0, 2.0]), dynamic_thresholding_ratio=0.9
        )
    if algorithm == "sde-dpmsolver" and config["solver_order"] == 3:
        config["solver_order"] = 2  # diffusers has no third-order sde-dpmsolver
    steps = STEPS[case % len(STEPS)]
    seed = 1000 + case if algorithm.startswith("sde") else None
    return config, steps, seed


def _case_id(case: int) -> str:
    config, steps, seed = dpm_case(case)
    return f"{case}-{config['algorithm_type']}-o{config['solver_order']}-{steps}steps" + (
        "-noise" if seed else ""
    )


@pytest.mark.parametrize("case", range(N_CASES), ids=_case_id)
def test_parity_with_diffusers(case, monkeypatch):
    config, steps, seed = dpm_case(case)
    make = lambda: diffusers.DPMSolverMultistepScheduler(**config)  # noqa: E731
    scheduler = make()
    scheduler.set_timesteps(steps)
    sampler = fastdiff.from_diffusers_scheduler(scheduler, steps)
    assert isinstance(sampler, DPMSolverMultistepSampler)
    assert torch.equal(sampler.timesteps, scheduler.timesteps), "timesteps differ from diffusers'"
    np.testing.assert_array_equal(sampler.grid.sigmas, scheduler.sigmas.double().numpy())

    model = analytic_model(
        scheduler.alphas_cumprod, config["prediction_type"], config.get("use_flow_sigmas", False)
    )
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(case))
    mine, table_steps = ours(sampler, x, model, seed, monkeypatch)
    assert table_steps == steps, "every step must run through the table (sampler_step)"
    assert torch.isfinite(mine).all()
    d64 = diffusers_loop(make(), dpm_module, steps, x, model, seed, float64=True)
    if not torch.isfinite(d64).all():
        # diffusers divides by zero here (a zero-length last step: karras / lu levels ending on sigma_min, which
        # final_sigmas_type="sigma_min" appends again); our table takes the limit (the step is the identity)
        return
    d32 = diffusers_loop(make(), dpm_module, steps, x, model, seed, float64=False)
    dist = distances(mine, d32, d64)
    if not torch.isfinite(d32).all():
        # diffusers' float32 run overflows (e.g. cosine schedule, sigma ~ 1e4): we must match its float64 run
        assert dist.ours_fp64 <= TOL, f"{dist} for {config} at {steps} steps"
        return
    assert dist.ok(), f"{dist} for {config} at {steps} steps"

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
from fastdiff.samplers import SAMPLERS, DPMSolverMultistepSampler, build_sampler
from fastdiff.samplers.dpm_solver import from_diffusers_dpm

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


def _parity(config: dict, steps: int | None, monkeypatch, *, seed=None, begin=0, channels=2, **set_timesteps):
    """Run one configuration through ours and diffusers and assert the criterion; returns the distances."""
    make = lambda: diffusers.DPMSolverMultistepScheduler(**config)  # noqa: E731
    scheduler = make()
    scheduler.set_timesteps(steps, **set_timesteps)
    sampler = from_diffusers_dpm(scheduler, steps, begin_index=begin, **set_timesteps)
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    model = analytic_model(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"), False)
    shape = (SHAPE[0], channels, *SHAPE[2:])
    if config.get("variance_type"):
        base = model
        model = lambda x, t: torch.cat([base(x, t), torch.full_like(x, 7.0)], 1)  # noqa: E731
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mine, table_steps = ours(sampler, x, model, seed, monkeypatch, begin=begin)
    assert table_steps == len(sampler.timesteps) - begin
    d64 = diffusers_loop(make(), dpm_module, steps, x, model, seed, True, begin=begin, **set_timesteps)
    d32 = diffusers_loop(make(), dpm_module, steps, x, model, seed, False, begin=begin, **set_timesteps)
    dist = distances(mine, d32, d64)
    assert dist.ok(), dist
    return dist


@pytest.mark.parametrize("begin", [1, 4, 7])
def test_img2img_restarts_the_warm_up_where_it_begins(begin, monkeypatch):
    """A run that begins at row `begin` (diffusers' set_begin_index, img2img) warms up from first order there."""
    config = {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}
    _parity(config, 10, monkeypatch, seed=3, begin=begin)
    orders_from_0 = DPMSolverMultistepSampler(fastdiff.NoiseSchedule.from_kind("linear"), 10, solver_order=3)
    assert orders_from_0.table.column("f1")[begin] != 0  # from row 0, that row is a multistep row


def test_custom_timesteps_and_dynamic_flow_shift(monkeypatch):
    _parity({"solver_order": 2}, None, monkeypatch, timesteps=[901, 700, 420, 300, 99, 3])
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    _parity(flow, 12, monkeypatch, mu=0.8)


def test_learned_variance_model_output(monkeypatch):
    """variance_type learned / learned_range: the model returns 2C channels, the solver uses the first C (diffusers
    slices the first 3, so C = 3 here)."""
    for variance in ("learned", "learned_range"):
        _parity({"variance_type": variance}, 10, monkeypatch, channels=3)


def test_registered_names_and_defaults():
    schedule = fastdiff.NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    two, three = build_sampler("dpmpp-2m", schedule, 20), build_sampler("dpmpp-3m", schedule, 20)
    assert (two.solver_order, three.solver_order) == (2, 3)
    assert two.algorithm_type == "dpmsolver++" and two.table.history == "x0"
    assert two.table.history_slots == 1 and three.table.history_slots == 2
    assert SAMPLERS["dpmpp-2m"].accepts("use_karras_sigmas")
    noise = build_sampler("dpmpp-2m", schedule, 20, algorithm_type="sde-dpmsolver++")
    assert noise.stochastic and noise.table.noisy_steps() == list(
        range(19)
    )  # the last step lands on sigma = 0


def test_sample_draws_the_sde_noise_from_the_generator():
    schedule = fastdiff.NoiseSchedule.from_kind("linear")
    sampler = DPMSolverMultistepSampler(schedule, 8, algorithm_type="sde-dpmsolver++")
    model = analytic_model(schedule.alphas_cumprod.float(), "epsilon", False)
    run = lambda seed: fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert torch.isfinite(run(0)).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"algorithm_type": "deis"}, "algorithm_type"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_type": "bh2"}, "solver_type"),
        ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        (
            {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
            "third order",
        ),
        (
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
            "thresholding",
        ),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"spacing": "uniform"}, "spacing"),
        ({"begin_index": 20}, "begin_index"),
        ({"timesteps": [10, 500]}, "descending"),
        ({"variance_type": "learned", "prediction_type": "sample"}, "variance_type"),
    ],
)
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverMultistepSampler(
            fastdiff.NoiseSchedule.from_kind("linear"),
            options.pop("num_steps", 20) if "timesteps" not in options else None,
            **options,
        )

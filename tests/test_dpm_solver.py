"""DPM-Solver++ / DPM-Solver multistep (fastdiff.samplers.dpm_solver) against diffusers' DPMSolverMultistepScheduler.

Parity criterion (binding, issue 12): after the whole loop, max |ours - diffusers_fp32| <= 1e-5, or, where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64), at
most 2x diffusers' own distance to its float64 result (tests/diffusers_parity.py). Checked
over random configurations of every option (algorithm types incl. the SDE ones, orders 1-3, midpoint / heun,
lower_order_final, euler_at_final, karras / exponential / beta / lu / flow sigmas, final_sigmas_type, every
prediction type, spacing, thresholding, beta schedules) at 1/4/10/25/50 steps, with generator noise (SDE variants)
and without, using an analytic model; every step of fastdiff's loop and of the Fast drop-in in diffusers' loop must
run through `sampler_step` (counted; diffusers' own step() fails the test if the drop-in calls it).
"""

import os
import random

import numpy as np
import pytest
import torch
from diffusers_parity import AnalyticModel, check_table_parity, last_step_is_empty

import fastdiff
from fastdiff.samplers import SAMPLERS, DPMSolverMultistepSampler, build_sampler

diffusers = pytest.importorskip("diffusers")

N_CASES = 60
STEPS = (1, 4, 10, 25, 50)
SHAPE = (16, 3, 4, 4)  # a larger batch makes the max over elements a steadier statistic
BASE_SEED = int(
    os.environ.get("FASTDIFF_PARITY_SEED", "0")
)  # other values draw other (hidden) configurations


def dpm_case(case: int) -> tuple[dict, int, int | None]:
    """A random DPMSolverMultistepScheduler config (only combinations diffusers accepts), its steps and noise seed."""
    r = random.Random(BASE_SEED * 100_003 + case)
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
    if config["beta_schedule"] != "linear" and r.random() < 0.15:
        # (diffusers' float32 alphas_cumprod of linear betas rescaled to zero SNR rise at the end: not a schedule)
        config["rescale_betas_zero_snr"] = True
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
    return config, steps, 1000 + case  # the seed of x_T (and of the noise, for the SDE variants)


def _case_id(case: int) -> str:
    config, steps, _ = dpm_case(case)
    noise = "-noise" if config["algorithm_type"].startswith("sde") else ""
    return f"{case}-{config['algorithm_type']}-o{config['solver_order']}-{steps}steps{noise}"


@pytest.mark.parametrize("case", range(N_CASES), ids=_case_id)
def test_parity_with_diffusers(case, monkeypatch):
    config, steps, seed = dpm_case(case)
    base = diffusers.DPMSolverMultistepScheduler
    scheduler = base(**config)
    scheduler.set_timesteps(steps)
    sampler = fastdiff.from_diffusers_scheduler(scheduler, steps)
    assert isinstance(sampler, DPMSolverMultistepSampler)
    np.testing.assert_array_equal(sampler.grid.sigmas, scheduler.sigmas.double().numpy())
    result = check_table_parity(base, config, steps, seed=seed, monkeypatch=monkeypatch, begin=0, shape=SHAPE)
    # diffusers is not finite only at a last step of zero length (or within float32 rounding of it: karras / lu
    # levels ending on sigma_min, which final_sigmas_type="sigma_min" appends again; heun divides by h = 0). There
    # ours (and the drop-in) take the limit, checked against diffusers' float64 run where that is finite
    # ("diffusers-fp32-nan", FP64_RTOL), else only finite and equal to each other ("diffusers-nan": no reference)
    allowed = {"ok", "diffusers-fp32-nan", "diffusers-nan"} if last_step_is_empty(scheduler) else {"ok"}
    assert result in allowed, (result, config)


def _parity(config: dict, steps: int | None, monkeypatch, *, seed=0, begin=0, channels=3, **set_timesteps):
    """One configuration through ours and diffusers (the criterion); `channels` C = 3 for learned variance, whose
    model returns 2C channels (diffusers slices the first 3)."""
    base = diffusers.DPMSolverMultistepScheduler
    shape = (SHAPE[0], channels, *SHAPE[2:])
    model = None
    if config.get("variance_type"):
        scheduler = base(**config)
        inner = AnalyticModel("epsilon", scheduler.alphas_cumprod, features=int(np.prod(shape[1:])))
        model = lambda x, t: torch.cat([inner(x, t), torch.full_like(x, 7.0)], 1)  # noqa: E731
    result = check_table_parity(
        base,
        config,
        steps,
        seed=seed,
        monkeypatch=monkeypatch,
        set_timesteps=set_timesteps,
        begin=begin,
        shape=shape,
        model=model,
    )
    assert result == "ok"


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
    model = AnalyticModel("epsilon", schedule.alphas_cumprod, features=48)
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

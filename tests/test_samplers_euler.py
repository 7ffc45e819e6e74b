"""EulerSampler / EulerAncestralSampler and their drop-ins against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler.

Parity criterion (issue 12): after the whole sampling loop, max |ours - diffusers_fp32| <= 1e-5, or, where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64), at
most twice diffusers' own distance to its float64 result. Checked for `fastdiff.sample` with the sampler
`from_diffusers_scheduler` builds and for the Fast drop-in in a pipeline's loop, over random configurations
covering every option, at 1/4/10/25/50 steps, deterministic and with generator noise (churn; ancestral steps), with
an analytic model (tests/diffusers_parity.py). Every step of every drop-in run is counted through the table path.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers_parity import (  # noqa: E402
    SHAPE,
    AnalyticModel,
    compare_with_diffusers,
    diffusers_loop,
    drop_in_loop,
)

import fastdiff  # noqa: E402
from fastdiff.integrations import diffusers as integration  # noqa: E402
from fastdiff.samplers import SAMPLERS, EulerAncestralSampler, EulerSampler, build_sampler  # noqa: E402
from fastdiff.schedule import NoiseSchedule  # noqa: E402

STEPS = (1, 4, 10, 25, 50)
EULER_OPTIONS = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "timestep_spacing": ["linspace", "leading", "trailing"],
    "steps_offset": [0, 1],
    "interpolation_type": ["linear", "log_linear"],
    "final_sigmas_type": ["zero", "sigma_min"],
    "timestep_type": ["discrete", "continuous"],
    "sigmas": [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"],
    "rescale_betas_zero_snr": [False, True],
    "churn": [False, True],
    "custom": [None, "timesteps", "sigmas"],
}
ANCESTRAL_OPTIONS = {k: EULER_OPTIONS[k] for k in ("beta_schedule", "timestep_spacing", "steps_offset")}
ANCESTRAL_OPTIONS |= {"prediction_type": ["epsilon", "v_prediction"], "rescale_betas_zero_snr": [False, True]}


def euler_case(rng: np.random.Generator, ancestral: bool, steps: int) -> dict:
    """One random configuration: diffusers config, set_timesteps and step() arguments, and the choices made."""
    options = ANCESTRAL_OPTIONS if ancestral else EULER_OPTIONS
    pick = {name: values[rng.integers(len(values))] for name, values in options.items()}
    if pick["rescale_betas_zero_snr"] and pick["beta_schedule"] == "linear":
        # diffusers' float32 alphas_cumprod of linear betas rescaled to zero SNR rises at the end (not a schedule)
        pick["beta_schedule"] = "scaled_linear"
    config = {k: v for k, v in pick.items() if k not in ("sigmas", "churn", "custom")}
    set_timesteps, step_kwargs, num_steps = {}, {}, steps
    if not ancestral:
        if pick["sigmas"]:
            config[pick["sigmas"]] = True
        if pick["churn"]:
            step_kwargs = dict(
                s_churn=float(rng.uniform(0.5, 5)), s_tmin=float(rng.uniform(0, 1)), s_noise=1.003
            )
        continuous_v = pick["timestep_type"] == "continuous" and pick["prediction_type"] == "v_prediction"
        if pick["custom"] == "timesteps" and not pick["sigmas"] and not continuous_v:
            set_timesteps = {
                "timesteps": sorted(rng.choice(1000, size=steps, replace=False).tolist(), reverse=True)
            }
            num_steps = None
        elif pick["custom"] == "sigmas":
            set_timesteps = {"sigmas": [*np.geomspace(rng.uniform(5, 14), 0.03, steps).tolist(), 0.0]}
            num_steps = None
        else:
            pick["custom"] = None
    return dict(
        config=config, set_timesteps=set_timesteps, step_kwargs=step_kwargs, num_steps=num_steps, pick=pick
    )


def run_case(cls, case: dict, seed: int, monkeypatch) -> tuple[torch.Tensor, ...]:
    """(ours via fastdiff.sample, ours via the drop-in, diffusers fp32, diffusers fp64); the drop-in's steps are
    counted through `sampler_step`, and diffusers' own step() raises if anything calls it."""
    config, n = case["config"], case["num_steps"]
    continuous_v = config.get("timestep_type") == "continuous" and config["prediction_type"] == "v_prediction"
    model_kind = "log_sigma" if continuous_v else "discrete"
    model = AnalyticModel(config["prediction_type"], cls(**config).alphas_cumprod, model_kind)
    kwargs = dict(seed=seed, set_timesteps=case["set_timesteps"], step_kwargs=case["step_kwargs"])
    fp32 = diffusers_loop(cls, config, model, n, **kwargs)
    fp64 = diffusers_loop(cls, config, model, n, dtype=torch.float64, **kwargs)
    reference = cls(**config)
    reference.set_timesteps(n, **case["set_timesteps"])
    sampler = fastdiff.from_diffusers_scheduler(reference, n, **case["set_timesteps"], **case["step_kwargs"])
    ours = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(seed))
    dropped, table_steps = drop_in_loop(cls, config, model, n, monkeypatch, **kwargs)
    assert table_steps == len(sampler.timesteps) > 0
    return ours, dropped, fp32, fp64


def check(ours, dropped, fp32, fp64, case) -> str:
    """The criterion for fastdiff.sample and the drop-in (`compare_with_diffusers`). Where diffusers' float32 run
    is not finite (its Euler ancestral can take the square root of a negative rounding of sigma_down^2), both are
    held to its float64 run (FP64_RTOL), which must then be finite: Euler has no step diffusers cannot compute in
    float64."""
    result = compare_with_diffusers({"ours": ours, "drop-in": dropped}, fp32, fp64, case["config"])
    assert result in ("ok", "diffusers-fp32-nan"), (result, case)
    return result


@pytest.mark.parametrize("ancestral", [False, True], ids=["euler", "euler-a"])
@pytest.mark.parametrize("steps", STEPS)
def test_parity_with_diffusers_over_random_configs(ancestral, steps, monkeypatch):
    cls = diffusers.EulerAncestralDiscreteScheduler if ancestral else diffusers.EulerDiscreteScheduler
    rng = np.random.default_rng(1000 * steps + ancestral)
    for trial in range(4):
        case = euler_case(rng, ancestral, steps)
        check(*run_case(cls, case, seed=trial, monkeypatch=monkeypatch), case)


def test_random_configs_cover_every_option():
    """The configurations the parity test draws take every value of every option (for the seeds it uses)."""
    for ancestral, options in ((False, EULER_OPTIONS), (True, ANCESTRAL_OPTIONS)):
        seen = {name: set() for name in options}
        for steps in STEPS:
            rng = np.random.default_rng(1000 * steps + ancestral)
            for _ in range(4):
                for name, value in euler_case(rng, ancestral, steps)["pick"].items():
                    seen[name].add(value)
        for name, values in options.items():
            assert seen[name] == set(values), (ancestral, name, seen[name])


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "scaled_linear"},
        {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
        {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min"},
        {"timestep_type": "continuous", "prediction_type": "v_prediction", "use_exponential_sigmas": True},
    ],
)
def test_schedule_matches_diffusers_set_timesteps(config):
    """Timesteps, sigmas, init_noise_sigma and the scale_model_input factor: ours in float64 against diffusers'
    float32 numbers (within float32 rounding)."""
    ref = diffusers.EulerDiscreteScheduler(**config)
    ref.set_timesteps(13)
    sampler = fastdiff.from_diffusers_scheduler(ref, 13)
    table = sampler.table
    assert table.timesteps.dtype == torch.float64
    np.testing.assert_allclose(table.timesteps, ref.timesteps.double(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(sampler.sigmas, ref.sigmas.double(), rtol=3e-7)
    assert table.init_sigma == pytest.approx(float(ref.init_noise_sigma), rel=3e-7)
    x = torch.ones(1, 1, 2, 2)
    factors = []
    for i, t in enumerate(ref.timesteps):
        ref._step_index = i  # what step() would have advanced it to
        factors.append(ref.scale_model_input(x, t)[0, 0, 0, 0].item())
    np.testing.assert_allclose(table.column("k_in"), factors, rtol=3e-7)


def test_registered_names_and_sampling_from_a_schedule():
    schedule = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert SAMPLERS["euler"].cls is EulerSampler and SAMPLERS["euler-a"].cls is EulerAncestralSampler
    euler = build_sampler("euler", schedule, 10, sigma_spacing="karras")
    ancestral = build_sampler("euler-a", schedule, 10)
    # registered with leading spacing (as DDIM): a cosine schedule's sigma at t = T - 1 is ~2e4
    assert SAMPLERS["euler"].defaults == SAMPLERS["euler-a"].defaults == {"spacing": "leading"}
    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        use_karras_sigmas=True,
        timestep_spacing="leading",
    )
    ref.set_timesteps(10)
    # a float64 schedule: diffusers' alphas_cumprod is a float32 cumulative product, ~1e-5 off
    np.testing.assert_allclose(euler.sigmas, ref.sigmas.double(), rtol=1e-4)
    model = AnalyticModel("epsilon", schedule.alphas_cumprod)
    for sampler in (euler, ancestral):
        out = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all() and out.abs().max() < 5  # the analytic model's data are N(0, 0.5^2)
    # SDEdit / inpainting start from x0 noised in sigma space
    x0, z = torch.zeros(SHAPE), torch.ones(SHAPE)
    assert torch.allclose(euler.noised(x0, 3, z), torch.full(SHAPE, float(euler.sigmas[3])))


def test_bad_arguments():
    schedule = NoiseSchedule.from_kind("linear")
    with pytest.raises(ValueError, match="prediction_type"):
        EulerSampler(schedule, 10, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        EulerAncestralSampler(schedule, 10, "sample")  # diffusers' ancestral Euler has no sample prediction
    with pytest.raises(ValueError, match="sigma_spacing"):
        EulerSampler(schedule, 10, sigma_spacing="cosine")
    with pytest.raises(ValueError, match="s_churn"):
        EulerSampler(schedule, 10, s_churn=-1.0)
    with pytest.raises(ValueError, match="timesteps or sigmas, not both"):
        EulerSampler(schedule, None, timesteps=[500, 100], sigmas=[3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="custom timesteps cannot be combined with karras"):
        EulerSampler(schedule, None, timesteps=[500, 100], sigma_spacing="karras")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        EulerSampler(fastdiff.schedule.FlowSchedule(), 10)
    # diffusers' ancestral Euler only fails at its first step; the drop-in refuses at set_timesteps
    fast = integration._fast_schedulers()["FastEulerAncestralDiscreteScheduler"](prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        fast.set_timesteps(4)

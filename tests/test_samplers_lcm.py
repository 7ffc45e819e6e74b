"""LCMSampler and its drop-in against diffusers' LCMScheduler.

Parity criterion (issue 12): after the whole sampling loop, max |ours - diffusers_fp32| <= 1e-5, or, where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64), at
most twice diffusers' own distance to its float64 result. Checked for `fastdiff.sample` and for the Fast drop-in in
a pipeline's loop, over random configurations covering every option, at 1/4/10/25/50 steps (every step but the last
re-noises with generator noise; 1 step draws none), with an analytic model (tests/diffusers_parity.py). Every step
of every drop-in run is counted through the table path.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers_parity import SHAPE, AnalyticModel, diffusers_loop, drop_in_loop, parity  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.integrations import diffusers as integration  # noqa: E402
from fastdiff.samplers import SAMPLERS, LCMSampler, build_sampler  # noqa: E402
from fastdiff.schedule import NoiseSchedule  # noqa: E402

STEPS = (1, 4, 10, 25, 50)
OPTIONS = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "original_inference_steps": [50, 100],
    "x0": [None, "clip_sample", "thresholding"],
    "timestep_scaling": [10.0, 1.0],
    "set_alpha_to_one": [True, False],
    "steps_offset": [0, 1],
    "set_timesteps": [None, "strength", "original_inference_steps", "timesteps"],
}


def lcm_case(rng: np.random.Generator, steps: int) -> dict:
    pick = {name: values[rng.integers(len(values))] for name, values in OPTIONS.items()}
    config = {k: v for k, v in pick.items() if k not in ("x0", "set_timesteps")}
    if pick["x0"]:
        config[pick["x0"]] = True
        config["clip_sample_range"] = config["sample_max_value"] = 1.5
    set_timesteps, num_steps = {}, steps
    if pick["set_timesteps"] == "strength":
        set_timesteps = {"strength": 0.6}
        if steps > 0.6 * pick["original_inference_steps"]:
            set_timesteps, pick["set_timesteps"] = {}, None
    elif pick["set_timesteps"] == "original_inference_steps":
        set_timesteps = {"original_inference_steps": int(rng.integers(steps, 200))}
    elif pick["set_timesteps"] == "timesteps":
        set_timesteps, num_steps = (
            {"timesteps": sorted(rng.choice(1000, steps, replace=False).tolist())[::-1]},
            None,
        )
    return dict(config=config, set_timesteps=set_timesteps, num_steps=num_steps, pick=pick)


@pytest.mark.parametrize("steps", STEPS)
def test_parity_with_diffusers_over_random_configs(steps, monkeypatch):
    cls = diffusers.LCMScheduler
    rng = np.random.default_rng(steps)
    for trial in range(4):
        case = lcm_case(rng, steps)
        config, n, set_timesteps = case["config"], case["num_steps"], case["set_timesteps"]
        model = AnalyticModel(config["prediction_type"], cls(**config).alphas_cumprod)
        fp32 = diffusers_loop(cls, config, model, n, seed=trial, set_timesteps=set_timesteps)
        fp64 = diffusers_loop(
            cls, config, model, n, seed=trial, set_timesteps=set_timesteps, dtype=torch.float64
        )
        reference = cls(**config)
        reference.set_timesteps(n, **set_timesteps)
        sampler = fastdiff.from_diffusers_scheduler(reference, n, **set_timesteps)
        ours = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(trial))
        dropped, table_steps = drop_in_loop(
            cls, config, model, n, monkeypatch, seed=trial, set_timesteps=set_timesteps
        )
        assert table_steps == len(sampler.timesteps) > 0
        for result in (ours, dropped):
            ok, ours_err, own_err = parity(result, fp32, fp64)
            assert ok, f"max |ours - diffusers| {ours_err:.2e}, diffusers' own error {own_err:.2e}: {case}"


def test_random_configs_cover_every_option():
    seen = {name: set() for name in OPTIONS}
    for steps in STEPS:
        rng = np.random.default_rng(steps)
        for _ in range(4):
            for name, value in lcm_case(rng, steps)["pick"].items():
                seen[name].add(value)
    for name, values in OPTIONS.items():
        assert seen[name] == set(values), (name, seen[name])


def test_drop_in_returns_the_denoised_sample_diffusers_pipelines_decode():
    ref, fast = diffusers.LCMScheduler(), integration._fast_schedulers()["FastLCMScheduler"]()
    for scheduler in (ref, fast):
        scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x, m = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    for t in ref.timesteps:
        a = ref.step(m, t, x, generator=torch.Generator().manual_seed(1))
        b = fast.step(m, t, x, generator=torch.Generator().manual_seed(1))
        for ours, theirs in ((b.prev_sample, a.prev_sample), (b.denoised, a.denoised)):
            torch.testing.assert_close(
                ours, theirs, rtol=1e-6, atol=1e-6
            )  # x0 = x / sqrt(abar) + ... is ~20 at t=999
    fast.set_timesteps(4)
    _, denoised = fast.step(
        m, fast.timesteps[0], x, generator=torch.Generator().manual_seed(1), return_dict=False
    )
    ref.set_timesteps(4)
    theirs = ref.step(m, ref.timesteps[0], x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(denoised, theirs.denoised, rtol=1e-6, atol=1e-6)


def test_registered_name_and_rows():
    schedule = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert SAMPLERS["lcm"].cls is LCMSampler
    sampler = build_sampler("lcm", schedule, 4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    table = sampler.table
    # the last row returns the consistency function itself: no re-noising
    assert table.column("s")[-1] == 0 and (table.column("s")[:-1] > 0).all()
    assert table.column("c")[-1] == pytest.approx(sampler.c_out[-1])
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        LCMSampler(schedule, 60, original_inference_steps=50)
    with pytest.raises(ValueError, match="timesteps must be descending"):
        LCMSampler(schedule, None, timesteps=[100, 500])
    with pytest.raises(ValueError, match="timestep_scaling"):
        LCMSampler(schedule, 4, timestep_scaling=0)
    with pytest.raises(ValueError, match="zero-SNR"):  # alphas_cumprod reaches 0 at t=999: x0 = x / 0
        fastdiff.from_diffusers_scheduler(diffusers.LCMScheduler(rescale_betas_zero_snr=True), 4)

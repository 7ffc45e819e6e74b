"""FlowSchedule, FlowMatchEulerSampler and its drop-in against diffusers' FlowMatchEulerDiscreteScheduler.

Parity criterion (issue 12): after the whole sampling loop, max |ours - diffusers_fp32| <= 1e-5, or, where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64), at
most twice diffusers' own distance to its float64 result. Checked for `fastdiff.sample` and for the Fast drop-in in
a pipeline's loop, over random configurations covering every option (shift, dynamic shifting by mu, ...), at
1/4/10/25/50 steps, deterministic and with generator noise (stochastic_sampling), with an analytic velocity model
(tests/diffusers_parity.py). Every step of every drop-in run is counted through the table path.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers_parity import SHAPE, AnalyticModel, diffusers_loop, drop_in_loop, parity  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.integrations import diffusers as integration  # noqa: E402
from fastdiff.samplers import SAMPLERS, FlowMatchEulerSampler, build_sampler  # noqa: E402
from fastdiff.schedule import FlowSchedule, NoiseSchedule  # noqa: E402

STEPS = (1, 4, 10, 25, 50)
OPTIONS = {
    "shift": [1.0, 3.0, 0.7],
    "use_dynamic_shifting": [False, True],
    "time_shift_type": ["exponential", "linear"],
    "shift_terminal": [None, 0.1],
    "sigmas": [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"],
    "invert_sigmas": [False, True],
    "stochastic_sampling": [False, True],
    "set_timesteps": [None, "sigmas", "timesteps"],
}


def flow_case(rng: np.random.Generator, steps: int) -> dict:
    pick = {name: values[rng.integers(len(values))] for name, values in OPTIONS.items()}
    if steps == 1 and pick["shift_terminal"]:
        pick["shift_terminal"] = None  # diffusers divides by zero stretching a single sigma
    config = {k: v for k, v in pick.items() if k not in ("sigmas", "set_timesteps")}
    if pick["sigmas"]:
        config[pick["sigmas"]] = True
    set_timesteps, num_steps = {}, steps
    if pick["use_dynamic_shifting"]:
        set_timesteps["mu"] = float(rng.uniform(0.5, 1.5))
    if pick["set_timesteps"] == "sigmas":
        set_timesteps["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
    elif pick["set_timesteps"] == "timesteps":
        set_timesteps["timesteps"] = np.linspace(1000.0, 1000 / steps, steps).tolist()
        set_timesteps["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
    return dict(config=config, set_timesteps=set_timesteps, num_steps=num_steps, pick=pick)


@pytest.mark.parametrize("steps", STEPS)
def test_parity_with_diffusers_over_random_configs(steps, monkeypatch):
    cls = diffusers.FlowMatchEulerDiscreteScheduler
    model = AnalyticModel("flow", noise_level="flow")
    rng = np.random.default_rng(steps)
    for trial in range(4):
        case = flow_case(rng, steps)
        config, n, set_timesteps = case["config"], case["num_steps"], case["set_timesteps"]
        fp32 = diffusers_loop(cls, config, model, n, seed=trial, set_timesteps=set_timesteps)
        fp64 = diffusers_loop(
            cls, config, model, n, seed=trial, set_timesteps=set_timesteps, dtype=torch.float64
        )
        sampler = fastdiff.from_diffusers_scheduler(cls(**config), n, **set_timesteps)
        ours = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(trial))
        dropped, table_steps = drop_in_loop(
            cls, config, model, n, monkeypatch, seed=trial, set_timesteps=set_timesteps
        )
        assert table_steps == len(sampler.timesteps) == steps
        for result in (ours, dropped):
            ok, ours_err, own_err = parity(result, fp32, fp64)
            assert ok, f"max |ours - diffusers| {ours_err:.2e}, diffusers' own error {own_err:.2e}: {case}"


def test_random_configs_cover_every_option():
    seen = {name: set() for name in OPTIONS}
    for steps in STEPS:
        rng = np.random.default_rng(steps)
        for _ in range(4):
            for name, value in flow_case(rng, steps)["pick"].items():
                seen[name].add(value)
    for name, values in OPTIONS.items():
        assert seen[name] == set(values), (name, seen[name])


def test_flow_schedule_matches_diffusers():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(28)
    schedule = FlowSchedule.from_diffusers(ref)
    ts, sigmas = schedule.sigmas(28)
    np.testing.assert_allclose(sigmas, ref.sigmas.double(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ts, ref.timesteps.double(), rtol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # the dynamic shift of Flux: mu from the image's token count, as its pipeline computes it
    flux = FlowSchedule(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert flux.mu(256) == pytest.approx(0.5) and flux.mu(4096) == pytest.approx(1.15)
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(10, mu=flux.mu(1024))
    np.testing.assert_allclose(
        flux.sigmas(10, mu=flux.mu(1024))[1], dynamic.sigmas.double(), rtol=1e-6, atol=1e-7
    )
    # set_shift (SD3's pipelines change it at run time) is what the builder reads
    ref.set_shift(5.0)
    assert FlowSchedule.from_diffusers(ref).shift == 5.0
    x0, noise = torch.zeros(2), torch.ones(2)
    assert torch.equal(schedule.q_sample(x0, 0.25, noise), torch.full((2,), 0.25))


def test_registered_name_rows_and_errors():
    assert SAMPLERS["flow-euler"].cls is FlowMatchEulerSampler
    sampler = build_sampler("flow-euler", FlowSchedule(shift=3.0), 8)
    assert sampler.prediction_type == "flow" and sampler.table.init_sigma == 1.0
    assert sampler.timesteps.dtype == torch.float64
    # x0 = x - sigma m, eps = x + (1 - sigma) m: with m = z - x0 at x = (1 - sigma) x0 + sigma z both are exact
    x0, z = torch.randn(SHAPE), torch.randn(SHAPE)
    table, row = sampler.table, 3
    sigma = float(sampler.sigmas[row])
    x, m = (1 - sigma) * x0 + sigma * z, z - x0
    col = {name: table.column(name)[row].item() for name in ("a", "b", "p", "q", "c", "d", "e")}
    torch.testing.assert_close(col["a"] * x + col["b"] * m, x0)
    torch.testing.assert_close(col["p"] * x + col["q"] * m, z)
    step = col["c"] * (col["a"] * x + col["b"] * m) + col["d"] * (col["p"] * x + col["q"] * m) + col["e"] * x
    torch.testing.assert_close(step, x + (float(sampler.sigmas[row + 1]) - sigma) * m)
    torch.testing.assert_close(sampler.noised(x0, row, z), x)
    with pytest.raises(TypeError, match="FlowSchedule"):
        FlowMatchEulerSampler(NoiseSchedule.from_kind("linear"), 8)
    with pytest.raises(ValueError, match="mu must be given"):
        FlowMatchEulerSampler(FlowSchedule(use_dynamic_shifting=True), 8)
    with pytest.raises(ValueError, match="shift must be a positive"):
        FlowSchedule(shift=0)
    with pytest.raises(ValueError, match="same length"):
        FlowSchedule().sigmas(None, sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="at least 2 steps"):
        FlowSchedule(shift_terminal=0.1).sigmas(1)
    # per-token timesteps (diffusers' step argument) are not a table row
    fast = integration._fast_schedulers()["FastFlowMatchEulerDiscreteScheduler"]()
    fast.set_timesteps(4)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        fast.step(
            torch.zeros(SHAPE), fast.timesteps[0], torch.zeros(SHAPE), per_token_timesteps=torch.ones(2, 3)
        )

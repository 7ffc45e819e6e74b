"""FastDPMSolverMultistepScheduler and FastUniPCMultistepScheduler: diffusers' schedulers stepping with fastdiff's
table. The properties diffusers' own scheduler tests check, in our terms: the loop matches diffusers' (parity
criterion of issue 12, tests/diffusers_parity.py), save / load gives the same scheduler, img2img loops that start
mid-way, custom timesteps, half precision, switching classes through from_config, and no call of diffusers' step():
every step of every drop-in loop here is counted through `fastdiff.kernels.sampler_step` while diffusers' own
step() fails the test (`table_steps_only`).

The drop-ins' parity over the random configurations of test_dpm_solver.py / test_unipc.py (1/4/10/25/50 steps, the
SDE variants with generator noise, UniPC without) runs there, in `check_table_parity`, beside fastdiff's own loop
on the same diffusers runs. Here: img2img loops over timesteps[4:] without set_begin_index, on a subset of those
configurations (the first six of each family with 10 or more steps and a unique timesteps[4]).
"""

import pytest
import torch
from diffusers_parity import (
    SHAPE,
    AnalyticModel,
    compare_with_diffusers,
    diffusers_loop,
    drop_in_loop,
    last_step_is_empty,
    table_steps_only,
)
from test_dpm_solver import dpm_case
from test_unipc import unipc_case

diffusers = pytest.importorskip("diffusers")
from fastdiff.integrations.diffusers import (  # noqa: E402
    FastDPMSolverMultistepScheduler,
    FastUniPCMultistepScheduler,
)

PAIRS = [
    (diffusers.DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler),
    (diffusers.UniPCMultistepScheduler, FastUniPCMultistepScheduler),
]
CONFIGS = {
    "DPMSolverMultistepScheduler": [
        {},
        {"solver_order": 3, "use_karras_sigmas": True, "prediction_type": "v_prediction"},
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        {"thresholding": True, "sample_max_value": 0.8, "dynamic_thresholding_ratio": 0.9},
    ],
    "UniPCMultistepScheduler": [
        {},
        {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"predict_x0": False, "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"prediction_type": "sample", "disable_corrector": [1]},
    ],
}
START = 4  # img2img: the loop over timesteps[START:]


def loop(scheduler, steps, x, model, seed=None, start=0, **set_timesteps):
    """A pipeline's loop over timesteps[start:] (no set_begin_index)."""
    scheduler.set_timesteps(steps, **set_timesteps)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[start:]:
        kwargs = {"generator": g} if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler) else {}
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **kwargs).prev_sample
    return x


def fast_loop(monkeypatch, scheduler, steps, x, model, **kwargs):
    """`loop` with a drop-in under `table_steps_only`: each of its steps must be one call of sampler_step."""
    base = next(base for base, fast in PAIRS if isinstance(scheduler, fast))
    with table_steps_only(base, monkeypatch) as calls:
        out = loop(scheduler, steps, x, model, **kwargs)
    assert len(calls) == len(scheduler.timesteps) - kwargs.get("start", 0) > 0
    return out


def img2img_cases():
    chosen = []
    for base, make_case in (
        (diffusers.DPMSolverMultistepScheduler, lambda i: dpm_case(i)),
        (diffusers.UniPCMultistepScheduler, lambda i: (*unipc_case(i), 1000 + i)),
    ):
        found = 0
        for i in range(60):
            config, steps, seed = make_case(i)
            scheduler = base(**config)
            scheduler.set_timesteps(steps)
            ts = scheduler.timesteps
            if steps < 10 or (ts == ts[START]).sum() != 1:  # diffusers finds a repeated timestep's 2nd row
                continue
            noise = "-noise" if config.get("algorithm_type", "").startswith("sde") else ""
            chosen.append(
                pytest.param(base, config, steps, seed, id=f"{base.__name__}-{i}-{steps}steps{noise}")
            )
            found += 1
            if found == 6:
                break
    return chosen


@pytest.mark.parametrize(("base", "config", "steps", "seed"), img2img_cases())
def test_img2img_loop_without_set_begin_index_matches_diffusers(base, config, steps, seed, monkeypatch):
    """A loop over timesteps[4:] with no set_begin_index (the drop-in finds its first row from the timestep, and
    the multistep warm-up restarts there, as diffusers'): the criterion against diffusers' float32 and float64 loops
    of the same kind, every drop-in step counted through sampler_step."""
    flow = config.get("use_flow_sigmas", False)
    model = AnalyticModel(
        config.get("prediction_type", "epsilon"),
        base(**config).alphas_cumprod,
        "flow" if flow else "discrete",
        features=48,
    )
    kw = dict(seed=seed, begin=START, set_begin_index=False)
    fp32 = diffusers_loop(base, config, model, steps, **kw)
    fp64 = diffusers_loop(base, config, model, steps, dtype=torch.float64, **kw)
    ours, table_steps = drop_in_loop(base, config, model, steps, monkeypatch, **kw)
    assert table_steps == steps - START
    result = compare_with_diffusers({"drop-in": ours}, fp32, fp64, config)
    scheduler = base(**config)
    scheduler.set_timesteps(steps)
    allowed = {"ok", "diffusers-fp32-nan", "diffusers-nan"} if last_step_is_empty(scheduler) else {"ok"}
    assert result in allowed, (result, config)


def cases():
    for base, fast in PAIRS:
        for i, config in enumerate(CONFIGS[base.__name__]):
            yield pytest.param(base, fast, config, id=f"{base.__name__}-{i}")


@pytest.mark.parametrize(("base", "fast", "config"), cases())
def test_save_and_load_give_the_same_scheduler(base, fast, config, tmp_path, monkeypatch):
    scheduler = fast(**config)
    scheduler.save_pretrained(tmp_path)
    loaded = fast.from_pretrained(tmp_path)
    plain = base.from_pretrained(tmp_path)  # what plain diffusers loads from our folder
    assert type(loaded) is fast and type(plain) is base
    model = AnalyticModel(scheduler.config.prediction_type, scheduler.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    first = fast_loop(monkeypatch, scheduler, 8, x, model, seed=2)
    assert torch.equal(first, fast_loop(monkeypatch, loaded, 8, x, model, seed=2))


def test_switching_classes_through_from_config_keeps_the_numbers(monkeypatch):
    config = diffusers.DPMSolverMultistepScheduler().config
    unipc = FastUniPCMultistepScheduler.from_config(config)
    dpm = FastDPMSolverMultistepScheduler.from_config(unipc.config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    model = AnalyticModel("epsilon", dpm.alphas_cumprod)
    reference = loop(diffusers.DPMSolverMultistepScheduler.from_config(config), 10, x, model)
    assert (fast_loop(monkeypatch, dpm, 10, x, model) - reference).abs().max() <= 1e-5


def test_custom_timesteps_and_half_precision(monkeypatch):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = AnalyticModel("epsilon", diffusers.DPMSolverMultistepScheduler().alphas_cumprod)
    timesteps = [951, 801, 651, 501, 351, 201, 51]
    custom = fast_loop(monkeypatch, FastDPMSolverMultistepScheduler(), None, x, model, timesteps=timesteps)
    reference = loop(diffusers.DPMSolverMultistepScheduler(), None, x, model, timesteps=timesteps)
    assert (custom - reference).abs().max() <= 1e-5
    for fast in (FastDPMSolverMultistepScheduler, FastUniPCMultistepScheduler):
        half = fast_loop(
            monkeypatch, fast(thresholding=True, dynamic_thresholding_ratio=0), 10, x.half(), model
        )
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_configurations_the_table_cannot_run_fail_in_set_timesteps():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        FastUniPCMultistepScheduler(predict_x0=False).set_timesteps(10)
    with pytest.raises(ValueError, match="thresholding"):
        FastDPMSolverMultistepScheduler(
            algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True
        ).set_timesteps(10)

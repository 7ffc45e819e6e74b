"""FastDPMSolverMultistepScheduler and FastUniPCMultistepScheduler: diffusers' schedulers stepping with fastdiff's
table. The properties diffusers' own scheduler tests check, in our terms: the loop matches diffusers' (parity
criterion of issue 12, as in test_dpm_solver.py), save / load gives the same scheduler, img2img loops that start
mid-way, custom timesteps, half precision, switching classes through from_config, and no call of diffusers' step().
"""

import pytest
import torch
from diffusers_parity import SHAPE, AnalyticModel

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


@pytest.fixture(autouse=True)
def no_diffusers_step_for_drop_ins(monkeypatch):
    """Fail if a drop-in ever runs diffusers' own step() (every step must be a table row)."""
    for base, fast in PAIRS:
        original = base.step

        def guarded(self, *args, _original=original, _fast=fast, **kwargs):
            assert not isinstance(self, _fast), "the drop-in fell back to diffusers' step()"
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(base, "step", guarded)


def loop(scheduler, steps, x, model, seed=None, start=0, **set_timesteps):
    scheduler.set_timesteps(steps, **set_timesteps)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[start:]:
        kwargs = {"generator": g} if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler) else {}
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **kwargs).prev_sample
    return x


def cases():
    for base, fast in PAIRS:
        for i, config in enumerate(CONFIGS[base.__name__]):
            yield pytest.param(base, fast, config, id=f"{base.__name__}-{i}")


@pytest.mark.parametrize(("base", "fast", "config"), cases())
@pytest.mark.parametrize("start", [0, 4])  # 4: an img2img loop over timesteps[4:] (no set_begin_index)
def test_drop_in_loop_matches_diffusers(base, fast, config, start):
    """The parity criterion of test_dpm_solver.py, here against diffusers' float32 loop only: where diffusers is
    within 1e-5 of itself in float64 for these configs, max |ours - diffusers_fp32| <= 1e-5."""
    reference = base(**config)
    model = AnalyticModel(reference.config.prediction_type, reference.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    theirs = loop(reference, 12, x, model, seed=5, start=start)
    ours = loop(fast(**config), 12, x, model, seed=5, start=start)
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("base", "fast", "config"), cases())
def test_save_and_load_give_the_same_scheduler(base, fast, config, tmp_path):
    scheduler = fast(**config)
    scheduler.save_pretrained(tmp_path)
    loaded = fast.from_pretrained(tmp_path)
    plain = base.from_pretrained(tmp_path)  # what plain diffusers loads from our folder
    assert type(loaded) is fast and type(plain) is base
    model = AnalyticModel(scheduler.config.prediction_type, scheduler.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loop(scheduler, 8, x, model, seed=2), loop(loaded, 8, x, model, seed=2))


def test_switching_classes_through_from_config_keeps_the_numbers():
    config = diffusers.DPMSolverMultistepScheduler().config
    unipc = FastUniPCMultistepScheduler.from_config(config)
    dpm = FastDPMSolverMultistepScheduler.from_config(unipc.config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    model = AnalyticModel("epsilon", dpm.alphas_cumprod)
    reference = loop(diffusers.DPMSolverMultistepScheduler.from_config(config), 10, x, model)
    assert (loop(dpm, 10, x, model) - reference).abs().max() <= 1e-5


def test_custom_timesteps_and_half_precision():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = AnalyticModel("epsilon", diffusers.DPMSolverMultistepScheduler().alphas_cumprod)
    timesteps = [951, 801, 651, 501, 351, 201, 51]
    custom = loop(FastDPMSolverMultistepScheduler(), None, x, model, timesteps=timesteps)
    reference = loop(diffusers.DPMSolverMultistepScheduler(), None, x, model, timesteps=timesteps)
    assert (custom - reference).abs().max() <= 1e-5
    for fast in (FastDPMSolverMultistepScheduler, FastUniPCMultistepScheduler):
        half = loop(fast(thresholding=True, dynamic_thresholding_ratio=0), 10, x.half(), model)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_configurations_the_table_cannot_run_fail_in_set_timesteps():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        FastUniPCMultistepScheduler(predict_x0=False).set_timesteps(10)
    with pytest.raises(ValueError, match="thresholding"):
        FastDPMSolverMultistepScheduler(
            algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True
        ).set_timesteps(10)

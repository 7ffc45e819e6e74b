"""The generic Fast<Name> drop-in mechanism (fastdiff.integrations.diffusers.DROP_INS): every drop-in keeps diffusers'
interface (config, signatures, timesteps, scale_model_input, init_noise_sigma, order, save / load, pickling), is
swapped in by accelerate_pipeline, and a pipeline saved with one loads back with plain diffusers and with fastdiff.
Numerical parity per family is in tests/test_samplers_<family>.py and tests/test_integrations_diffusers.py.
"""

import copy
import inspect
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from fastdiff.integrations import diffusers as integration  # noqa: E402
from fastdiff.integrations.diffusers import DROP_INS, accelerate_pipeline  # noqa: E402

CONFIGS = {  # a non-default configuration of each covered scheduler
    "DDIMScheduler": dict(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
    "DDPMScheduler": dict(variance_type="fixed_large", timestep_spacing="trailing"),
    "EulerDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="leading", steps_offset=1),
    "LCMScheduler": dict(original_inference_steps=40, timestep_scaling=5.0),
    "FlowMatchEulerDiscreteScheduler": dict(shift=3.0),
}
SPECS = {spec.name: spec for spec in DROP_INS}


def test_every_drop_in_is_listed_and_configured_here():
    assert set(CONFIGS) <= set(SPECS)
    for name in SPECS:
        assert hasattr(integration, f"Fast{name}")


def public(config) -> dict:
    """A scheduler config without diffusers' bookkeeping entries (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_drop_in_keeps_diffusers_interface(name, tmp_path):
    base = getattr(diffusers, name)
    fast_cls = getattr(integration, f"Fast{name}")
    ref = base(**CONFIGS[name])
    fast = fast_cls.from_config(ref.config)
    assert isinstance(fast, base) and fast_cls.__module__ == integration.__name__
    assert public(fast.config) == public(ref.config)
    # pipelines inspect these signatures for the arguments they may pass (eta, generator, timesteps, sigmas, mu)
    for method in ("step", "set_timesteps"):
        assert inspect.signature(getattr(fast, method)) == inspect.signature(getattr(ref, method))
    probe = SPECS[name].probe
    for scheduler in (ref, fast):
        scheduler.set_timesteps(7, **probe)
    torch.testing.assert_close(fast.timesteps, ref.timesteps, rtol=0, atol=0)
    assert fast.order == ref.order
    assert getattr(fast, "init_noise_sigma", None) == getattr(ref, "init_noise_sigma", None)
    x = torch.randn(1, 3, 4, 4)
    if hasattr(ref, "scale_model_input"):
        t = ref.timesteps[2]
        torch.testing.assert_close(fast.scale_model_input(x, t), ref.scale_model_input(x, t), rtol=0, atol=0)
    # a config round trip through disk, with the drop-in and with plain diffusers
    fast.save_pretrained(tmp_path)
    for cls in (fast_cls, base):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is cls and public(loaded.config) == public(ref.config)
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), fast_cls.from_config(fast.config)):
        assert type(other) is fast_cls
        other.set_timesteps(7, **probe)
        torch.testing.assert_close(other.timesteps, ref.timesteps, rtol=0, atol=0)


def test_pipeline_saved_with_a_drop_in_loads_back(tmp_path):
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    pipe.scheduler = integration.FastEulerDiscreteScheduler(use_karras_sigmas=True)
    pipe.save_pretrained(tmp_path)
    # plain diffusers: the whole pipeline (the drop-in class is found in fastdiff's module), and the scheduler
    # folder as diffusers' own class
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is integration.FastEulerDiscreteScheduler
    assert loaded.scheduler.config.use_karras_sigmas
    plain = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(plain) is diffusers.EulerDiscreteScheduler and plain.config.use_karras_sigmas
    # fastdiff: a pipeline loaded with diffusers' scheduler gets the drop-in back from accelerate_pipeline
    loaded.scheduler = plain
    accelerate_pipeline(loaded, kernels="torch")
    assert type(loaded.scheduler) is integration.FastEulerDiscreteScheduler
    assert loaded.scheduler.config.use_karras_sigmas


def test_accelerate_pipeline_swaps_every_drop_in():
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    for name, config in CONFIGS.items():
        pipe.scheduler = getattr(diffusers, name)(**config)
        accelerate_pipeline(pipe, kernels="torch")
        assert type(pipe.scheduler) is getattr(integration, f"Fast{name}")
        expected = public(getattr(diffusers, name)(**config).config)
        assert {k: pipe.scheduler.config[k] for k in expected} == expected
    # a configuration the table cannot express is kept, with the reason
    pipe.scheduler = diffusers.LCMScheduler(rescale_betas_zero_snr=True)
    # (epsilon prediction at the zero-SNR timestep 999: x0 = x / 0)
    with pytest.warns(
        UserWarning, match="kept LCMScheduler: prediction_type='epsilon' cannot reach the zero-SNR"
    ):
        accelerate_pipeline(pipe, kernels="torch")
    assert type(pipe.scheduler) is diffusers.LCMScheduler


def test_unsupported_step_arguments_and_timesteps_raise():
    ddim = integration.FastDDIMScheduler()
    ddim.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="timestep 5 is not one of this scheduler's timesteps"):
        ddim.step(x, 5, x)
    with pytest.raises(ValueError, match="run 'set_timesteps'"):
        integration.FastLCMScheduler().step(x, 999, x)
    flow = integration.FastFlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        flow.set_timesteps(4)


def test_euler_steps_before_set_timesteps_as_diffusers_does():
    """diffusers' Euler schedulers step through every training timestep until set_timesteps is called."""
    for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        config = dict(timestep_spacing="leading", prediction_type="v_prediction")
        ref, fast = getattr(diffusers, name)(**config), getattr(integration, f"Fast{name}")(**config)
        x, m = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
        for t in (ref.timesteps[0], ref.timesteps[1]):
            a = ref.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
            b = fast.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)  # x ~ sigma_max z ~ 157 z


def test_builders_that_take_begin_index_get_diffusers_begin_index(monkeypatch):
    """img2img pipelines call set_begin_index after set_timesteps: a builder that takes begin_index (multistep
    tables restart their warm-up there) is called again with it."""
    from fastdiff.samplers import DIFFUSERS_BUILDERS

    real = DIFFUSERS_BUILDERS["EulerDiscreteScheduler"]
    seen = []

    def builder(scheduler, num_steps, *, begin_index=0, **kwargs):
        seen.append(begin_index)
        return real(scheduler, num_steps, **kwargs)

    monkeypatch.setitem(DIFFUSERS_BUILDERS, "EulerDiscreteScheduler", builder)
    fast = integration.FastEulerDiscreteScheduler()
    fast.set_timesteps(10)
    fast.set_begin_index(4)
    x = torch.zeros(1, 1, 2, 2)
    fast.step(x, fast.timesteps[4], x)
    assert seen == [0, 4] and fast.step_index == 5

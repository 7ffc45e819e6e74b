"""The generic Fast<Name> drop-in mechanism (fastdiff.integrations.diffusers.DROP_INS), for every entry of DROP_INS:
the drop-in keeps diffusers' interface (config, signatures, timesteps, scale_model_input, init_noise_sigma, order,
save / load, pickling), is swapped in by accelerate_pipeline (a scheduler it cannot swap is kept with exactly one
one-line warning), and a pipeline saved with it loads back with plain diffusers (DiffusionPipeline.from_pretrained;
its scheduler folder with diffusers' own class) and with fastdiff. Also the refusals users meet: zero-SNR linear
betas (not a schedule), a learned-variance model output without its variance channels.
Numerical parity per family is in tests/test_samplers_<family>.py and tests/test_integrations_diffusers.py.
"""

import copy
import inspect
import pickle
import warnings

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
    "DPMSolverMultistepScheduler": dict(
        algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True
    ),
    "UniPCMultistepScheduler": dict(
        solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing"
    ),
}
SPECS = {spec.name: spec for spec in DROP_INS}


def test_every_drop_in_is_listed_and_configured_here():
    """The tests below run over SPECS, with CONFIGS[name]: a drop-in added to DROP_INS must be configured here."""
    assert len(SPECS) == len(DROP_INS)  # one entry per diffusers class
    assert set(CONFIGS) == set(SPECS)
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


@pytest.mark.parametrize("name", sorted(SPECS))
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


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pipeline_saved_with_a_drop_in_loads_back(name, tmp_path):
    base, fast_cls = getattr(diffusers, name), getattr(integration, f"Fast{name}")
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    pipe.scheduler = fast_cls(**CONFIGS[name])
    expected = public(base(**CONFIGS[name]).config)
    pipe.save_pretrained(tmp_path)
    # plain diffusers: the whole pipeline (the drop-in class is found in fastdiff's module), and the scheduler
    # folder as diffusers' own class
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fast_cls and public(loaded.scheduler.config) == expected
    plain = base.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(plain) is base and public(plain.config) == expected
    # fastdiff: a pipeline loaded with diffusers' scheduler gets the drop-in back from accelerate_pipeline
    loaded.scheduler = plain
    assert accelerate_warnings(loaded) == []  # no "kept <scheduler>" warning
    assert type(loaded.scheduler) is fast_cls and public(loaded.scheduler.config) == expected


def accelerate_warnings(pipe) -> list[str]:
    """The UserWarnings one accelerate_pipeline(pipe) call gives, each one even if an earlier call gave it too
    (diffusers' and numpy's own Deprecation- / FutureWarnings aside)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerate_pipeline(pipe, kernels="torch")
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_accelerate_pipeline_swaps_every_drop_in():
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    for name in SPECS:
        config = CONFIGS[name]
        pipe.scheduler = getattr(diffusers, name)(**config)
        assert accelerate_warnings(pipe) == []
        assert type(pipe.scheduler) is getattr(integration, f"Fast{name}")
        expected = public(getattr(diffusers, name)(**config).config)
        assert {k: pipe.scheduler.config[k] for k in expected} == expected
    # a scheduler with no drop-in, and a configuration the table cannot express (epsilon prediction at the zero-SNR
    # timestep 999: x0 = x / 0), are kept, each with exactly one one-line warning giving the reason
    for scheduler, reason in (
        (
            diffusers.PNDMScheduler(),
            "kept PNDMScheduler: PNDMScheduler has no fastdiff counterpart (these do: DDIM",
        ),
        (
            diffusers.LCMScheduler(rescale_betas_zero_snr=True),
            "kept LCMScheduler: prediction_type='epsilon' cannot reach the zero-SNR",
        ),
    ):
        pipe.scheduler = scheduler
        caught = accelerate_warnings(pipe)
        assert len(caught) == 1 and caught[0].startswith(f"accelerate_pipeline {reason}"), caught
        assert "\n" not in caught[0]
        assert pipe.scheduler is scheduler


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


@pytest.mark.parametrize(
    "name",
    [
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    ],
)
def test_zero_snr_linear_betas_are_refused_as_not_a_schedule(name):
    """diffusers' float32 alphas_cumprod of linear betas rescaled to zero SNR is ~4e-9 at t=998, then the 2**-24
    these schedulers put at the last timestep: it rises, so it is no noise schedule. fastdiff refuses it, through
    from_diffusers_scheduler and in a drop-in's set_timesteps (not at its first step)."""
    config = dict(beta_schedule="linear", rescale_betas_zero_snr=True)
    reference = getattr(diffusers, name)(**config)
    assert reference.alphas_cumprod[-1] > reference.alphas_cumprod[-2]  # what the refusal is about
    message = f"{name} with this config is not supported: alphas_cumprod must be non-increasing"
    reference.set_timesteps(10)
    with pytest.raises(ValueError, match=message):
        integration.from_diffusers_scheduler(reference, 10)
    fast = getattr(integration, f"Fast{name}").from_config(reference.config)
    with pytest.raises(ValueError, match=message):
        fast.set_timesteps(10)


def test_learned_range_drop_in_needs_the_variance_channels():
    """A drop-in DDPM with variance_type="learned_range" takes a 2C-channel model output (prediction, then the
    variance interpolation); C channels alone are refused with the counts, not misread."""
    fast = integration.FastDDPMScheduler(variance_type="learned_range")
    fast.set_timesteps(5)
    x = torch.zeros(2, 3, 4, 4)
    for channels in (3, 5):
        with pytest.raises(
            ValueError,
            match=rf"FastDDPMScheduler.step: a learned-variance model returns 6 channels \(prediction and "
            rf"variance\), got {channels}",
        ):
            fast.step(torch.zeros(2, channels, 4, 4), fast.timesteps[0], x)
    out = fast.step(torch.zeros(2, 6, 4, 4), fast.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == x.shape

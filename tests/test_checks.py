"""Sampling refuses inputs that cannot work (with what to do instead) and never returns NaN or inf."""

import numpy as np
import pytest
import torch
from test_engine import FakeEngine

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, NoiseSchedule, SamplingEngine
from fastdiff.errors import FastdiffError, NonFiniteError
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.samplers import SAMPLERS, build_sampler
from fastdiff.schedule import FlowSchedule

SCHEDULE = NoiseSchedule.from_kind("linear")
SAMPLER = DDIMSampler(SCHEDULE, num_steps=6)
SHAPE = (3, 2)


def nan_from(step):
    """A denoiser that is tame until `step` of SAMPLER, then returns NaN for sample 1 only."""
    bad_t = int(SAMPLER.timesteps[step])

    def model(x, t, **_):
        out = torch.tanh(x)
        if int(t[0]) <= bad_t:
            out = out.clone()
            out[1] = float("nan")
        return out

    return model


RUNNERS = {
    "sample": lambda model: lambda shape, **kw: fastdiff.sample(model, SAMPLER, shape, **kw),
    "engine": lambda model: SamplingEngine(model, SAMPLER, backend="eager").sample,
    "engine-step-graph": lambda model: FakeEngine(model, SAMPLER, graph_mode="step").sample,
}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("step", [0, 3])
def test_nan_is_raised_with_its_step(runner, step):
    run = RUNNERS[runner](nan_from(step))
    with pytest.raises(
        NonFiniteError, match=rf"first after step {step} \(timestep \d+\), in 1 of 3 samples \(1\)"
    ):
        run(SHAPE, generator=torch.Generator().manual_seed(0))
    assert issubclass(NonFiniteError, FastdiffError)


def test_nan_in_a_loop_graph_is_caught_at_the_end():
    run = FakeEngine(nan_from(2), SAMPLER, graph_mode="loop").sample
    with pytest.raises(NonFiniteError) as info:
        run(SHAPE, generator=torch.Generator().manual_seed(0))
    # The whole loop is one replay, so the first bad step is only seen after the last one.
    assert info.value.step == len(SAMPLER.timesteps) - 1


def test_nan_weights_raise():
    model = MLPDenoiser(dim=2).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="first after step 0"):
        fastdiff.sample(model, SAMPLER, SHAPE)


def test_ddim_invert_and_sdedit_check_too():
    x0 = torch.zeros(SHAPE)
    with pytest.raises(NonFiniteError):
        fastdiff.ddim_invert(nan_from(0), SAMPLER, x0)
    with pytest.raises(NonFiniteError):
        fastdiff.sdedit(nan_from(5), SAMPLER, x0, 0.5)


def test_finite_runs_are_untouched():
    x = fastdiff.sample(
        lambda x, t: torch.tanh(x), SAMPLER, SHAPE, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(x).all()


def test_absurd_eta_and_guidance_are_refused_up_front():
    with pytest.raises(ValueError, match="eta=1e\\+300 is too large"):
        DDIMSampler(SCHEDULE, num_steps=6, eta=1e300)
    for scale in (1e39, 1e20, -1001.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"guidance_scale must be a number in \[-1000, 1000\]"):
            fastdiff.sample(
                lambda x, t, **c: x,
                SAMPLER,
                SHAPE,
                cond={"y": torch.zeros(3)},
                uncond={"y": None},
                guidance_scale=scale,
            )
    engine = SamplingEngine(lambda x, t, **c: x, SAMPLER, backend="eager")
    with pytest.raises(ValueError, match=r"guidance_scale must be a number in \[-1000, 1000\] .*got 1e\+20"):
        engine.sample(SHAPE, cond={"y": torch.zeros(3)}, uncond={"y": None}, guidance_scale=1e20)


def test_numpy_integer_steps_are_accepted():
    for cls in (DDIMSampler, DDPMSampler):
        assert torch.equal(cls(SCHEDULE, np.int64(10)).table.coeffs, cls(SCHEDULE, 10).table.coeffs)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(SCHEDULE, np.float64(10))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_takes_any_integral_step_count(name):
    schedule = FlowSchedule(1000) if name.startswith("flow") else SCHEDULE
    want = build_sampler(name, schedule, 10).table.coeffs
    for steps in (np.int64(10), np.int32(10), np.uint16(10)):
        assert torch.equal(build_sampler(name, schedule, steps).table.coeffs, want), type(steps)
    for steps in (np.float64(10), True, np.bool_(True)):
        with pytest.raises((ValueError, TypeError), match="num_steps"):
            build_sampler(name, schedule, steps)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLPDenoiser(dim=2).eval()


@pytest.mark.parametrize("api", ["sample", "engine"])
def test_dtype_and_device_are_checked_with_a_fix(mlp, api):
    run = (
        fastdiff.sample
        if api == "sample"
        else (lambda m, s, shape, **kw: SamplingEngine(m, s, backend="eager").sample(shape, **kw))
    )
    with pytest.raises(TypeError, match=r"x_T is float64 but the model's weights are float32: pass x_T.to"):
        run(mlp, SAMPLER, SHAPE, x_T=torch.zeros(SHAPE, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        run(mlp, SAMPLER, SHAPE, dtype=torch.int64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': this torch build has no usable CUDA GPU"):
            run(mlp, SAMPLER, SHAPE, device="cuda")
    half = fastdiff.accelerate(mlp, dtype=torch.float16)
    with pytest.raises(
        TypeError, match=r"x is float32 but the model's weights are float16: pass dtype=torch.float16"
    ):
        run(half, SAMPLER, SHAPE)
    # The advice works.
    out = run(half, SAMPLER, SHAPE, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()

import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(kind):
    ours = NoiseSchedule.from_kind(kind, 1000, 1e-4, 0.02)
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_NAME[kind], beta_start=1e-4, beta_end=0.02)
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    # diffusers computes in float32; ours is float64, so agreement is to float32 rounding.
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.alphas, 1 - ours.betas)


def test_from_diffusers_takes_the_schedulers_own_numbers():
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.from_diffusers(ref)
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod)
    from_config = NoiseSchedule.from_diffusers(ref.config)
    assert from_config.kind == "scaled_linear"
    torch.testing.assert_close(from_config.alphas_cumprod, ours.alphas_cumprod, rtol=1e-5, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 333, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    if steps_offset and num_steps == 1000 and spacing == "leading":
        pytest.skip("diffusers itself yields timestep 1000, outside the schedule, here")
    sched = NoiseSchedule.from_kind("linear")
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = sched.timesteps(num_steps, spacing, steps_offset if spacing == "leading" else 0)
    assert torch.equal(ours, ref.timesteps)


def test_q_sample_closed_form_and_per_sample_t():
    sched = NoiseSchedule.from_kind("linear")
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    out = sched.q_sample(x0, t, noise)
    ref = diffusers.DDPMScheduler().add_noise(x0, noise, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    abar = sched.alphas_cumprod[500]
    torch.testing.assert_close(
        sched.q_sample(x0, 500, noise), (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()
    )


def test_q_sample_matches_empirical_moments():
    sched = NoiseSchedule.from_kind("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.5)
    xt = sched.q_sample(x0, 300, torch.randn(x0.shape, generator=g))
    abar = float(sched.alphas_cumprod[300])
    assert abs(xt.mean().item() - 0.5 * np.sqrt(abar)) < 0.01
    assert abs(xt.var().item() - (1 - abar)) < 0.01


def test_from_betas_roundtrip():
    betas = torch.linspace(1e-4, 0.02, 100)
    sched = NoiseSchedule.from_betas(betas)
    torch.testing.assert_close(sched.betas, betas.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: NoiseSchedule.from_kind("quadratic"), "kind"),
        (lambda: NoiseSchedule.from_kind("linear", 0), "num_train_timesteps"),
        (lambda: NoiseSchedule.from_kind("linear", beta_start=0.1, beta_end=0.01), "beta_start"),
        (lambda: NoiseSchedule.from_betas([0.1, 1.5]), "betas"),
        (lambda: NoiseSchedule.from_kind("linear", 10).timesteps(11), "num_steps"),
        (lambda: NoiseSchedule.from_kind("linear", 10).timesteps(0), "num_steps"),
        (lambda: NoiseSchedule.from_kind("linear", 10).timesteps(5, "random"), "spacing"),
        (
            lambda: NoiseSchedule.from_kind("linear", 10).q_sample(torch.zeros(2, 3), 10, torch.zeros(2, 3)),
            "t must",
        ),
        (
            lambda: NoiseSchedule.from_kind("linear", 10).q_sample(torch.zeros(2, 3), 1, torch.zeros(2, 4)),
            "noise",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()

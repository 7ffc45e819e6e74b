import itertools

import pytest
import torch
from diffusers_parity import diffusers_loop, drop_in_loop, parity

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, NoiseSchedule, from_diffusers_scheduler

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 1, 3, 3)
KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
TOL = 1e-5  # binding: max abs difference after the whole loop, float32


def toy_model(x, t, **_):
    """A smooth stand-in for a trained network: depends on x and t, cheap, deterministic."""
    return torch.tanh(0.7 * x + 1e-3 * t.float().reshape(-1, *([1] * (x.dim() - 1))) - 0.2)


def gaussian_denoiser(alphas_cumprod, prediction_type, mu=0.3, sigma=0.5):
    """The optimal predictor for data ~ N(mu, sigma^2) (plus a small nonlinearity), in the given parameterisation.

    A realistic stand-in for a trained network: samples stay O(1), so an absolute tolerance is meaningful.
    """
    abar_all = alphas_cumprod.double()

    def model(x, t, **_):
        abar = abar_all[t.long()].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        sa, sb = abar.sqrt(), (1 - abar).sqrt()
        eps = sb * (x - sa * mu) / (abar * sigma**2 + 1 - abar) + 0.05 * torch.tanh(x)
        x0 = (x - sb * eps) / sa
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return sa * eps - sb * x0

    return model


def assert_parity(
    cls, config, sampler, monkeypatch, *, seed, model=None, steps=None, timesteps=None, eta=None
):
    """fastdiff.sample on `sampler` and the Fast drop-in of `cls` in diffusers' loop (every step counted through
    sampler_step while diffusers' own step() fails the test: `drop_in_loop`) against diffusers' `cls(**config)` in
    float32 and in float64 (tests/diffusers_parity.py), same x_T and noise. Max abs difference to diffusers' float32
    result <= 1e-5 (binding), except where diffusers' own float32 result is off its float64 run by more than that
    (ill-conditioned steps, e.g. 1/sqrt(alphas_cumprod[999]) ~ 1e4 for the cosine schedule): there within twice
    diffusers' own error of diffusers, and (once that error is over TOL / 2) at least as close to the float64 result
    as twice diffusers' own error (the policy of the kernel tolerances). `model`: `gaussian_denoiser` by default."""
    if model is None:
        model = gaussian_denoiser(cls(**config).alphas_cumprod, cls(**config).config.prediction_type)
    kw = dict(
        seed=seed,
        shape=SHAPE,
        step_kwargs=None if eta is None else {"eta": eta},
        set_timesteps=None if timesteps is None else {"timesteps": timesteps},
    )
    expected = diffusers_loop(cls, config, model, steps, **kw)
    truth = diffusers_loop(cls, config, model, steps, dtype=torch.float64, **kw)
    assert torch.isfinite(expected).all()
    got = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(seed))
    dropped, table_steps = drop_in_loop(cls, config, model, steps, monkeypatch, **kw)
    assert table_steps == len(sampler.timesteps), "every drop-in step must be one call of sampler_step"
    for name, result in (("fastdiff.sample", got), ("drop-in", dropped)):
        assert torch.isfinite(result).all(), name
        ok, err, own_err = parity(result, expected, truth)
        assert ok, (name, err, own_err)
        if own_err > TOL / 2:
            assert (result.double() - truth).abs().max().item() <= max(TOL, 2 * own_err), (name, own_err)
    return got


def fastdiff_loop(sampler, x, seed):
    model = gaussian_denoiser(sampler.schedule.alphas_cumprod, sampler.prediction_type)
    return fastdiff.sample(model, sampler, x.shape, x_T=x, generator=torch.Generator().manual_seed(seed))


def _x_T():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))


DDIM_GRID = [
    (kind, spacing, eta, clip, pred, steps)
    for kind, spacing, eta, clip, pred, steps in itertools.product(
        KINDS,
        ["leading", "trailing", "linspace"],
        [0.0, 0.5, 1.0],
        [True, False],
        ["epsilon", "sample", "v_prediction"],
        [1, 10, 50],
    )
] + [
    (kind, "leading", eta, False, pred, 1000)
    for kind in KINDS
    for eta in (0.0, 1.0)
    for pred in ("epsilon", "v_prediction")
]


@pytest.mark.parametrize(("kind", "spacing", "eta", "clip", "pred", "steps"), DDIM_GRID)
def test_ddim_matches_diffusers(kind, spacing, eta, clip, pred, steps, monkeypatch):
    config = dict(beta_schedule=KINDS[kind], timestep_spacing=spacing, clip_sample=clip, prediction_type=pred)
    sampler = from_diffusers_scheduler(diffusers.DDIMScheduler(**config), steps, eta=eta)
    assert isinstance(sampler, DDIMSampler)
    assert_parity(diffusers.DDIMScheduler, config, sampler, monkeypatch, seed=7, steps=steps, eta=eta)


DDPM_GRID = [
    (kind, spacing, var, clip, pred, steps)
    for kind, spacing, var, clip, pred, steps in itertools.product(
        KINDS,
        ["leading", "trailing", "linspace"],
        ["fixed_small", "fixed_large"],
        [True, False],
        ["epsilon", "sample", "v_prediction"],
        [1, 10, 50],
    )
] + [
    (kind, "leading", var, True, pred, 1000)
    for kind in KINDS
    for var in ("fixed_small", "fixed_large")
    for pred in ("epsilon", "sample")
]


@pytest.mark.parametrize(("kind", "spacing", "var", "clip", "pred", "steps"), DDPM_GRID)
def test_ddpm_matches_diffusers(kind, spacing, var, clip, pred, steps, monkeypatch):
    config = dict(
        beta_schedule=KINDS[kind],
        timestep_spacing=spacing,
        variance_type=var,
        clip_sample=clip,
        prediction_type=pred,
    )
    sampler = from_diffusers_scheduler(diffusers.DDPMScheduler(**config), steps)
    assert isinstance(sampler, DDPMSampler)
    assert_parity(diffusers.DDPMScheduler, config, sampler, monkeypatch, seed=11, steps=steps)


def test_from_kind_schedule_agrees_with_diffusers_to_float32_rounding():
    ref = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear"), 50)
    x = _x_T()
    model = gaussian_denoiser(ref.alphas_cumprod, "epsilon")
    diff = (fastdiff_loop(sampler, x, 0) - diffusers_run(ref, x, 0, model, 50, eta=0.0)).abs().max().item()
    assert diff <= 1e-4


def test_ddpm_respaced_betas_are_improved_ddpm():
    sched = NoiseSchedule.from_kind("linear")
    sampler = DDPMSampler(sched, 10, variance="fixed_large", clip_sample=False)
    ts = sampler.timesteps
    abar = sched.alphas_cumprod[ts]
    abar_prev = torch.cat([abar[1:], abar.new_ones(1)])
    beta = 1 - abar / abar_prev
    # fixed_large: the noise scale of step i is the respaced beta'_i
    torch.testing.assert_close(sampler.table.column("s")[:-1], beta[:-1].sqrt())
    assert sampler.table.column("s")[-1] == 0  # t = 0: no noise


def test_same_seed_same_images_different_seed_different():
    sampler = DDPMSampler(NoiseSchedule.from_kind("linear", 100), 20)
    a = fastdiff.sample(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(1))
    b = fastdiff.sample(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(1))
    c = fastdiff.sample(toy_model, sampler, SHAPE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_per_sample_generators_make_samples_independent_of_batch():
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear", 100), 10, eta=1.0)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = fastdiff.sample(toy_model, sampler, (2, 1, 3, 3), generator=gens([5, 6]))
    one = fastdiff.sample(toy_model, sampler, (1, 1, 3, 3), generator=gens([6]))
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-6)


class CondModel(torch.nn.Module):
    """Class-conditional toy denoiser whose null label is `num_classes`, with call counting."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []
        self.t_strides = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(x.shape[0])
        self.t_strides.append(t.stride())
        return toy_model(x, t) + 0.1 * class_labels.float().reshape(-1, 1, 1, 1)

    def null_cond(self, cond):
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}


def test_classifier_free_guidance_is_one_batched_call_and_matches_formula():
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear", 100), 5)
    model = CondModel()
    y = torch.tensor([0, 2])
    x = _x_T()
    got = fastdiff.sample(model, sampler, SHAPE, x_T=x, cond={"class_labels": y}, guidance_scale=3.0)
    assert model.calls == [4] * 5  # cond and uncond in one call of twice the batch
    assert model.t_strides == [(0,)] * 5  # one timestep for the doubled batch, so models embed it once

    def guided(x, t):
        e_c = model(x, t, class_labels=y)
        e_u = model(x, t, class_labels=torch.full_like(y, 3))
        return e_u + 3.0 * (e_c - e_u)

    expected = fastdiff.sample(guided, sampler, SHAPE, x_T=x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_progress_and_callback():
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear", 100), 4)
    seen = []
    fastdiff.sample(
        toy_model,
        sampler,
        SHAPE,
        progress=True,
        callback=lambda d: seen.append((d["i"], d["t"], d["x0"].shape)),
    )
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == sampler.timesteps.tolist()


def test_sdedit_strength_one_equals_sampling_and_small_strength_stays_close():
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear", 1000), 20)
    x0 = torch.rand(SHAPE) * 2 - 1
    full = fastdiff.sdedit(toy_model, sampler, x0, 1.0, generator=torch.Generator().manual_seed(0))
    assert full.shape == x0.shape
    near = fastdiff.sdedit(toy_model, sampler, x0, 0.05, generator=torch.Generator().manual_seed(0))
    far = fastdiff.sdedit(toy_model, sampler, x0, 0.9, generator=torch.Generator().manual_seed(0))
    assert (near - x0).abs().mean() < (far - x0).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        fastdiff.sdedit(toy_model, sampler, x0, 0.0)


def test_inpaint_keeps_known_region_exactly():
    sampler = DDPMSampler(NoiseSchedule.from_kind("linear", 100), 10)
    x0 = torch.rand(SHAPE) * 2 - 1
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., :, 1:] = 1  # generate the right two columns
    out = fastdiff.inpaint(toy_model, sampler, x0, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :, :1], x0[..., :, :1])
    assert not torch.allclose(out[..., :, 1:], x0[..., :, 1:])
    with pytest.raises(ValueError, match="mask"):
        fastdiff.inpaint(toy_model, sampler, x0, torch.full((1, 1, 3, 3), 0.5))


def test_ddim_inversion_round_trip_with_a_linear_model():
    # Inversion approximates eps(x_t, t) by eps(x_{t-1}, t), a first-order error per step: the round trip must
    # reconstruct x0 to 0.1 at 100 steps, get better with more steps, and an unrelated x_T must decode elsewhere.
    schedule = NoiseSchedule.from_kind("linear", 1000)
    model = gaussian_denoiser(schedule.alphas_cumprod, "epsilon")
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def round_trip_error(steps):
        sampler = DDIMSampler(schedule, steps)
        rec = fastdiff.sample(model, sampler, SHAPE, x_T=fastdiff.ddim_invert(model, sampler, x0))
        return (rec - x0).abs().max().item()

    err20, err100 = round_trip_error(20), round_trip_error(100)
    assert err100 < 0.1
    assert err100 < err20
    other = fastdiff.sample(model, DDIMSampler(schedule, 100), SHAPE, x_T=torch.randn(SHAPE))
    assert (other - x0).abs().max() > 0.3


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda s: fastdiff.sample(toy_model, s, SHAPE, x_T=torch.full(SHAPE, float("nan"))),
            ValueError,
            "NaN",
        ),
        (lambda s: fastdiff.sample(toy_model, s, SHAPE, x_T=torch.zeros(1, 1, 3, 3)), ValueError, "x_T"),
        (lambda s: fastdiff.sample(toy_model, s, (2, 0, 3)), ValueError, "shape"),
        (lambda s: fastdiff.sample(toy_model, s, SHAPE, guidance_scale=2.0), ValueError, "guidance_scale"),
        (
            lambda s: fastdiff.sample(toy_model, s, SHAPE, cond={"y": torch.zeros(2)}, guidance_scale=2.0),
            ValueError,
            "uncond",
        ),
        (lambda s: fastdiff.sample(toy_model, "ddim", SHAPE), TypeError, "sampler"),
        (lambda s: fastdiff.sample(lambda x, t: x[:1], s, SHAPE), ValueError, "denoiser returned"),
        (lambda s: DDIMSampler(NoiseSchedule.from_kind("linear", 10), 11), ValueError, "num_steps"),
        (lambda s: DDIMSampler(NoiseSchedule.from_kind("linear", 10), 5, eta=-1), ValueError, "eta"),
        (
            lambda s: DDPMSampler(NoiseSchedule.from_kind("linear", 10), variance="bogus"),
            ValueError,
            "variance",
        ),
        (
            lambda s: DDPMSampler(NoiseSchedule.from_kind("linear", 10), prediction_type="x"),
            ValueError,
            "prediction_type",
        ),
        (
            lambda s: fastdiff.ddim_invert(
                toy_model, DDPMSampler(NoiseSchedule.from_kind("linear", 10)), torch.zeros(SHAPE)
            ),
            TypeError,
            "DDIMSampler",
        ),
    ],
)
def test_bad_input(call, exc, match):
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear", 100), 5)
    with pytest.raises(exc, match=match):
        call(sampler)


# -- DDPM / DDIM options of issue 12: every variance_type (learned ones: the model returns 2C channels), dynamic
# thresholding, rescale_betas_zero_snr, custom timesteps. Parity criterion (binding, as above): after the whole loop
# max |ours - diffusers_fp32| <= 1e-5, or, where diffusers' own float32 result is further than that from diffusers
# run in float64 (scheduler and model function in float64), at most 2x diffusers' own distance to its float64
# result. Random configurations over every option, 1/4/10/25/50 steps, with and without noise (DDIM eta 0 / > 0;
# DDPM always draws), on a cheap analytic model: a fixed random linear map + tanh of x and t.


def analytic_model(variance_type=None, dim=9, seed=0):
    """m = tanh(W x + 1e-3 t - 0.1) on the flattened sample; with a learned variance type, also C variance channels
    (v in [-1, 1] for learned_range, a positive variance for learned)."""
    g = torch.Generator().manual_seed(seed)
    w, w2 = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5 for _ in range(2))

    def model(x, t, **_):
        flat = x.reshape(x.shape[0], -1)
        tt = 1e-3 * t.to(flat.dtype).reshape(-1, 1)
        m = torch.tanh(flat @ w.to(flat.dtype) + tt - 0.1).reshape(x.shape)
        if variance_type not in ("learned", "learned_range"):
            return m
        v = torch.tanh(flat @ w2.to(flat.dtype) - tt).reshape(x.shape)
        if variance_type == "learned":
            v = 1e-3 * (1.5 + v)  # a positive variance of the order of the betas
        return torch.cat([m, v], dim=1)

    return model


def diffusers_run(scheduler, x, seed, model, steps=None, timesteps=None, eta=None):
    """`scheduler`'s loop from x with `model`, noise from a generator seeded with `seed`."""
    scheduler.set_timesteps(steps, timesteps=timesteps) if timesteps is not None else scheduler.set_timesteps(
        steps
    )
    g = torch.Generator().manual_seed(seed)
    kwargs = {"eta": eta} if eta is not None else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, generator=g, **kwargs).prev_sample
    return x.float()


def _random_configs(family, count, seed):
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    out = []
    for _ in range(count):
        cfg = {
            "beta_schedule": pick(list(KINDS.values())),
            "prediction_type": pick(["epsilon", "sample", "v_prediction"]),
            "timestep_spacing": pick(["leading", "trailing", "linspace"]),
            "clip_sample": pick([True, False]),
            "thresholding": pick([True, False]),
            "dynamic_thresholding_ratio": pick([0.995, 0.9, 0.6]),
            "sample_max_value": pick([1.0, 1.5, 3.0]),
            "rescale_betas_zero_snr": pick([True, False]),
        }
        if family == "ddpm":
            cfg["variance_type"] = pick(list(VARIANCE_TYPES))
        if cfg["rescale_betas_zero_snr"] and cfg["prediction_type"] == "epsilon":
            cfg["timestep_spacing"] = "leading"  # x0 = x / 0 at the zero-SNR timestep (tested separately)
        out.append((cfg, pick([1, 4, 10, 25, 50]), pick([0.0, 0.0, 0.5, 1.0])))
    return out


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@pytest.mark.parametrize(("config", "steps", "eta"), _random_configs("ddpm", 24, seed=1))
def test_ddpm_options_match_diffusers(config, steps, eta, monkeypatch):
    sampler = from_diffusers_scheduler(diffusers.DDPMScheduler(**config), steps)
    assert sampler.table.learned_variance == (
        config["variance_type"] if "learned" in config["variance_type"] else None
    )
    assert (sampler.table.threshold is not None) == config["thresholding"]
    model = analytic_model(config["variance_type"])
    assert_parity(diffusers.DDPMScheduler, config, sampler, monkeypatch, seed=5, model=model, steps=steps)


@pytest.mark.parametrize(("config", "steps", "eta"), _random_configs("ddim", 16, seed=2))
def test_ddim_options_match_diffusers(config, steps, eta, monkeypatch):
    sampler = from_diffusers_scheduler(diffusers.DDIMScheduler(**config), steps, eta=eta)
    model = analytic_model()
    assert_parity(
        diffusers.DDIMScheduler, config, sampler, monkeypatch, seed=5, model=model, steps=steps, eta=eta
    )


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("timesteps", [[999, 700, 420, 100, 3], [800, 799, 10], [0]])
def test_ddpm_custom_timesteps_match_diffusers(variance_type, timesteps, monkeypatch):
    config = dict(variance_type=variance_type, thresholding=True)
    ref = diffusers.DDPMScheduler(**config)
    ref.set_timesteps(timesteps=timesteps)
    sampler = from_diffusers_scheduler(ref, len(timesteps))
    assert sampler.timesteps.tolist() == timesteps
    assert torch.equal(
        sampler.table.coeffs,
        DDPMSampler(
            sampler.schedule, variance=variance_type, thresholding=True, timesteps=timesteps
        ).table.coeffs,
    )
    model = analytic_model(variance_type)
    assert_parity(
        diffusers.DDPMScheduler, config, sampler, monkeypatch, seed=5, model=model, timesteps=timesteps
    )


def test_fixed_large_log_is_the_glide_std_where_diffusers_returns_nan():
    # diffusers takes sqrt(log(beta)) for fixed_large_log (NaN for every beta < 1); we use exp(log(beta) / 2).
    config = {"variance_type": "fixed_large_log"}
    sampler = from_diffusers_scheduler(diffusers.DDPMScheduler(**config), 10)
    large = DDPMSampler(sampler.schedule, 10, variance="fixed_large").table
    torch.testing.assert_close(sampler.table.column("s"), large.column("s"), rtol=1e-12, atol=0)
    x = _x_T()
    theirs = diffusers_run(diffusers.DDPMScheduler(**config), x, 0, analytic_model(), 10)
    assert theirs.isnan().all()
    ref_large = diffusers_run(
        diffusers.DDPMScheduler(variance_type="fixed_large"), x, 0, analytic_model(), 10
    )
    ours = fastdiff.sample(
        analytic_model(), sampler, x.shape, x_T=x, generator=torch.Generator().manual_seed(0)
    )
    assert (ours - ref_large).abs().max() <= TOL


def test_zero_snr_schedule_and_epsilon_at_the_zero_snr_step():
    for kind in KINDS.values():
        ref = diffusers.DDIMScheduler(beta_schedule=kind, rescale_betas_zero_snr=True)
        ours = NoiseSchedule.from_diffusers(dict(ref.config)).alphas_cumprod  # from the config alone
        assert ours[-1] == 0 and ref.alphas_cumprod[-1] == 0
        assert (ours - ref.alphas_cumprod.double()).abs().max() <= 1e-6  # diffusers computes in float32
    with pytest.raises(ValueError, match="zero-SNR"):
        from_diffusers_scheduler(
            diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10
        )


def test_drop_ins_run_the_new_options_on_the_table_path(monkeypatch):
    # The Fast drop-ins in diffusers' own loop: the same numbers as fastdiff.sample, and every step one call of
    # sampler_step while diffusers' step() fails the test (`drop_in_loop`).
    cases = [
        (diffusers.DDPMScheduler, {"variance_type": "learned_range", "thresholding": True}, {"steps": 10}),
        (
            diffusers.DDPMScheduler,
            {"variance_type": "learned", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
            {"steps": 25},
        ),
        (diffusers.DDPMScheduler, {"variance_type": "fixed_small_log"}, {"timesteps": [900, 450, 20]}),
        (
            diffusers.DDIMScheduler,
            {"thresholding": True, "sample_max_value": 2.0, "timestep_spacing": "trailing"},
            {"steps": 4, "eta": 0.5},
        ),
    ]
    for base, config, run in cases:
        model = analytic_model(config.get("variance_type"))
        eta, timesteps = run.get("eta"), run.get("timesteps")
        got, table_steps = drop_in_loop(
            base,
            config,
            model,
            run.get("steps"),
            monkeypatch,
            seed=3,
            shape=SHAPE,
            step_kwargs=None if eta is None else {"eta": eta},
            set_timesteps=None if timesteps is None else {"timesteps": timesteps},
        )
        ref = base(**config)
        ref.set_timesteps(run.get("steps"), **({} if timesteps is None else {"timesteps": timesteps}))
        sampler = from_diffusers_scheduler(ref, len(ref.timesteps), **({} if eta is None else {"eta": eta}))
        assert table_steps == len(sampler.timesteps) == len(timesteps or ref.timesteps) > 0
        ours = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator().manual_seed(3))
        assert (got - ours).abs().max() <= TOL, config


def test_learn_sigma_unet_samples_with_learned_range_and_with_ddim():
    from fastdiff.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(
        UNetConfig.preset("digits", model_channels=16, num_res_blocks=1, num_groups=4, learn_sigma=True)
    ).eval()
    shape = (2, 1, 8, 8)
    with torch.no_grad():
        out = model(torch.randn(shape), torch.tensor([5, 5]), class_labels=torch.tensor([1, 2]))
    assert out.shape == (2, 2, 8, 8)  # eps, then the variance interpolation
    cond = {"class_labels": torch.tensor([1, 2])}
    schedule = NoiseSchedule.from_kind("linear", 1000)
    for sampler in (DDPMSampler(schedule, 10, variance="learned_range"), DDIMSampler(schedule, 10)):
        x = fastdiff.sample(model, sampler, shape, cond=cond, generator=torch.Generator().manual_seed(0))
        assert x.shape == shape and torch.isfinite(x).all()


def test_build_sampler_names_the_bad_option():
    from fastdiff.errors import OptionError
    from fastdiff.samplers import build_sampler

    schedule = NoiseSchedule.from_kind("linear", 100)
    with pytest.raises(OptionError, match="steps 101 is larger than the model's schedule") as err:
        build_sampler("ddim", schedule, 101)
    assert err.value.option == "num_steps" and isinstance(err.value, ValueError)
    with pytest.raises(OptionError, match="takes no option") as err:
        build_sampler("euler", schedule, 10, eta=0.5)
    assert err.value.option == "eta"
    assert build_sampler("euler", schedule, 10, eta=0.0).num_steps == 10  # the neutral value is dropped

"""fastdiff.table: the v2 schema, StepTable.from_columns, and apply_row (the reference every step implementation is
tested against), plus the loop's handling of the sampler state (history, xs, k_in, learned variance, init_sigma).

Tolerances: apply_row computes in float32; against float64 hand computations it must agree to
1e-5 * max(1, max|expected|). Against the v1 formula (8 columns) it must be bitwise equal: the same float32 ops.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.samplers import SAMPLERS, DDIMSampler, DDPMSampler, build_sampler, register
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import COLUMN, TABLE_COLUMNS, StepTable, apply_row, threshold_scale

SHAPE = (3, 2, 4, 4)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    err = (got.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= 1e-5 * scale, f"max error {err} > 1e-5 * {scale}"


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _row(**values) -> torch.Tensor:
    return StepTable.from_columns([10], **values).coeffs[0]


def test_schema_and_identity_defaults():
    assert TABLE_COLUMNS[:5] == ("k_in", "a", "b", "p", "q")
    assert TABLE_COLUMNS[-2:] == ("lv0", "lv1")
    assert len(set(TABLE_COLUMNS)) == len(TABLE_COLUMNS) == 20
    table = StepTable.from_columns([5, 3, 1], kind="t", a=[1.0, 2.0, 3.0], c=0.5)
    assert len(table) == 3 and table.kind == "t"
    for name in TABLE_COLUMNS:
        expected = {"k_in": [1.0] * 3, "xc_x": [1.0] * 3, "a": [1.0, 2.0, 3.0], "c": [0.5] * 3}.get(
            name, [0.0] * 3
        )
        assert table.column(name).tolist() == expected, name
    on = table.on("cpu")
    assert on.dtype == torch.float32 and on.shape == (3, 20) and table.on("cpu") is on
    assert not table.scales_input and not table.multistep and table.noisy_steps() == []
    assert table.new_state(SHAPE, "cpu", torch.float32) == (None, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(f1=1.0), "column 'f1' must be 0"),
        (dict(history="x0", history_slots=1, f2=1.0), "column 'f2' must be 0"),
        (dict(xc_s=1.0), "column 'xc_s' must be 0"),
        (dict(xc_x=2.0), "column 'xc_x' must be 1"),
        (dict(lv1=1.0), "column 'lv1' must be 0"),
        (dict(history="x0"), "go together"),
        (dict(history_slots=2), "go together"),
        (dict(history="h", history_slots=1), "history must be"),
        (dict(history="x0", history_slots=4), "history_slots"),
        (dict(clip=1.0, threshold=(0.9, 2.0)), "not both"),
        (dict(threshold=(1.5, 2.0)), "threshold"),
        (dict(learned_variance="fixed"), "learned_variance"),
        (dict(init_sigma=0.0), "init_sigma"),
        (dict(bogus=1.0), "unknown table columns"),
        (dict(a=[1.0, 2.0]), "2 values for 1 rows"),
        (dict(a=float("nan")), "finite"),
    ],
)
def test_from_columns_rejects_inconsistent_tables(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepTable.from_columns([10], **kwargs)


def test_apply_row_ddim_and_ddpm_against_hand_computed_values():
    schedule = NoiseSchedule.from_kind("linear", 1000)
    abar = schedule.alphas_cumprod
    x, m, z = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
    xd, md, zd = x.double(), m.double(), z.double()

    ddim = DDIMSampler(schedule, 10).table  # leading: 900, 800, ..., 0
    i, t, t_prev = 3, 600, 500
    x0 = (xd - (1 - abar[t]).sqrt() * md) / abar[t].sqrt()
    expected = abar[t_prev].sqrt() * x0 + (1 - abar[t_prev]).sqrt() * md
    got, h, xs = apply_row(ddim.coeffs[i], x, m)
    assert h is None and xs is None and got.dtype == torch.float32
    _close(got, expected)

    ddpm = DDPMSampler(schedule, 10, clip_sample=False).table
    beta = 1 - abar[t] / abar[t_prev]
    mean = (abar[t_prev].sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar[t_prev]) * xd) / (1 - abar[t])
    std = ((1 - abar[t_prev]) / (1 - abar[t]) * beta).sqrt()
    got, _, _ = apply_row(ddpm.coeffs[i], x, m, noise=z)
    _close(got, mean + std * zd)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("cfg", [False, True])
def test_apply_row_is_bitwise_the_v1_update(clip, cfg):
    # The 8-column update as the v1 kernel reference computed it, in float32.
    table = DDPMSampler(NoiseSchedule.from_kind("linear", 100), 10, prediction_type="v_prediction").table
    x, m, u, z = (_randn(*SHAPE, seed=s) for s in (4, 5, 6, 7))
    w = 3.5 if cfg else 1.0
    for i in (0, 4, 9):
        a, b, p, q, c, d, e, s = (table.on("cpu")[i, COLUMN[n]] for n in "abpqcdes")
        mm = u + w * (m - u) if cfg else m
        x0 = a * x + b * mm
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        v1 = c * x0 + d * (p * x + q * mm) + e * x + s * z
        got, _, _ = apply_row(
            table.on("cpu")[i], x, m, m_uncond=u if cfg else None, guidance_scale=w, noise=z, clip=clip
        )
        assert torch.equal(got, v1)


def test_history_rotation_and_f_columns():
    x, m = _randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)
    history = torch.stack([_randn(*SHAPE, seed=10 + k) for k in range(3)])
    # x_prev reads only h_k (f_k = 1): it must be exactly that slot, before the rotation.
    for k in (1, 2, 3):
        row = StepTable.from_columns([1], history="x0", history_slots=3, c=0.0, **{f"f{k}": 1.0}).coeffs[0]
        got, new_h, _ = apply_row(row, x, m, history=history, history_kind="x0")
        assert torch.equal(got, history[k - 1])
    # rotation: h1 <- x0 (or eps) of this row, h2 <- old h1, h3 <- old h2; the input is not modified
    row = _row(a=0.5, b=2.0, p=-1.0, q=3.0)
    before = history.clone()
    for kind, derived in (("x0", 0.5 * x + 2.0 * m), ("eps", -1.0 * x + 3.0 * m)):
        _, new_h, _ = apply_row(row, x, m, history=history, history_kind=kind)
        _close(new_h[0], derived)
        assert torch.equal(new_h[1:], history[:2])
    assert torch.equal(history, before)
    # one slot: the newest value only
    _, new_h, _ = apply_row(row, x, m, history=history[:1], history_kind="x0")
    assert new_h.shape == (1, *SHAPE)
    _close(new_h[0], 0.5 * x + 2.0 * m)
    # the pushed x0 is the clipped one
    _, new_h, _ = apply_row(row, x, m, history=history[:2], history_kind="x0", clip=0.1)
    assert new_h[0].abs().max() <= 0.1


def test_xs_corrector_and_xs_update():
    x, m, xs = _randn(*SHAPE, seed=11), _randn(*SHAPE, seed=12), _randn(*SHAPE, seed=13)
    h = torch.stack([_randn(*SHAPE, seed=14 + k) for k in range(2)])
    cols = dict(
        a=0.9, b=-0.3, xc_x=0.7, xc_s=0.2, xc_0=0.1, xc_1=-0.05, xc_2=0.03, c=0.4, e=0.8, f1=0.1, f2=-0.2
    )
    row = StepTable.from_columns([1], history="x0", history_slots=2, uses_xs=True, **cols).coeffs[0]
    got, new_h, new_xs = apply_row(row, x, m, history=h, history_kind="x0", xs=xs)
    xd, md, hd = x.double(), m.double(), h.double()
    x0 = 0.9 * xd - 0.3 * md
    xc = 0.7 * xd + 0.2 * xs.double() + 0.1 * x0 - 0.05 * hd[0] + 0.03 * hd[1]
    _close(new_xs, xc)
    _close(got, 0.4 * x0 + 0.8 * xc + 0.1 * hd[0] - 0.2 * hd[1])
    _close(new_h[0], x0)


@pytest.mark.parametrize("kind", ["learned_range", "learned"])
def test_learned_variance_noise_scale(kind):
    x, m, z = _randn(*SHAPE, seed=15), _randn(*SHAPE, seed=16), _randn(*SHAPE, seed=17)
    v = _randn(*SHAPE, seed=18).tanh() if kind == "learned_range" else _randn(*SHAPE, seed=18).exp() * 1e-3
    row = StepTable.from_columns(
        [1], learned_variance=kind, b=1.0, c=0.3, e=0.9, s=1.0, lv0=-5.0, lv1=1.5
    ).coeffs[0]
    got, _, _ = apply_row(row, x, m, noise=z, variance=v, learned_variance=kind)
    vv = v.double() if kind == "learned_range" else v.double().log()
    sigma = torch.exp(0.5 * (-5.0 + 1.5 * vv))
    _close(got, 0.3 * m.double() + 0.9 * x.double() + sigma * z.double())
    if kind == "learned":  # lv0 = 0, lv1 = 1 is diffusers' "learned": sqrt(predicted variance)
        row = StepTable.from_columns([1], learned_variance=kind, s=1.0, lv1=1.0).coeffs[0]
        got, _, _ = apply_row(row, x, m, noise=z, variance=v, learned_variance=kind)
        _close(got, v.double().sqrt() * z.double())


def _diffusers_threshold(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """diffusers' `_threshold_sample`, written out in torch: per sample, s = clamp(quantile(|x|, ratio), 1, max),
    then clamp(x, -s, s) / s."""
    b = sample.shape[0]
    flat = sample.float().reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(sample.dtype)


@pytest.mark.parametrize(("ratio", "max_value"), [(0.995, 1.5), (0.9, 3.0), (0.5, 1.0)])
def test_dynamic_threshold_matches_diffusers(ratio, max_value):
    x, m = 2.5 * _randn(*SHAPE, seed=19), _randn(*SHAPE, seed=20)
    row = _row(a=1.0, b=0.5, c=1.0)  # x_prev = thresholded x0
    x0 = x + 0.5 * m
    expected = _diffusers_threshold(x0, ratio, max_value)
    got, _, _ = apply_row(row, x, m, threshold=(ratio, max_value))
    _close(got, expected)
    assert (got.abs() <= 1.0 + 1e-6).all()
    # the precomputed per-sample scale gives the same result
    scale = threshold_scale(x0, ratio, max_value)
    assert scale.shape == (SHAPE[0],)
    assert torch.equal(apply_row(row, x, m, scale=scale)[0], got)
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
    )
    _close(got, sched._threshold_sample(x0))


# -- the loop: state buffers, k_in, learned variance, init_sigma -------------------------------------------------


def _multistep_table(n: int = 5) -> StepTable:
    g = torch.Generator().manual_seed(21)
    col = lambda: (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.4  # noqa: E731
    f1, f2, xc_1 = col(), col(), col()
    f1[0] = f2[:2] = xc_1[0] = 0.0  # rows that must not read history (it is zero there anyway)
    return StepTable.from_columns(
        torch.arange(n * 100, 0, -100),
        kind="test-multistep",
        history="x0",
        history_slots=2,
        uses_xs=True,
        learned_variance="learned_range",
        init_sigma=2.0,
        k_in=1.0 / (1.0 + torch.arange(n, dtype=torch.float64)),
        a=1.0 + col(),
        b=-0.5 + col(),
        q=1.0,
        xc_x=0.9 + col(),
        xc_s=col(),
        xc_0=col(),
        xc_1=xc_1,
        c=0.5 + col(),
        d=col(),
        e=0.6 + col(),
        f1=f1,
        f2=f2,
        s=torch.tensor([0.1, 0.0, 0.2, 0.0, 0.0], dtype=torch.float64)[:n],
        lv0=-2.0 + col(),
        lv1=col(),
    )


class _Sampler(fastdiff.samplers.Sampler):
    def __init__(self, table):
        self.table, self.schedule, self.prediction_type = (
            table,
            NoiseSchedule.from_kind("linear", 1000),
            "epsilon",
        )


def _two_c_model(calls):
    def model(x, t, **_):
        calls.append((x.clone(), t.clone()))
        tt = t.float().reshape(-1, *([1] * (x.dim() - 1)))
        return torch.cat([torch.tanh(0.8 * x - 1e-3 * tt), torch.sin(x + 1e-3 * tt)], dim=1)

    return model


def test_run_table_carries_history_xs_and_learned_variance():
    table = _multistep_table()
    assert table.multistep and table.scales_input and table.noisy_steps() == [0, 2]
    calls: list = []
    x_T = _randn(*SHAPE, seed=22)
    got = fastdiff.sample(
        _two_c_model(calls), _Sampler(table), SHAPE, x_T=x_T, generator=torch.Generator().manual_seed(5)
    )
    # the same by hand: zeroed state, x = init_sigma * x_T, model on k_in * x, noise drawn per noisy row
    gen = torch.Generator().manual_seed(5)
    x = 2.0 * x_T
    h, xs = torch.zeros(2, *SHAPE), torch.zeros(SHAPE)
    rows = table.on("cpu")
    c = SHAPE[1]
    for i in range(len(table)):
        x_in = rows[i, COLUMN["k_in"]] * x
        assert torch.equal(calls[i][0], x_in) and calls[i][1].tolist() == [int(table.timesteps[i])] * SHAPE[0]
        out = _two_c_model([])(x_in, table.timesteps[i].expand(SHAPE[0]))
        z = torch.randn(SHAPE, generator=gen) if i in (0, 2) else None
        x, h, xs = apply_row(
            rows[i],
            x,
            out[:, :c],
            noise=z,
            variance=out[:, c:],
            learned_variance="learned_range",
            history=h,
            history_kind="x0",
            xs=xs,
        )
    assert torch.equal(got, x)


def test_learned_variance_model_must_return_twice_the_channels():
    table = _multistep_table()
    with pytest.raises(
        ValueError, match=r"denoiser returned \(3, 2, 4, 4\), expected a tensor of shape \(3, 4, 4, 4\)"
    ):
        fastdiff.sample(lambda x, t: x, _Sampler(table), SHAPE)


def test_sdedit_and_inpaint_refuse_multistep_tables():
    sampler = _Sampler(_multistep_table())
    x0 = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="cannot start from a noised image"):
        fastdiff.sdedit(_two_c_model([]), sampler, x0, 0.5)
    with pytest.raises(ValueError, match="cannot start from a noised image"):
        fastdiff.inpaint(_two_c_model([]), sampler, x0, torch.ones(SHAPE))
    with pytest.raises(TypeError, match="DDIMSampler"):
        fastdiff.ddim_invert(_two_c_model([]), sampler, x0)


# -- the registry ----------------------------------------------------------------------------------------------


def test_registry_builds_by_name_and_refuses_duplicates_and_unknown_options():
    schedule = NoiseSchedule.from_kind("linear", 100)
    assert {"ddim", "ddpm"} <= set(SAMPLERS)
    ddim = build_sampler("ddim", schedule, 10, eta=0.5)
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.5
    assert torch.equal(
        build_sampler("ddpm", schedule, 10).table.coeffs, DDPMSampler(schedule, 10).table.coeffs
    )
    assert SAMPLERS["ddim"].accepts("eta") and not SAMPLERS["ddpm"].accepts("eta")
    with pytest.raises(ValueError, match="takes no option"):
        build_sampler("ddpm", schedule, 10, eta=0.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        build_sampler("nope", schedule, 10)
    with pytest.raises(ValueError, match="already registered"):
        register("ddim", DDIMSampler)


def test_from_diffusers_scheduler_dispatches_on_the_first_registered_base():
    diffusers = pytest.importorskip("diffusers")

    class MyDDIM(diffusers.DDIMScheduler):  # a subclass (like the Fast drop-ins) counts as its base
        pass

    sampler = fastdiff.from_diffusers_scheduler(MyDDIM(), 20, eta=0.3)
    assert isinstance(sampler, DDIMSampler) and sampler.eta == 0.3
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler of one of"):
        fastdiff.from_diffusers_scheduler(object(), 20)
    with pytest.raises(ValueError, match="DDPM has no eta"):
        fastdiff.from_diffusers_scheduler(diffusers.DDPMScheduler(), 20, eta=0.5)
    assert math.isclose(sampler.table.init_sigma, 1.0)

"""Shared parts of the parity tests against diffusers' schedulers (not a test module).

The criterion (issue 12, TABLE_V2.md): after the whole sampling loop, max |ours - diffusers_fp32| <= 1e-5, or, where
diffusers' own float32 result is further than that from diffusers run in float64 (scheduler and model function
in float64), at most twice diffusers' own distance to its float64 result. The model is a cheap deterministic
analytic function (`AnalyticModel`: the exact prediction for Gaussian data plus tanh of a fixed random linear
map of x and t), not a network. `check_table_parity` runs fastdiff's table loop and the Fast drop-in (each step
counted through `sampler_step`, diffusers' own step() made to fail) against diffusers' float32 and float64 loops;
`compare_with_diffusers` says what happens where diffusers itself is not finite.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

ATOL = 1e-5
# Where diffusers' float32 loop is not finite but its float64 loop is, a result is held to the float64 one instead:
# max |ours - diffusers fp64| <= FP64_RTOL * max(1, max |diffusers fp64|) (float32 rounding accumulated over up to
# 50 steps; the cases seen are within 4e-5 of it).
FP64_RTOL = 1e-4
SHAPE = (2, 3, 4, 4)


class AnalyticModel:
    """A cheap deterministic stand-in for a trained model: the exact prediction (`prediction_type`: epsilon, sample,
    v_prediction, or flow's velocity) for Gaussian data x0 ~ N(0, 0.5^2 I), so that sampling ends near the data as
    with a real model, plus a nonlinear term 0.1 tanh(x W + (t / 1000) u + v) of a fixed random linear map.

    The noise level is read off the model timestep t: `noise_level` "discrete" (t indexes `alphas_cumprod`,
    fractional t interpolated in log alpha_bar), "log_sigma" (t = 0.25 log sigma, Euler's continuous timesteps) or
    "flow" (t = sigma * 1000). Computed in x's dtype; counts its calls.
    """

    def __init__(
        self,
        prediction_type: str,
        alphas_cumprod: torch.Tensor | None = None,
        noise_level: str = "discrete",
        features: int = 48,
        seed: int = 0,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(features, features, generator=gen, dtype=torch.float64) / features**0.5
        self.u = torch.randn(features, generator=gen, dtype=torch.float64)
        self.v = 0.1 * torch.randn(features, generator=gen, dtype=torch.float64)
        self.prediction_type, self.noise_level = prediction_type, noise_level
        self.log_abar = None if alphas_cumprod is None else alphas_cumprod.double().clamp_min(1e-30).log()
        self.calls = 0

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.noise_level == "log_sigma":
            return 1.0 / (1.0 + torch.exp(8.0 * t))
        grid = self.log_abar.to(t.dtype)
        pos = t.clamp(0, grid.numel() - 1)
        low = pos.floor().long().clamp(max=grid.numel() - 2)
        return torch.exp(grid[low] + (pos - low) * (grid[low + 1] - grid[low]))

    def __call__(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        self.calls += 1
        flat = x.reshape(x.shape[0], -1)
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        w, u, v = (p.to(x.dtype) for p in (self.w, self.u, self.v))
        wiggle = 0.1 * torch.tanh(flat @ w + (t / 1000.0) * u + v)
        var = 0.25
        if self.noise_level == "flow":
            sigma = (t / 1000.0).clamp(1e-6, 1.0)
            x0 = (1 - sigma) * var / ((1 - sigma) ** 2 * var + sigma**2) * flat
            m = (flat - (1 - sigma) * x0) / sigma - x0
        else:
            abar = self._alpha_bar(t)
            sa, sb = abar.sqrt(), (1 - abar).clamp_min(1e-12).sqrt()
            x0 = sa * var / (abar * var + 1 - abar) * flat
            eps = (flat - sa * x0) / sb
            m = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[self.prediction_type]
        return (m + wiggle).reshape(x.shape)


@contextlib.contextmanager
def diffusers_in_float64(scheduler_class: type) -> Iterator[None]:
    """Make diffusers' `scheduler_class` compute in float64 while the context lasts: in its module, torch.float32 and
    np.float32 mean float64 (so its betas, sigmas and step() arithmetic are float64), torch's default dtype is float64
    (tensors made from Python numbers, as LCM's c_skip), and its noise is drawn in float32 (the numbers the float32
    run draws) then widened. Construct the scheduler, set its timesteps and step it inside the context."""
    base = next(c for c in scheduler_class.__mro__ if c.__module__.startswith("diffusers."))
    module = sys.modules[base.__module__]
    real = {name: getattr(module, name) for name in ("torch", "np", "randn_tensor") if hasattr(module, name)}
    torch64 = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    torch64.float32 = torch.float64
    np64 = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    np64.float32 = np.float64

    def randn(
        shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **kw: Any
    ) -> torch.Tensor:
        return real["randn_tensor"](shape, generator=generator, device=device, dtype=torch.float32).double()

    patched = {"torch": torch64, "np": np64, "randn_tensor": randn}
    default = torch.get_default_dtype()
    for name in real:
        setattr(module, name, patched[name])
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)
        for name, value in real.items():
            setattr(module, name, value)


def diffusers_loop(
    scheduler_class: type,
    config: Mapping[str, Any],
    model: Callable[..., torch.Tensor],
    num_steps: int | None,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    set_timesteps: Mapping[str, Any] | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
    shape: tuple[int, ...] = SHAPE,
    begin: int | None = None,
    set_begin_index: bool = True,
) -> torch.Tensor:
    """A diffusers pipeline's loop with a new `scheduler_class(**config)`: x_T = init_noise_sigma * randn, then
    scale_model_input / model / step per timestep, noise from one generator (for a step() that takes one).
    dtype=float64 runs it all under `diffusers_in_float64`. `begin`: `set_begin_index(begin)` and the loop over
    timesteps[begin:] (an img2img pipeline's; also keeps diffusers from looking a duplicated first timestep up as
    its second occurrence); with set_begin_index=False, the loop over timesteps[begin:] alone (a pipeline that
    does not call it: the scheduler finds its step from the first timestep's value)."""
    x = torch.randn(shape, generator=(gen := torch.Generator().manual_seed(seed)), dtype=torch.float32).to(
        dtype
    )
    context = diffusers_in_float64(scheduler_class) if dtype == torch.float64 else contextlib.nullcontext()
    with context:
        scheduler = scheduler_class(**config)
        scheduler.set_timesteps(num_steps, **(set_timesteps or {}))
        if begin is not None and set_begin_index:
            scheduler.set_begin_index(begin)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        noise = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in scheduler.timesteps[begin or 0 :]:
            m = model(scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x, t)
            x = scheduler.step(m, t, x, **noise, **(step_kwargs or {})).prev_sample
    return x


def parity(ours: torch.Tensor, fp32: torch.Tensor, fp64: torch.Tensor) -> tuple[bool, float, float]:
    """(criterion met, max |ours - diffusers fp32|, max |diffusers fp32 - diffusers fp64|)."""
    ours_err = (ours.double() - fp32.double()).abs().max().item()
    own_err = (fp32.double() - fp64).abs().max().item()
    return ours_err <= max(ATOL, 2.0 * own_err), ours_err, own_err


@contextlib.contextmanager
def table_steps_only(base: type, monkeypatch: Any, backend: str = "torch") -> Iterator[list[int]]:
    """While the context lasts, the Fast drop-ins' calls of `fastdiff.kernels.sampler_step` are counted (the length
    of the list it yields) and run with `backend`, and diffusers' own `base.step` fails the test if anything calls
    it (so a drop-in of `base` cannot fall back to it).

    `backend` "torch" is the row math `fastdiff.sample` runs on CPU ("auto" would be the Triton interpreter under
    the suite's TRITON_INTERPRET=1, ~30x slower a step); the kernel is held to it row by row, on rows of every table
    kind, in tests/kernels/test_sampler_step.py.
    """
    import pytest

    from fastdiff.integrations import diffusers as integration

    integration._fast_schedulers()  # the drop-in classes are built before base.step is replaced
    calls: list[int] = []
    real_step = integration.sampler_step

    def counted(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return real_step(*args, **{**kw, "backend": backend})

    with monkeypatch.context() as patch:
        patch.setattr(integration, "sampler_step", counted)
        patch.setattr(base, "step", lambda *a, **k: pytest.fail(f"diffusers' own {base.__name__}.step() ran"))
        yield calls


def drop_in_loop(
    base: type,
    config: Mapping[str, Any],
    model: Callable[..., torch.Tensor],
    num_steps: int | None,
    monkeypatch: Any,
    *,
    backend: str = "torch",
    **kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """`diffusers_loop` with the Fast drop-in of diffusers' `base` class, and how many steps ran the table path
    (calls of `fastdiff.kernels.sampler_step`), under `table_steps_only`."""
    from fastdiff.integrations import diffusers as integration

    fast = integration._fast_schedulers()[f"Fast{base.__name__}"]
    with table_steps_only(base, monkeypatch, backend) as calls:
        result = diffusers_loop(fast, config, model, num_steps, **kwargs)
    return result, len(calls)


def table_loop(
    sampler: Any,
    model: Callable[..., torch.Tensor],
    *,
    seed: int,
    monkeypatch: Any,
    begin: int = 0,
    shape: tuple[int, ...] = SHAPE,
) -> tuple[torch.Tensor, int]:
    """fastdiff's loop on `sampler`'s table with `diffusers_loop`'s x_T and noise (one generator), and how many rows
    ran through `sampler_step`. `begin` > 0: the rows from `begin` on with fresh sampler state (an img2img run;
    `fastdiff.sample` starts a multistep table at row 0 only)."""
    import fastdiff
    import fastdiff.loop

    calls = []
    real_step = fastdiff.loop.sampler_step

    def counted(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return real_step(*args, **kw)

    gen = torch.Generator().manual_seed(seed)
    table = sampler.table
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(fastdiff.loop, "sampler_step", counted)
        if begin == 0:
            return fastdiff.sample(model, sampler, shape, generator=gen), len(calls)
        x = torch.randn(shape, generator=gen)
        history, xs = table.new_state(x.shape, x.device, x.dtype)
        for i in range(begin, len(table)):
            m = model(x, table.timesteps[i].expand(x.shape[0]))
            noise = torch.randn(shape, generator=gen) if table.column("s")[i] != 0 else None
            x = counted(
                x,
                m,
                table.on(x.device),
                i,
                noise,
                threshold=table.threshold,
                history=history,
                history_kind=table.history,
                xs=xs,
            )
    return x, len(calls)


def last_step_is_empty(scheduler: Any) -> bool:
    """Whether a multistep scheduler's last step goes from sigma_min to sigma_min again, to float32 rounding
    (levels ending on sigma_min, which final_sigmas_type="sigma_min" appends again): the one place where diffusers'
    own loop may not be finite."""
    sigmas = scheduler.sigmas.double()
    return scheduler.config.final_sigmas_type == "sigma_min" and bool(
        (sigmas[-2] - sigmas[-1]).abs() <= 1e-6 * sigmas[-1]
    )


def check_table_parity(
    base: type,
    config: Mapping[str, Any],
    num_steps: int | None,
    *,
    seed: int,
    monkeypatch: Any,
    set_timesteps: Mapping[str, Any] | None = None,
    begin: int = 0,
    shape: tuple[int, ...] = SHAPE,
    model: Callable[..., torch.Tensor] | None = None,
) -> str:
    """The sampler `fastdiff.from_diffusers_scheduler` builds for `base(**config)`, and the Fast drop-in of `base`
    in diffusers' loop (`drop_in_loop`), against diffusers' own loop: same timesteps, every row / step through
    `sampler_step` (counted), and the criterion for both (`compare_with_diffusers`, whose answer it returns)."""
    import fastdiff

    scheduler = base(**config)
    scheduler.set_timesteps(num_steps, **(set_timesteps or {}))
    extra = {"begin_index": begin} if begin else {}
    sampler = fastdiff.from_diffusers_scheduler(scheduler, num_steps, **(set_timesteps or {}), **extra)
    assert torch.equal(sampler.timesteps, scheduler.timesteps.cpu()), "timesteps differ from diffusers'"
    if model is None:
        flow = config.get("use_flow_sigmas", False)
        model = AnalyticModel(
            config.get("prediction_type", "epsilon"),
            scheduler.alphas_cumprod,
            "flow" if flow else "discrete",
            features=int(np.prod(shape[1:])),
        )
    ours, rows = table_loop(sampler, model, seed=seed, monkeypatch=monkeypatch, begin=begin, shape=shape)
    assert rows == len(sampler.timesteps) - begin, "every step must run through the table (sampler_step)"
    kw = {"seed": seed, "set_timesteps": set_timesteps, "shape": shape, "begin": begin}
    dropped, steps = drop_in_loop(base, config, model, num_steps, monkeypatch, **kw)
    assert steps == len(sampler.timesteps) - begin, "every drop-in step must run through sampler_step"
    fp64 = diffusers_loop(base, config, model, num_steps, dtype=torch.float64, **kw)
    fp32 = diffusers_loop(base, config, model, num_steps, **kw)
    return compare_with_diffusers({"ours": ours, "drop-in": dropped}, fp32, fp64, config)


def compare_with_diffusers(
    results: Mapping[str, torch.Tensor], fp32: torch.Tensor, fp64: torch.Tensor, config: Mapping[str, Any]
) -> str:
    """Assert the criterion for each of `results` (name: final sample) against diffusers' float32 and float64
    loops. Returns which comparison applied:

    - "ok": the criterion against diffusers' float32 and float64 runs;
    - "diffusers-fp32-nan": diffusers' float32 run is not finite (its own error is infinite), its float64 run is:
      each result is within FP64_RTOL of the float64 run;
    - "diffusers-nan": diffusers' float64 run is not finite either (no reference): each result is finite, and
      they agree with one another to ATOL (the same table rows).
    """
    for name, result in results.items():
        assert torch.isfinite(result).all(), f"{name} is not finite: {dict(config)}"
    if not torch.isfinite(fp64).all():
        first = next(iter(results.values()))
        for name, result in results.items():
            err = (result.double() - first.double()).abs().max().item()
            assert err <= ATOL, f"results differ by {err:.3g} ({name}) where diffusers has no finite result"
        return "diffusers-nan"
    if not torch.isfinite(fp32).all():
        bound = FP64_RTOL * max(1.0, fp64.abs().max().item())
        for name, result in results.items():
            err = (result.double() - fp64).abs().max().item()
            assert err <= bound, f"|{name} - diffusers fp64| = {err:.3g} > {bound:.3g}: {dict(config)}"
        return "diffusers-fp32-nan"
    for name, result in results.items():
        ok, ours_err, own_err = parity(result, fp32, fp64)
        assert ok, (
            f"|{name} - diffusers fp32| = {ours_err:.3g}, diffusers' own error {own_err:.3g}: {dict(config)}"
        )
    return "ok"

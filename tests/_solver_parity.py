"""Shared parts of the multistep solvers' parity tests (test_dpm_solver.py, test_unipc.py): an analytic model, diffusers'
own loop in float32 and in float64, our loop with a count of the table steps, and the binding criterion.

The criterion (issue 12, TABLE_V2.md): after the whole loop, max |ours - diffusers_fp32| <= 1e-5; where diffusers'
own float32 result is further than that from diffusers run in float64 (scheduler and model function in float64),
ours must be within 2x diffusers' own distance of diffusers_fp32, and within 2x of the float64 result too.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import fastdiff.loop
from fastdiff.loop import run_table

TOL = 1e-5
STEPS = (1, 4, 10, 25, 50)
SHAPE = (16, 3, 4, 4)
# Hidden configurations: a different FASTDIFF_PARITY_SEED draws a different set.
BASE_SEED = int(os.environ.get("FASTDIFF_PARITY_SEED", "0"))


def rng(case: int) -> random.Random:
    """The random generator of parity case `case` (depends on FASTDIFF_PARITY_SEED)."""
    return random.Random(BASE_SEED * 100_003 + case)


def analytic_model(alphas_cumprod: torch.Tensor, prediction_type: str, flow: bool, num_train: int = 1000):
    """The optimal predictor for data ~ N(0.3, 0.5^2) plus a fixed random linear mix through tanh of x and t:
    smooth, deterministic, cheap, and realistic enough that samples stay O(1) (an absolute tolerance means
    something). Returns the model output in `prediction_type` at (x, integer timestep t)."""
    mixes: dict[int, torch.Tensor] = {}
    abar_all = alphas_cumprod.double()
    mu, s2 = 0.3, 0.25

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (x.dim() - 1)
        tt = t.to(torch.float64)
        if flow:
            sig = (tt / num_train).reshape(view)
            alpha = 1 - sig
        else:
            abar = abar_all[t.long()].reshape(view)
            alpha, sig = abar.sqrt(), (1 - abar).sqrt()
        alpha, sig = alpha.to(x.dtype), sig.to(x.dtype)
        dim = x[0].numel()
        if dim not in mixes:
            mixes[dim] = torch.randn(
                dim, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64
            )
        mixed = (x.flatten(1) @ mixes[dim].to(x.dtype).T).reshape(x.shape) / dim**0.5
        eps = sig * (x - alpha * mu) / (alpha**2 * s2 + sig**2) + 0.05 * torch.tanh(
            mixed + tt.reshape(view).to(x.dtype) / num_train
        )
        x0 = (x - sig * eps) / alpha
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return alpha * eps - sig * x0
        return eps - x0  # flow_prediction: the velocity

    return model


class _Float64Torch(types.ModuleType):
    """`torch` as a scheduler module sees it in the float64 reference run: float32 means float64 there."""

    def __getattr__(self, name: str):
        return torch.float64 if name == "float32" else getattr(torch, name)


def _randn_float32(shape, generator=None, device=None, dtype=None, **_):
    # the same float32 draws as the float32 run, whatever dtype the float64 run asks for
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


@contextlib.contextmanager
def float64_scheduler(module: types.ModuleType) -> Iterator[None]:
    """Run diffusers' scheduler `module` in float64: its explicit float32 casts and its default-dtype tensors."""
    patched = {"torch": _Float64Torch("torch"), "randn_tensor": _randn_float32}
    saved = {name: getattr(module, name) for name in patched if hasattr(module, name)}
    default = torch.get_default_dtype()
    for name in saved:
        setattr(module, name, patched[name])
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        torch.set_default_dtype(default)


def diffusers_loop(
    scheduler,
    module: types.ModuleType,
    num_steps: int | None,
    x: torch.Tensor,
    model: Callable,
    seed: int | None,
    float64: bool,
    *,
    begin: int = 0,
    **set_timesteps: Any,
) -> torch.Tensor:
    """diffusers' own loop (`step` per timestep from row `begin`, as an img2img pipeline runs it); float64=True:
    scheduler, state and model in float64. `set_timesteps` are extra arguments of set_timesteps (mu, sigmas, ...)."""
    scheduler.set_timesteps(num_steps, **set_timesteps)
    scheduler.set_begin_index(
        begin
    )  # (diffusers looks a duplicated first timestep up as its second occurrence)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    ctx = contextlib.nullcontext()
    if float64:
        scheduler.sigmas = scheduler.sigmas.double()
        x = x.double()
        ctx = float64_scheduler(module)
    with ctx:
        for t in scheduler.timesteps[begin:]:
            out = model(x, t.expand(x.shape[0]))
            kwargs = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x.double()


def ours(
    sampler, x: torch.Tensor, model: Callable, seed: int | None, monkeypatch, *, begin: int = 0
) -> tuple[torch.Tensor, int]:
    """Our loop (`fastdiff.loop.run_table`, float32) and how many rows went through `sampler_step`. With
    `begin` > 0 (img2img), the rows from `begin` on with fresh sampler state, stepped by `sampler_step` itself
    (run_table starts a multistep table at row 0 only)."""
    calls = []
    step = fastdiff.loop.sampler_step

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    g = None if seed is None else torch.Generator().manual_seed(seed)
    table = sampler.table
    with torch.inference_mode():
        if begin == 0:
            monkeypatch.setattr(fastdiff.loop, "sampler_step", counted)
            out = run_table(lambda x, t: model(x, t), table, x.clone(), generator=g)
            monkeypatch.setattr(fastdiff.loop, "sampler_step", step)
        else:
            out = x.clone()
            history, xs = table.new_state(x.shape, x.device, x.dtype)
            for i in range(begin, len(table)):
                noise = torch.randn(x.shape, generator=g) if table.column("s")[i] != 0 else None
                m = model(out, table.timesteps[i].expand(x.shape[0]))
                out = counted(
                    out,
                    m,
                    table.on(x.device),
                    i,
                    noise,
                    history=history,
                    history_kind=table.history,
                    xs=xs,
                    threshold=table.threshold,
                )
    return out.double(), len(calls)


@dataclass
class Distances:
    ours_fp32: float  # |ours - diffusers_fp32|
    own: float  # |diffusers_fp32 - diffusers_fp64|
    ours_fp64: float  # |ours - diffusers_fp64|

    def ok(self) -> bool:
        if self.ours_fp32 <= TOL:
            return True
        return self.own > TOL and self.ours_fp32 <= 2 * self.own and self.ours_fp64 <= 2 * self.own


def distances(mine: torch.Tensor, d32: torch.Tensor, d64: torch.Tensor) -> Distances:
    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    return Distances(dist(mine, d32), dist(d32, d64), dist(mine, d64))

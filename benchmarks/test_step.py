"""pytest-benchmark: one sampling step of the digits model, eager (diffusers scheduler) against fastdiff.

    pytest benchmarks/ --benchmark-only

`eager`: the model call on cond+uncond, the guidance combine and diffusers' `DDIMScheduler.step()`, as the eager
backend of the sampling benchmark runs it; `fastdiff`: the accelerated model and the fused sampler step. Both
start from the same x and must land on the same x_prev.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastdiff.benchmarks.backends import Case, EagerBackend, FastdiffBackend
from fastdiff.benchmarks.harness import make_case
from fastdiff.benchmarks.workloads import build_workload
from fastdiff.kernels import sampler_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 16
STEP = 25  # a step in the middle of the 50-step DDIM loop
ATOL = 1e-4


@pytest.fixture(scope="module")
def digits():
    workload = build_workload("digits", DEVICE, steps=50)
    return workload, make_case(workload, BATCH, torch.float32, seed=0)


def _eager_step(workload, case: Case):
    backend = EagerBackend(workload, torch.float32)
    scheduler = backend.scheduler
    if scheduler is None:
        pytest.skip("diffusers is not installed")
    scheduler.set_timesteps(workload.steps)
    t = scheduler.timesteps[STEP]
    x, kwargs = case.model_inputs()

    def run():
        out_c, out_u = backend.denoise(x, t, **kwargs).chunk(2)
        eps = out_u + case.guidance_scale * (out_c - out_u)
        return scheduler.step(eps, t, case.x_T).prev_sample

    return run


def _fastdiff_step(workload, case: Case):
    backend = FastdiffBackend(workload, torch.float32)
    coeffs = backend.sampler.table.on(DEVICE)
    x, kwargs = case.model_inputs()
    t = backend.sampler.timesteps[STEP].to(DEVICE).expand(x.shape[0])

    def run():
        out_c, out_u = backend.denoise(x, t, **kwargs).chunk(2)
        return sampler_step(
            case.x_T, out_c, coeffs, STEP, eps_uncond=out_u, guidance_scale=case.guidance_scale
        )

    return run


@pytest.mark.parametrize("impl", ["eager", "fastdiff"])
def test_digits_step(benchmark, digits, impl):
    workload, case = digits
    run = (_eager_step if impl == "eager" else _fastdiff_step)(workload, case)
    benchmark.group = f"digits DDIM step, batch {BATCH}, CFG"
    with torch.inference_mode():
        out = benchmark(run)
        expected = _eager_step(workload, case)() if impl != "eager" else out
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)

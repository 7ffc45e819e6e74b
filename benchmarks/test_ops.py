"""pytest-benchmark: the fused ops against their plain-PyTorch references on small CPU shapes.

    pytest benchmarks/ --benchmark-only        (not collected by the default `pytest`, whose testpaths is tests/)

`auto` is what the models run: the Triton kernel where Triton runs (a GPU), the reference otherwise. Each case
also checks that both agree, so a fast wrong kernel fails here rather than looking good.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastdiff.kernels import (
    attention,
    attention_reference,
    group_norm_silu,
    group_norm_silu_reference,
    sampler_step,
    sampler_step_reference,
)
from fastdiff.samplers import DDPMSampler
from fastdiff.schedule import NoiseSchedule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 1e-4  # float32; the Triton kernels sum in a different order than the references


def _inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_group_norm_silu(benchmark, impl):
    x, weight, bias, scale, shift = _inputs((8, 64, 16, 16), (64,), (64,), (8, 64), (8, 64))
    if impl == "reference":

        def run():
            return group_norm_silu_reference(x, 32, weight, bias, scale=scale, shift=shift)
    else:

        def run():
            return group_norm_silu(x, 32, weight, bias, scale=scale, shift=shift, backend="auto")

    benchmark.group = "group_norm_silu 8x64x16x16 scale-shift"
    out = benchmark(run)
    expected = group_norm_silu_reference(x, 32, weight, bias, scale=scale, shift=shift)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("impl", ["reference", "auto", "sdpa"])
def test_attention(benchmark, impl):
    q, k, v = _inputs((4, 4, 256, 32), (4, 4, 256, 32), (4, 4, 256, 32))
    run = {
        "reference": lambda: attention_reference(q, k, v),
        "auto": lambda: attention(q, k, v, backend="auto"),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }[impl]
    benchmark.group = "attention 4x4x256x32"
    out = benchmark(run)
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_sampler_step(benchmark, impl):
    table = DDPMSampler(NoiseSchedule.from_kind("linear"), 50).table
    coeffs = table.on(DEVICE)
    x, eps, eps_u, z = _inputs(*[(16, 3, 32, 32)] * 4)
    step = 25
    fn = sampler_step_reference if impl == "reference" else sampler_step
    extra = {} if impl == "reference" else {"backend": "auto"}

    def run():
        return fn(x, eps, coeffs, step, z, eps_uncond=eps_u, guidance_scale=3.0, clip=table.clip, **extra)

    benchmark.group = "sampler_step 16x3x32x32 ddpm cfg clip"
    out = benchmark(run)
    expected = sampler_step_reference(
        x, eps, coeffs, step, z, eps_uncond=eps_u, guidance_scale=3.0, clip=table.clip
    )
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)

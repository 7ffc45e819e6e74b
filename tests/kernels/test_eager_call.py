"""The op wrappers skip the torch.library dispatcher in plain eager and use it wherever it is needed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from fastdiff.kernels import attention, group_norm_silu, sampler_step
from fastdiff.kernels.backend import eager_call
from fastdiff.table import TABLE_COLUMNS

# the package re-exports functions of the same names as these modules
attention_module = importlib.import_module("fastdiff.kernels.attention")
group_norm_module = importlib.import_module("fastdiff.kernels.group_norm")
sampler_step_module = importlib.import_module("fastdiff.kernels.sampler_step")


class Dispatched(Exception):
    pass


def _refuse(*args, **kwargs):
    raise Dispatched


@pytest.fixture
def no_dispatcher(monkeypatch):
    for module, name in (
        (attention_module, "_attention_op"),
        (group_norm_module, "_group_norm_silu_op"),
        (sampler_step_module, "_sampler_step_op"),
        (sampler_step_module, "_sampler_step_out_op"),
    ):
        monkeypatch.setattr(module, name, _refuse)


def _calls():
    q = torch.randn(1, 2, 4, 8)
    x = torch.randn(2, 4, 3, 3)
    eps = torch.randn_like(x)
    table = torch.rand(3, len(TABLE_COLUMNS))
    return {
        "attention": lambda grad=False: attention(q.requires_grad_(grad), q, q, backend="torch"),
        "group_norm": lambda grad=False: group_norm_silu(
            x, 2, torch.ones(4, requires_grad=grad), torch.zeros(4), backend="torch"
        ),
        "sampler_step": lambda grad=False: sampler_step(
            x, eps.requires_grad_(grad), table, 1, backend="torch"
        ),
    }


@pytest.mark.parametrize("op", ["attention", "group_norm", "sampler_step"])
def test_plain_eager_runs_the_body_and_gradients_go_through_the_op(no_dispatcher, op):
    call = _calls()[op]
    with torch.no_grad():
        assert torch.isfinite(call()).all()
    assert torch.isfinite(call(grad=False)).all()
    with pytest.raises(Dispatched):
        call(grad=True)


def test_eager_call_rules():
    plain = torch.zeros(2)
    assert eager_call(plain, None)
    assert not eager_call(torch.zeros(2, requires_grad=True))
    with torch.no_grad():
        assert eager_call(torch.zeros(2, requires_grad=True))

    class Sub(torch.Tensor):
        pass

    assert not eager_call(plain.as_subclass(Sub))  # subclasses (fake, functional, ...) keep the dispatcher


def test_same_results_through_the_op_and_the_body():
    for op, call in _calls().items():
        direct = call()
        with torch.enable_grad():
            dispatched = call(grad=True)
        torch.testing.assert_close(dispatched.detach(), direct, rtol=0, atol=0, msg=op)


def test_loading_and_sampling_digits_never_imports_dynamo_or_triton():
    """torch._dynamo costs 1.7 s to import, triton 0.3 s: a plain `fastdiff sample --backend eager` on the CPU
    needs neither (the Triton kernels live in `*_triton` modules loaded on first use)."""
    code = (
        "import sys, torch, fastdiff\n"
        "from fastdiff.pretrained import load_pretrained\n"
        "pre = load_pretrained('digits')\n"
        "engine = fastdiff.SamplingEngine(fastdiff.accelerate(pre.model), fastdiff.DDIMSampler(pre.schedule, "
        "num_steps=3), backend='eager')\n"
        "engine.sample((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), "
        "cond={'class_labels': torch.tensor([1, 2])}, guidance_scale=2.0)\n"
        "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path users run
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False False"

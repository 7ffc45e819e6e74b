"""sampler_step: the Triton kernel (interpreter on CPU, compiled on a GPU) against the plain-PyTorch reference.

Tolerances (binding, see the kernel notes):
- float32 (and float64 storage, whose math is float32 too): max|out - ref| <= 1e-5 * max(1, max|ref|).
- float16 / bfloat16: max|out - ref32| <= 2 * max|eager - ref32| + finfo(dtype).eps * max(1, max|ref32|), where
  ref32 is the float32 reference on the same (low-precision) inputs, `eager` the multi-op update run in the low
  dtype, and the floor is one rounding of the output to the dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.errors import BackendUnavailableError
from fastdiff.kernels.backend import triton_runs_on
from fastdiff.kernels.sampler_step import TABLE_COLUMNS, sampler_step, sampler_step_reference
from fastdiff.samplers import DDIMSampler, DDPMSampler
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import COLUMN

needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton and TRITON_INTERPRET=1 (set by tests/kernels/conftest.py unless overridden)",
)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_STEPS = 10


def _tables() -> dict[str, tuple[torch.Tensor, float | None]]:
    """(float32 table, clip) for every sampler kind, plus hand-made rows where no coefficient is zero."""
    linear = NoiseSchedule.from_kind("linear")
    scaled = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    tables = {
        "ddpm-small-eps": DDPMSampler(linear, NUM_STEPS, "fixed_small").table,
        "ddpm-large-eps": DDPMSampler(linear, NUM_STEPS, "fixed_large").table,
        "ddpm-small-sample": DDPMSampler(linear, NUM_STEPS, prediction_type="sample").table,
        "ddim-eta0-eps": DDIMSampler(scaled, NUM_STEPS).table,
        "ddim-eta1-v": DDIMSampler(scaled, NUM_STEPS, eta=1.0, prediction_type="v_prediction").table,
        "ddim-eta0.5-sample-clip": DDIMSampler(
            linear, NUM_STEPS, eta=0.5, clip_sample=True, prediction_type="sample"
        ).table,
        "ddim-inverse-eps": DDIMSampler(scaled, NUM_STEPS).inverse_table(),
    }
    out = {name: (t.on("cpu"), t.clip) for name, t in tables.items()}
    g = torch.Generator().manual_seed(1)
    out["dense-random"] = (torch.rand(NUM_STEPS, len(TABLE_COLUMNS), generator=g) * 2 - 1, 0.5)
    return out


TABLES = _tables()


def _inputs(shape, dtype=torch.float32, seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x, eps, u, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    if memory_format != torch.contiguous_format:
        x, eps, u, z = (t.contiguous(memory_format=memory_format) for t in (x, eps, u, z))
    return x, eps, u, z


def _assert_f32_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert err <= 1e-5 * scale, f"max error {err} > 1e-5 * {scale}"


def _eager_low_precision(x, eps, row, noise, eps_uncond, w, clip):
    """The multi-op update as plain eager code would run it in x's dtype, with host coefficients."""
    a, b, p, q, c, d, e, s = (row[COLUMN[n]].item() for n in "abpqcdes")
    m = eps if eps_uncond is None else eps_uncond + w * (eps - eps_uncond)
    x0 = a * x + b * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c * x0 + d * (p * x + q * m) + e * x
    return out if noise is None else out + s * noise


@needs_interpreter
@pytest.mark.parametrize("kind", list(TABLES))
@pytest.mark.parametrize("with_noise", [False, True])
def test_every_table_kind_matches_reference(kind, with_noise):
    table, clip = TABLES[kind]
    x, eps, _, z = _inputs((2, 3, 5, 7))
    noise = z if with_noise else None
    for step in (0, NUM_STEPS // 2, NUM_STEPS - 1):
        out = sampler_step(x, eps, table, step, noise, clip=clip, backend="triton")
        _assert_f32_close(out, sampler_step_reference(x, eps, table, step, noise, clip=clip))


@needs_interpreter
@pytest.mark.parametrize("tensor_step", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 7.5, "tensor"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cfg_clip_and_step_forms(tensor_step, guidance, clip):
    table, _ = TABLES["dense-random"]
    x, eps, u, z = _inputs((3, 4, 6, 6), seed=2)
    step = torch.tensor(3) if tensor_step else 3
    w = torch.tensor(4.25) if guidance == "tensor" else guidance
    out = sampler_step(x, eps, table, step, z, eps_uncond=u, guidance_scale=w, clip=clip, backend="triton")
    ref = sampler_step_reference(x, eps, table, 3, z, eps_uncond=u, guidance_scale=w, clip=clip)
    _assert_f32_close(out, ref)
    if clip is not None:
        # The dense-random row has c != 0, so clipping must change the result somewhere.
        unclipped = sampler_step_reference(x, eps, table, 3, z, eps_uncond=u, guidance_scale=w)
        assert not torch.allclose(ref, unclipped)


@needs_interpreter
def test_int32_step_tensor_and_guidance_without_uncond_is_ignored():
    table, _ = TABLES["ddim-eta1-v"]
    x, eps, _, z = _inputs((2, 4, 8, 8))
    out = sampler_step(
        x, eps, table, torch.tensor(7, dtype=torch.int32), z, guidance_scale=3.0, backend="triton"
    )
    _assert_f32_close(out, sampler_step_reference(x, eps, table, 7, z))


@needs_interpreter
@pytest.mark.parametrize("shape", [(1,), (4097,), (3, 4, 9, 9), (2, 3, 2, 5, 7), (1, 1, 1, 1)])
def test_odd_sizes_hit_masked_tails(shape):
    table, clip = TABLES["ddpm-small-eps"]
    x, eps, u, z = _inputs(shape, seed=3)
    out = sampler_step(x, eps, table, 4, z, eps_uncond=u, guidance_scale=2.0, clip=clip, backend="triton")
    _assert_f32_close(
        out, sampler_step_reference(x, eps, table, 4, z, eps_uncond=u, guidance_scale=2.0, clip=clip)
    )


@needs_interpreter
@pytest.mark.parametrize("fmt", [torch.channels_last, "mixed", "transposed"])
def test_layouts(fmt):
    table, _ = TABLES["ddim-eta0.5-sample-clip"]
    x, eps, u, z = _inputs((2, 5, 3, 7), seed=4)
    if fmt == "mixed":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "transposed":
        x, eps = x.transpose(2, 3), eps.transpose(2, 3)
        u, z = u.transpose(2, 3).contiguous(), z.transpose(2, 3)
    else:
        x, eps, u, z = (t.contiguous(memory_format=fmt) for t in (x, eps, u, z))
    out = sampler_step(x, eps, table, 2, z, eps_uncond=u, guidance_scale=3.0, clip=1.0, backend="triton")
    _assert_f32_close(
        out, sampler_step_reference(x, eps, table, 2, z, eps_uncond=u, guidance_scale=3.0, clip=1.0)
    )
    if fmt != "transposed":
        # x's layout decides the output's (so an engine's channels-last buffers stay channels-last).
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ddpm-small-eps", "ddim-eta1-v", "dense-random"])
def test_low_precision_within_twice_eager_error(dtype, kind):
    table, clip = TABLES[kind]
    x, eps, u, z = _inputs((2, 4, 16, 16), dtype=dtype, seed=5)
    w = 3.0
    for step in (1, NUM_STEPS - 1):
        out = sampler_step(
            x, eps, table, step, z, eps_uncond=u, guidance_scale=w, clip=clip, backend="triton"
        )
        assert out.dtype == dtype
        f32 = [t.float() for t in (x, eps, z, u)]
        ref32 = sampler_step_reference(
            f32[0], f32[1], table, step, f32[2], eps_uncond=f32[3], guidance_scale=w, clip=clip
        )
        eager = _eager_low_precision(x, eps, table[step], z, u, w, clip)
        err = (out.float() - ref32).abs().max().item()
        err_eager = (eager.float() - ref32).abs().max().item()
        floor = torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item())
        assert err <= 2 * err_eager + floor, f"{dtype} step {step}: {err} vs eager {err_eager} (+{floor})"


@needs_interpreter
def test_float64_storage_matches_reference():
    table, clip = TABLES["ddpm-large-eps"]
    x, eps, _, z = _inputs((2, 3, 4, 4), dtype=torch.float64)
    out = sampler_step(x, eps, table, 5, z, clip=clip, backend="triton")
    _assert_f32_close(out, sampler_step_reference(x, eps, table, 5, z, clip=clip))


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_in_place_and_strided(backend):
    table, clip = TABLES["ddpm-small-eps"]
    x, eps, u, z = _inputs((2, 3, 6, 5), seed=6)
    ref = sampler_step_reference(x, eps, table, 6, z, eps_uncond=u, guidance_scale=2.0, clip=clip)
    kw = dict(eps_uncond=u, guidance_scale=2.0, clip=clip, backend=backend)

    x_buf = x.clone()
    got = sampler_step(x_buf, eps, table, 6, z, out=x_buf, **kw)
    assert got is x_buf
    _assert_f32_close(x_buf, ref)

    strided = torch.zeros(2, 3, 5, 6).transpose(2, 3)  # not dense in any layout the kernel walks
    assert sampler_step(x, eps, table, 6, z, out=strided, **kw) is strided
    _assert_f32_close(strided, ref)


@needs_interpreter
def test_device_step_out_of_range_gives_nan_not_a_stray_read():
    # The public function rejects a host-side step out of range; a device-side one is only known in the kernel,
    # which must neither read outside the table nor return numbers that look valid.
    table, _ = TABLES["ddim-eta0-eps"]
    x, eps, _, _ = _inputs((2, 3, 4, 4))
    for bad in (NUM_STEPS, -1):
        out = torch.ops.fastdiff.sampler_step(
            x, eps, table, 0, torch.tensor(bad), None, None, 1.0, None, None, "triton"
        )
        assert out.isnan().all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_torch_compile_fullgraph_sees_one_op(backend):
    table, clip = TABLES["ddpm-small-eps"]
    x, eps, u, z = _inputs((2, 3, 4, 4), seed=7)

    def step_fn(x, eps, u, z, step, w):
        y = sampler_step(x, eps, table, step, z, eps_uncond=u, guidance_scale=w, clip=clip, backend=backend)
        return sampler_step(y, eps, table, step + 1, out=y, backend=backend)

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    step, w = torch.tensor(2), torch.tensor(1.5)
    got = compiled(x, eps, u, z, step, w)
    mid = sampler_step_reference(x, eps, table, 2, z, eps_uncond=u, guidance_scale=w, clip=clip)
    _assert_f32_close(got, sampler_step_reference(mid, eps, table, 3))


def test_backend_torch_is_the_reference_and_auto_runs_here():
    table, clip = TABLES["ddim-eta1-v"]
    x, eps, u, z = _inputs((2, 3, 4, 4), seed=8)
    ref = sampler_step_reference(x, eps, table, 1, z, eps_uncond=u, guidance_scale=2.0, clip=clip)
    for backend in ("torch", "auto"):
        out = sampler_step(x, eps, table, 1, z, eps_uncond=u, guidance_scale=2.0, clip=clip, backend=backend)
        _assert_f32_close(out, ref)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_empty_batch_gives_empty_output(backend):
    table, _ = TABLES["ddpm-small-eps"]
    x = torch.empty(0, 3, 8, 8)
    out = sampler_step(
        x, x.clone(), table, 0, x.clone(), eps_uncond=x.clone(), guidance_scale=2.0, backend=backend
    )
    assert out.shape == (0, 3, 8, 8) and out.dtype == x.dtype
    buf = torch.empty_like(x)
    assert sampler_step(x, x, table, 0, out=buf, backend=backend) is buf


def test_triton_backend_unavailable_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table, _ = TABLES["ddpm-small-eps"]
    x = torch.zeros(2, 3)
    with pytest.raises(BackendUnavailableError):
        sampler_step(x, x, table, 0, backend="triton")


_T = TABLES["ddpm-small-eps"][0]
_X = torch.zeros(2, 3, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(x=_X.long()), TypeError, "x must be a floating-point tensor"),
        (dict(eps=_X.numpy()), TypeError, "eps must be a tensor"),
        (dict(eps=torch.zeros(2, 3, 4, 5)), ValueError, "eps must have the shape of x"),
        (dict(noise=torch.zeros(2, 3, 4, 4, device="meta")), ValueError, "noise is on meta"),
        (dict(eps_uncond=_X.half()), ValueError, "eps_uncond has dtype torch.float16"),
        (
            dict(table=torch.zeros(NUM_STEPS, 6)),
            ValueError,
            rf"table must be a \(num_steps, {len(TABLE_COLUMNS)}\)",
        ),
        (dict(table=torch.zeros(8)), ValueError, rf"table must be a \(num_steps, {len(TABLE_COLUMNS)}\)"),
        (dict(table=_T.double()), ValueError, "table must be float32"),
        (dict(table=_T.to("meta")), ValueError, "table is on meta"),
        (dict(step=NUM_STEPS), ValueError, r"step must be an int in \[0, 10\)"),
        (dict(step=-1), ValueError, r"step must be an int in \[0, 10\)"),
        (dict(step=1.0), ValueError, "step must be an int"),
        (dict(step=True), ValueError, "step must be an int"),
        (dict(step=torch.tensor(NUM_STEPS)), ValueError, "step 10 is out of range"),
        (dict(step=torch.tensor([1])), ValueError, "0-d integer tensor"),
        (dict(step=torch.tensor(1.0)), ValueError, "0-d integer tensor"),
        (dict(step=torch.tensor(1, device="meta")), ValueError, "step is on meta"),
        (dict(guidance_scale=torch.tensor([2.0])), ValueError, "guidance_scale must be a number or a 0-d"),
        (dict(guidance_scale=torch.tensor(2)), ValueError, "guidance_scale must be a number or a 0-d"),
        (dict(guidance_scale=torch.tensor(2.0, device="meta")), ValueError, "guidance_scale is on meta"),
        (dict(guidance_scale="2"), TypeError, "guidance_scale must be a number"),
        (dict(clip=0.0), ValueError, "clip must be None or a positive number"),
        (dict(out=torch.zeros(2, 3, 4)), ValueError, "out must have the shape of x"),
        (dict(out=_X.bfloat16()), ValueError, "out has dtype torch.bfloat16"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(x=_X, eps=_X, table=_T, step=0, eps_uncond=_X, guidance_scale=2.0) | kwargs
    with pytest.raises(error, match=match):
        sampler_step(**args)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 4, 64, 64), (8, 3, 256, 256), (5, 3, 31, 33)])
def test_cuda_realistic_shapes(dtype, shape):
    table, clip = TABLES["ddpm-small-eps"]
    table = table.cuda()
    x, eps, u, z = (t.cuda() for t in _inputs(shape, dtype=dtype, seed=9, memory_format=torch.channels_last))
    step, w = torch.tensor(4, device="cuda"), torch.tensor(7.5, device="cuda")
    out = sampler_step(x, eps, table, step, z, eps_uncond=u, guidance_scale=w, clip=clip, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    f32 = [t.float() for t in (x, eps, z, u)]
    ref32 = sampler_step_reference(
        f32[0], f32[1], table, 4, f32[2], eps_uncond=f32[3], guidance_scale=7.5, clip=clip
    )
    if dtype == torch.float32:
        _assert_f32_close(out, ref32)
    else:
        eager = _eager_low_precision(x, eps, table[4].cpu(), z, u, 7.5, clip)
        err = (out.float() - ref32).abs().max().item()
        err_eager = (eager.float() - ref32).abs().max().item()
        assert err <= 2 * err_eager + torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item())


@cuda
@needs_cuda
def test_cuda_graph_replays_with_device_step_counter():
    table, clip = TABLES["ddpm-small-eps"]
    table = table.cuda()
    x0, eps, _, _ = (t.cuda() for t in _inputs((2, 4, 32, 32), seed=10))
    noises = torch.randn(NUM_STEPS, *x0.shape, device="cuda")
    x, z, step = x0.clone(), torch.empty_like(x0), torch.zeros((), dtype=torch.int64, device="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles the kernel) outside the capture
        sampler_step(x.clone(), eps, table, step, z, clip=clip, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler_step(x, eps, table, step, z, clip=clip, out=x, backend="triton")
        step.add_(1)
    x.copy_(x0)
    step.zero_()
    expect = x0.clone()
    for i in range(NUM_STEPS):
        z.copy_(noises[i])
        graph.replay()
        expect = sampler_step_reference(expect, eps, table, i, noises[i], clip=clip)
    torch.cuda.synchronize()
    assert int(step) == NUM_STEPS
    _assert_f32_close(x, expect)

    # One replay more reads past the table: the kernel poisons the result instead of reading stray memory.
    graph.replay()
    assert x.isnan().all()


# -- Table v2 rows: history (1-3 slots, x0 or eps), the xs corrector, learned variance, dynamic thresholding --------
# Tolerances: float32 as above, for x_prev and for the updated history and xs. float16: kernel and reference both
# compute in float32 from the same float16 inputs and round once, so they may differ by the float32 rounding of
# the math plus one float16 rounding: max|out - ref| <= 2 * finfo(float16).eps * max(1, max|ref|).

_DENSE = TABLES["dense-random"][0]  # every column random and non-zero, f*, xc_*, lv* included


def _state(shape, slots, with_xs, dtype=torch.float32, seed=20):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn((slots, *shape), generator=g).to(dtype) if slots else None
    xs = torch.randn(shape, generator=g).to(dtype) if with_xs else None
    return h, xs


def _assert_close_dtype(out, ref):
    if ref.dtype in (torch.float32, torch.float64):
        _assert_f32_close(out, ref)
        return
    assert out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 2 * torch.finfo(ref.dtype).eps * max(1.0, ref.float().abs().max().item())


def _run_both(x, eps, table, step, noise, *, history=None, xs=None, backend="triton", **kw):
    """(kernel out, its history, its xs) and the same from the reference, each on its own copy of the state."""
    h_k, xs_k = (None if t is None else t.clone() for t in (history, xs))
    h_r, xs_r = (None if t is None else t.clone() for t in (history, xs))
    out = sampler_step(x, eps, table, step, noise, history=h_k, xs=xs_k, backend=backend, **kw)
    ref = sampler_step_reference(x, eps, table, step, noise, history=h_r, xs=xs_r, **kw)
    return (out, h_k, xs_k), (ref, h_r, xs_r)


def _compare(kernel, reference):
    for got, expected in zip(kernel, reference, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            _assert_close_dtype(got, expected)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("kind", ["x0", "eps"])
@pytest.mark.parametrize("with_xs", [False, True])
def test_history_and_xs_rows_match_reference(dtype, slots, kind, with_xs):
    x, eps, u, z = _inputs((2, 3, 5, 7), dtype=dtype, seed=21)
    history, xs = _state(x.shape, slots, with_xs, dtype)
    kernel, reference = _run_both(
        x,
        eps,
        _DENSE,
        4,
        z,
        history=history,
        xs=xs,
        history_kind=kind,
        eps_uncond=u,
        guidance_scale=2.5,
        clip=0.8,
    )
    _compare(kernel, reference)
    # the rotation itself: older slots move down unchanged
    h = kernel[1]
    assert torch.equal(h[1:], history[: slots - 1])
    if with_xs:  # the corrector changed xs, and x_prev depends on it
        assert not torch.equal(kernel[2], xs)


@needs_interpreter
def test_no_state_buffers_ignore_their_columns_and_xs_zero_slots():
    # Without history or xs the f*, xc_* columns are not read: the result equals the 8-column update.
    x, eps, _, z = _inputs((2, 3, 4, 4), seed=22)
    out = sampler_step(x, eps, _DENSE, 2, z, backend="triton")
    _assert_f32_close(out, sampler_step_reference(x, eps, _DENSE, 2, z))
    _, xs = _state(x.shape, 0, True)
    _compare(*_run_both(x, eps, _DENSE, 2, z, xs=xs))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("learned", ["learned", "learned_range"])
@pytest.mark.parametrize("sliced", [False, True])
def test_learned_variance_rows_match_reference(dtype, learned, sliced):
    x, eps, u, z = _inputs((2, 3, 4, 5), dtype=dtype, seed=23)
    g = torch.Generator().manual_seed(24)
    raw = torch.randn(x.shape, generator=g)
    v = (raw.tanh() if learned == "learned_range" else raw.exp() * 1e-2).to(dtype)
    if sliced:  # m and v as the channel halves of one 2C model output: read in place, not copied
        full = torch.cat([eps, v], dim=1)
        full_u = torch.cat([u, torch.zeros_like(v)], dim=1)
        eps, v, u = full[:, :3], full[:, 3:], full_u[:, :3]
        assert not eps.is_contiguous() and not v.is_contiguous()
    history, _ = _state(x.shape, 2, False, dtype)
    kernel, reference = _run_both(
        x,
        eps,
        _DENSE,
        6,
        z,
        history=history,
        history_kind="x0",
        variance=v,
        learned_variance=learned,
        eps_uncond=u,
        guidance_scale=3.0,
    )
    _compare(kernel, reference)
    # the variance changes the noise term
    plain = sampler_step_reference(x, eps, _DENSE, 6, z, eps_uncond=u, guidance_scale=3.0)
    assert not torch.allclose(reference[0].float(), plain.float())


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("threshold", [(0.995, 1.5), (0.6, 4.0)])
def test_dynamic_threshold_rows_match_reference(dtype, threshold):
    x, eps, u, z = _inputs((3, 2, 6, 6), dtype=dtype, seed=25)
    x = x * 3
    history, xs = _state(x.shape, 1, True, dtype)
    kernel, reference = _run_both(
        x,
        eps,
        _DENSE,
        1,
        z,
        history=history,
        xs=xs,
        history_kind="x0",
        threshold=threshold,
        eps_uncond=u,
        guidance_scale=2.0,
    )
    _compare(kernel, reference)
    # thresholded x0 is pushed to history: within [-1, 1] after the division by s
    assert kernel[1][0].float().abs().max() <= 1 + 1e-3


@needs_interpreter
@pytest.mark.parametrize("layout", ["state-contiguous", "state-channels-last"])
def test_channels_last_with_state_and_device_step(layout):
    x, eps, u, z = _inputs((2, 5, 3, 7), seed=26, memory_format=torch.channels_last)
    history, xs = _state(x.shape, 3, True)
    if layout == "state-channels-last":
        history = (
            history.reshape(6, 5, 3, 7).contiguous(memory_format=torch.channels_last).view(3, 2, 5, 3, 7)
        )
        xs = xs.contiguous(memory_format=torch.channels_last)
    step = torch.tensor(5)
    kernel, reference = _run_both(
        x,
        eps,
        _DENSE,
        step,
        z,
        history=history,
        xs=xs,
        history_kind="eps",
        eps_uncond=u,
        guidance_scale=torch.tensor(1.5),
    )
    _compare(kernel, reference)
    assert kernel[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_state_rows_under_torch_compile_and_decomposed(backend):
    from fastdiff.kernels.backend import decomposed

    x, eps, _, z = _inputs((2, 3, 4, 4), seed=27)
    h0, xs0 = _state(x.shape, 2, True)

    def step_fn(x, eps, z, h, xs, step):
        y = sampler_step(x, eps, _DENSE, step, z, history=h, history_kind="x0", xs=xs, backend=backend)
        return sampler_step(
            y, eps, _DENSE, step + 1, history=h, history_kind="x0", xs=xs, out=y, backend=backend
        )

    h_ref, xs_ref = h0.clone(), xs0.clone()
    mid = sampler_step_reference(x, eps, _DENSE, 2, z, history=h_ref, history_kind="x0", xs=xs_ref)
    expected = sampler_step_reference(mid, eps, _DENSE, 3, history=h_ref, history_kind="x0", xs=xs_ref)

    h, xs = h0.clone(), xs0.clone()
    got = torch.compile(step_fn, fullgraph=True, backend="aot_eager")(x, eps, z, h, xs, torch.tensor(2))
    for a, b in ((got, expected), (h, h_ref), (xs, xs_ref)):
        _assert_f32_close(a, b)
    h, xs = h0.clone(), xs0.clone()
    with decomposed():
        got = step_fn(x, eps, z, h, xs, 2)
    for a, b in ((got, expected), (h, h_ref), (xs, xs_ref)):
        _assert_f32_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(history=torch.zeros(2, 3, 4, 4)), ValueError, "history must have shape"),
        (dict(history=torch.zeros(4, 2, 3, 4, 4)), ValueError, "history must have shape"),
        (dict(history=torch.zeros(1, 2, 3, 4, 4)), ValueError, "history_kind must be one of"),
        (dict(history=torch.zeros(1, 2, 3, 4, 4).half(), history_kind="x0"), ValueError, "history has dtype"),
        (dict(xs=torch.zeros(2, 3, 4)), ValueError, "xs must have the shape of x"),
        (dict(variance=torch.zeros(2, 3, 4, 4)), ValueError, "learned_variance must be one of"),
        (dict(threshold=(0.9, 1.0), clip=1.0), ValueError, "not both"),
        (dict(threshold=(-0.1, 1.0)), ValueError, "threshold must be"),  # 0 is valid (diffusers: min |x0|)
    ],
)
def test_bad_state_inputs(kwargs, error, match):
    args = dict(x=_X, eps=_X, table=_T, step=0) | kwargs
    with pytest.raises(error, match=match):
        sampler_step(**args)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("history_kind", "learned", "threshold"),
    [("x0", "learned", (0.99, 2.0)), ("eps", "learned_range", None), ("eps", "learned_range", (0.6, 4.0))],
)
def test_cuda_state_rows(dtype, history_kind, learned, threshold):
    shape = (4, 4, 64, 64)
    table = _DENSE.cuda()
    x, eps, u, z = (t.cuda() for t in _inputs(shape, dtype=dtype, seed=28))
    raw = torch.rand(shape, device="cuda")
    # learned: the variance itself (positive); learned_range: the interpolation v in [-1, 1]
    v = (raw if learned == "learned" else 2 * raw - 1).to(dtype)
    history, xs = (t.cuda() for t in _state(shape, 3, True, dtype))
    kernel, reference = _run_both(
        x,
        eps,
        table,
        torch.tensor(3, device="cuda"),
        z,
        history=history,
        xs=xs,
        history_kind=history_kind,
        variance=v,
        learned_variance=learned,
        threshold=threshold,
        eps_uncond=u,
        guidance_scale=4.0,
    )
    if dtype == torch.bfloat16:
        for got, expected in zip(kernel, reference, strict=True):
            err = (got.float() - expected.float()).abs().max().item()
            assert err <= 2 * torch.finfo(dtype).eps * max(1.0, expected.float().abs().max().item())
    else:
        _compare(kernel, reference)


def _real_tables():
    """StepTables of the samplers themselves, one of each kind of row (10 steps; LCM 4)."""
    from fastdiff.samplers import DPMSolverMultistepSampler, UniPCMultistepSampler, build_sampler
    from fastdiff.schedule import FlowSchedule

    linear = NoiseSchedule.from_kind("linear")
    scaled = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "dpmpp-2m": build_sampler("dpmpp-2m", scaled, NUM_STEPS).table,  # x0 history
        "dpmpp-3m-sde-threshold": DPMSolverMultistepSampler(  # 2 x0 slots, noise, dynamic thresholding
            scaled, NUM_STEPS, solver_order=3, algorithm_type="sde-dpmsolver++", thresholding=True
        ).table,
        "dpmsolver-2-eps": DPMSolverMultistepSampler(  # eps history
            scaled, NUM_STEPS, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ).table,
        "unipc": build_sampler("unipc", scaled, NUM_STEPS).table,  # corrector: xs and xc_* columns
        "unipc-3-eps": UniPCMultistepSampler(
            scaled, NUM_STEPS, solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"
        ).table,
        "euler": build_sampler("euler", scaled, NUM_STEPS).table,  # k_in
        "euler-a": build_sampler("euler-a", scaled, NUM_STEPS).table,
        "lcm": build_sampler("lcm", scaled, 4).table,
        "flow-euler": build_sampler("flow-euler", FlowSchedule(shift=3.0), NUM_STEPS).table,
        "ddpm-learned-range": DDPMSampler(linear, NUM_STEPS, variance="learned_range").table,
    }


REAL_TABLES = _real_tables()


@needs_interpreter
@pytest.mark.parametrize("kind", list(REAL_TABLES))
def test_real_table_rows_match_apply_row(kind):
    """Every row of a sampler's own table through the kernel against `fastdiff.table.apply_row`, with the state a
    run carries (history and xs from the reference's earlier rows), the table's constants (clip, threshold, history
    kind, learned variance) and the model input scaled by k_in. float32 tolerance on x_prev, history and xs."""
    from fastdiff.table import apply_row, table_row_kwargs

    table = REAL_TABLES[kind]
    coeffs, constants = table.on("cpu"), table_row_kwargs(table)
    shape = (2, 3, 4, 5)
    g = torch.Generator().manual_seed(30)
    x = table.init_sigma * torch.randn(shape, generator=g)
    history, xs = table.new_state(shape, "cpu", torch.float32)
    for i in range(len(table)):
        x_in = float(table.column("k_in")[i]) * x
        m = torch.tanh(x_in) + 0.1 * torch.randn(shape, generator=g)  # a model output of the scaled input
        noise = torch.randn(shape, generator=g) if table.column("s")[i] != 0 else None
        v = torch.rand(shape, generator=g) * 2 - 1 if table.learned_variance else None
        ref, ref_history, ref_xs = apply_row(
            coeffs[i], x, m, noise=noise, variance=v, history=history, xs=xs, **constants
        )
        h_k, xs_k = (None if t is None else t.clone() for t in (history, xs))
        out = sampler_step(
            x, m, coeffs, i, noise, variance=v, history=h_k, xs=xs_k, backend="triton", **constants
        )
        _compare((out, h_k, xs_k), (ref, ref_history, ref_xs))
        x, history, xs = ref, ref_history, ref_xs
    assert torch.isfinite(x).all()


@needs_interpreter
def test_run_table_with_the_kernel_matches_the_reference_loop():
    # The whole loop on a table with history, xs, learned variance and k_in: the fused step under the interpreter
    # against the reference step, float32 tolerance on the final sample (8 rows of O(1) values).
    from fastdiff.loop import run_table
    from fastdiff.table import StepTable

    n = 8
    g = torch.Generator().manual_seed(29)

    def col(scale=0.2):
        return (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * scale

    table = StepTable.from_columns(
        torch.arange(n, 0, -1) * 100,
        history="x0",
        history_slots=2,
        uses_xs=True,
        learned_variance="learned_range",
        k_in=1 + col(),
        a=1 + col(),
        b=-0.5 + col(),
        q=1.0,
        xc_x=0.9 + col(),
        xc_s=col(),
        xc_0=col(),
        xc_1=col(),
        c=0.5 + col(),
        d=col(),
        e=0.5 + col(),
        f1=col(),
        f2=col(),
        s=0.1,
        lv0=-2 + col(),
        lv1=col(),
    )

    def model(x, t):
        return torch.cat([torch.tanh(x - 1e-3 * t.float().view(-1, 1, 1, 1)), torch.sin(x)], dim=1)

    x = torch.randn(2, 3, 4, 4, generator=g)
    out = {}
    for backend in ("torch", "triton"):
        out[backend] = run_table(
            model, table, x.clone(), generator=torch.Generator().manual_seed(1), backend=backend
        )
    _assert_f32_close(out["triton"], out["torch"])

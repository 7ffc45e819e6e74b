"""group_norm_silu: the Triton kernels (interpreter on CPU, compiled on a GPU) against the plain-PyTorch reference.

Tolerances (binding, see the kernel notes):
- float32: max|out - ref| <= 1e-5 * max(1, max|ref|), ref the float32 reference (float64 for the large-mean test).
- float16 / bfloat16: max|out - ref32| <= 2 * max|eager - ref32| + finfo(dtype).eps * max(1, max|ref32|), where
  ref32 is the float32 reference on the same (low-precision) inputs, `eager` F.group_norm + scale-shift + F.silu
  run in the low dtype, and the floor is one rounding of the output to the dtype.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BackendUnavailableError
from fastdiff.kernels.backend import simulated_gpu, triton_importable, triton_runs_on
from fastdiff.kernels.group_norm import group_norm_silu, group_norm_silu_reference

group_norm_module = importlib.import_module("fastdiff.kernels.group_norm")
# The Triton half of the op, which `import fastdiff` does not load (tests that use it need triton).
gnt = importlib.import_module("fastdiff.kernels.group_norm_triton") if triton_importable() else None

needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")
needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton and TRITON_INTERPRET=1 (set by tests/kernels/conftest.py unless overridden)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The interpreter evaluates sigmoid with numpy, whose exp overflows (harmlessly, to inf) for very negative inputs.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x, stored in `layout`."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 3:  # no torch format for 1-D; (N, L, C) storage seen through a transpose
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
    if layout == "channel_slice":  # not dense: every other channel of a larger tensor
        big = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "unmergeable":  # spatial strides that do not merge into one: the kernel reads a copy
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    raise AssertionError(layout)


def _inputs(
    shape,
    num_groups,
    *,
    dtype=torch.float32,
    param_dtype=None,
    layout="contiguous",
    weight=True,
    bias=True,
    scale=True,
    shift=True,
    mean=0.0,
    seed=0,
):
    """x (in `layout`), weight, bias, scale, shift (each None when switched off); scale/shift are the two halves of
    one (N, 2C) embedding, as in an ADM ResBlock, so they are strided views."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    param_dtype = param_dtype or dtype
    x = _layout((mean + torch.randn(shape, generator=g)).to(dtype), layout)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(param_dtype) if weight else None
    b = torch.randn(C, generator=g).to(param_dtype) if bias else None
    sc, sh = (0.5 * torch.randn(N, 2 * C, generator=g)).to(param_dtype).chunk(2, dim=1)
    return x, w, b, sc if scale else None, sh if shift else None


def _check_float32(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out.double() - ref.double()).abs().max().item()
    bound = 1e-5 * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _eager_low_precision(x, num_groups, w, b, sc, sh, silu, eps=1e-5):
    """The unfused eager ops, every one in x's dtype."""
    dt = x.dtype
    y = F.group_norm(x, num_groups, None if w is None else w.to(dt), None if b is None else b.to(dt), eps)
    expand = (...,) + (None,) * (x.dim() - 2)
    if sc is not None:
        y = y * (1 + sc.to(dt)[expand])
    if sh is not None:
        y = y + sh.to(dt)[expand]
    return F.silu(y) if silu else y


def _check_low_precision(out, x, num_groups, w, b, sc, sh, silu) -> None:
    f32 = [None if t is None else t.float() for t in (x, w, b, sc, sh)]
    ref = group_norm_silu_reference(f32[0], num_groups, f32[1], f32[2], scale=f32[3], shift=f32[4], silu=silu)
    eager = _eager_low_precision(x, num_groups, w, b, sc, sh, silu)
    eager_err = (eager.float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    bound = 2 * eager_err + torch.finfo(x.dtype).eps * max(1.0, ref.abs().max().item())
    assert out.dtype == x.dtype
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (eager {x.dtype} error {eager_err:.3g})"


def _expected_format(x: torch.Tensor, layout: str) -> torch.memory_format:
    return CHANNELS_LAST[x.dim()] if layout == "channels_last" and x.dim() > 3 else torch.contiguous_format


# shape, num_groups, layout, which optional operands are on, silu, forced (BLOCK_C, BLOCK_S, chunk_s) or None for
# the heuristics. Forced tiles smaller than the group make the loops take several channel / position blocks with
# ragged tails; a chunk_s below S takes the split path (stats kernel, combine, apply kernel).
FLOAT32_CASES = [
    ((2, 6, 13), 3, "contiguous", dict(), True, None),
    ((2, 6, 13), 2, "channels_last", dict(scale=False, shift=False), False, (1, 4, 5)),
    ((2, 8, 5, 7), 2, "contiguous", dict(weight=False, bias=False, shift=False), True, (2, 4, 9)),
    ((2, 8, 5, 7), 2, "channels_last", dict(weight=False, bias=False, scale=False), False, (2, 8, 16)),
    ((2, 8, 5, 7), 4, "channels_last", dict(), True, None),
    ((1, 6, 3, 4, 5), 2, "contiguous", dict(), True, None),
    ((2, 6, 3, 4, 5), 3, "channels_last", dict(bias=False), True, (1, 8, 20)),
    ((3, 5, 4, 3), 1, "contiguous", dict(weight=False, scale=False, shift=False), True, (4, 4, None)),
    ((2, 4, 6, 5), 4, "channels_last", dict(), True, (1, 16, 7)),
    ((2, 8, 4, 6), 2, "channel_slice", dict(), True, (4, 8, 8)),
    ((2, 4, 5, 6), 2, "unmergeable", dict(), True, None),
    ((2, 4, 3, 5, 4), 2, "unmergeable", dict(weight=False, bias=False), False, (2, 4, 16)),
]


@needs_interpreter
@pytest.mark.parametrize(("shape", "num_groups", "layout", "ops", "silu", "tiles"), FLOAT32_CASES)
def test_float32_matches_reference(shape, num_groups, layout, ops, silu, tiles):
    x, w, b, sc, sh = _inputs(shape, num_groups, layout=layout, **ops)
    ref = group_norm_silu_reference(x, num_groups, w, b, scale=sc, shift=sh, silu=silu)
    if tiles is None:
        out = group_norm_silu(x, num_groups, w, b, scale=sc, shift=sh, silu=silu, backend="triton")
    else:
        block_c, block_s, chunk_s = tiles
        out = gnt.group_norm_silu_triton(
            x, num_groups, w, b, 1e-5, sc, sh, silu, block_c=block_c, block_s=block_s, chunk_s=chunk_s
        )
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=_expected_format(x, layout))
    _check_float32(out, ref)


# shape, num_groups, layout, parameter dtype (None: x's dtype), forced tiles (as above) or None
LOW_PRECISION_CASES = [
    ((2, 8, 5, 7), 2, "contiguous", None, None),
    ((2, 8, 5, 7), 2, "channels_last", torch.float32, (2, 8, 9)),
    ((2, 6, 3, 4, 5), 3, "channels_last", None, (2, 16, 20)),
    ((2, 6, 13), 3, "contiguous", torch.float32, None),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "num_groups", "layout", "param_dtype", "tiles"), LOW_PRECISION_CASES)
def test_low_precision_matches_reference(dtype, shape, num_groups, layout, param_dtype, tiles):
    x, w, b, sc, sh = _inputs(shape, num_groups, dtype=dtype, param_dtype=param_dtype, layout=layout)
    block_c, block_s, chunk_s = tiles or (None, None, None)
    out = gnt.group_norm_silu_triton(
        x, num_groups, w, b, 1e-5, sc, sh, True, block_c=block_c, block_s=block_s, chunk_s=chunk_s
    )
    assert out.is_contiguous(memory_format=_expected_format(x, layout))
    _check_low_precision(out, x, num_groups, w, b, sc, sh, True)


@needs_interpreter
@pytest.mark.parametrize(
    ("layout", "tiles"),
    [
        ("contiguous", None),
        ("contiguous", (2, 16, 40)),
        # channels-last, both groups in one program (per-lane statistics), whole and split
        ("channels_last", None),
        ("channels_last", (None, 16, 40)),
    ],
    ids=["one-program", "split", "nhwc-run", "nhwc-run-split"],
)
def test_large_mean_against_float64(layout, tiles):
    """x = 1000 + N(0, 1): a one-pass E[x^2] - E[x]^2 in float32 loses the variance; ours matches float64."""
    x, w, b, sc, sh = _inputs((2, 8, 9, 11), 2, mean=1000.0, layout=layout)
    expand = (..., None, None)
    ref = F.group_norm(x.double(), 2, w.double(), b.double(), 1e-5)
    ref = F.silu(ref * (1 + sc.double()[expand]) + sh.double()[expand])
    block_c, block_s, chunk_s = tiles or (None, None, None)
    runs = 2 if layout == "channels_last" else None
    out = gnt.group_norm_silu_triton(
        x,
        2,
        w,
        b,
        1e-5,
        sc,
        sh,
        True,
        block_c=block_c,
        block_s=block_s,
        chunk_s=chunk_s,
        groups_per_program=runs,
    )
    _check_float32(out, ref)

    # The tolerance is tight enough to catch the naive one-pass statistics.
    xg = x.reshape(2, 2, -1)
    mean = xg.mean(-1, keepdim=True)
    var = (xg * xg).mean(-1, keepdim=True) - mean * mean
    naive = ((xg - mean) / torch.sqrt(var.clamp_min(0) + 1e-5)).view_as(x) * w[:, None, None] + b[
        :, None, None
    ]
    naive = F.silu(naive * (1 + sc[expand]) + sh[expand])
    with pytest.raises(AssertionError):
        _check_float32(naive, ref)


@needs_interpreter
def test_public_function_dispatch(monkeypatch):
    """auto and triton run the kernel under the interpreter; torch runs the reference; without the interpreter,
    auto falls back to the reference and an explicit triton raises."""
    calls = []
    launch = gnt.group_norm_silu_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(gnt, "group_norm_silu_triton", spy)
    x, w, b, sc, sh = _inputs((2, 4, 3, 5), 2, layout="channels_last")
    ref = group_norm_silu_reference(x, 2, w, b, scale=sc, shift=sh)
    for backend, launches in (("auto", 1), ("triton", 1), ("torch", 0)):
        calls.clear()
        out = group_norm_silu(x, 2, w, b, scale=sc, shift=sh, backend=backend)
        assert len(calls) == launches, backend
        assert out.is_contiguous(memory_format=torch.channels_last)
        _check_float32(out, ref)

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    _check_float32(group_norm_silu(x, 2, w, b, scale=sc, shift=sh), ref)
    assert not calls
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        group_norm_silu(x, 2, w, b, backend="triton")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize(
    ("shape", "layout"), [((0, 4, 3, 5), "channels_last"), ((0, 4, 2, 3, 3), "contiguous")]
)
def test_empty_batch(backend, shape, layout):
    x = _layout(torch.randn(shape), layout)
    out = group_norm_silu(x, 2, torch.ones(4), None, scale=torch.zeros(0, 4), backend=backend)
    assert out.shape == shape and out.dtype == x.dtype and out.stride() == x.stride()


def test_float_parameters_with_half_x_match_reference():
    """Documented mix: float32 weight/bias/scale/shift with a half x (torch backend here; kernels above)."""
    x, w, b, sc, sh = _inputs((2, 4, 3, 5), 2, dtype=torch.bfloat16, param_dtype=torch.float32)
    out = group_norm_silu(x, 2, w, b, scale=sc, shift=sh, backend="torch")
    _check_low_precision(out, x, 2, w, b, sc, sh, True)


def _bad_inputs():
    x = torch.randn(2, 6, 4, 4)
    ok = dict(x=x, num_groups=3, weight=torch.ones(6), bias=torch.zeros(6), scale=torch.zeros(2, 6))
    cases = [
        (dict(x=x.tolist()), TypeError, "x must be a tensor"),
        (dict(x=x.double()), TypeError, "x must be float32"),
        (dict(x=x.long()), TypeError, "x must be float32"),
        (dict(x=torch.randn(2, 6), scale=None), ValueError, "x must be"),
        (dict(x=torch.randn(1, 6, 2, 2, 2, 2), scale=None), ValueError, "x must be"),
        (dict(num_groups=4), ValueError, "num_groups"),
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(num_groups=3.0), TypeError, "num_groups"),
        (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
        (dict(bias=torch.zeros(6, 1)), ValueError, "bias must have shape"),
        (dict(scale=torch.zeros(6)), ValueError, "scale must have shape"),
        (dict(shift=torch.zeros(1, 6)), ValueError, "shift must have shape"),
        (dict(weight=torch.ones(6, device="meta")), ValueError, "weight is on meta"),
        (dict(shift=torch.zeros(2, 6, device="meta")), ValueError, "shift is on meta"),
        (dict(weight=torch.ones(6, dtype=torch.float16)), ValueError, "weight must have x's dtype"),
        (
            dict(x=x.half(), scale=torch.zeros(2, 6, dtype=torch.bfloat16)),
            ValueError,
            "scale must have x's dtype",
        ),
        (dict(bias=[0.0] * 6), TypeError, "bias must be a tensor"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    return [
        pytest.param({**ok, **change}, exc, match, id=match.split()[0] + str(i))
        for i, (change, exc, match) in enumerate(cases)
    ]


@pytest.mark.parametrize(("kwargs", "exc", "match"), _bad_inputs())
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_norm_silu(**kwargs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_custom_op_opcheck_and_compile(backend):
    """One opaque op: its fake (meta) output matches the real one, strides included, and torch.compile traces the
    public function without a graph break."""
    x, w, _, sc, _ = _inputs((2, 4, 3, 5), 2, layout="channels_last")
    torch.library.opcheck(
        group_norm_module._group_norm_silu_op, (x, 2, w, None, 1e-5, sc, None, True, backend)
    )

    def fn(x, w, sc):
        return group_norm_silu(x, 2, w, None, scale=sc, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, sc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check_float32(out, group_norm_silu_reference(x, 2, w, None, scale=sc))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_gradients_match_reference(backend):
    x, w, _, sc, sh = _inputs((2, 4, 3, 5), 2, bias=False)
    leaves = [t.clone().requires_grad_() for t in (x, w, sc, sh)]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = group_norm_silu(leaves[0], 2, leaves[1], None, scale=leaves[2], shift=leaves[3], backend=backend)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, sc, sh)]
    ref = group_norm_silu_reference(
        ref_leaves[0], 2, ref_leaves[1], None, scale=ref_leaves[2], shift=ref_leaves[3]
    )
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for g, r in zip(got, want, strict=True):
        _check_float32(g, r)


@needs_triton
@pytest.mark.parametrize("group_c", [1, 3, 6, 10, 12, 18, 20, 24, 30, 40, 60, 80, 1280])
def test_plan_tiles_mask_no_channel_lane_in_nchw(group_c):
    # NCHW: positions are contiguous, so the tile takes a power of two of channels that divides the group's count
    # (SD's 10 channels per group: 2, not 16 with 6 masked off)
    block_c, block_s, _ = gnt._plan(group_c, 4096, 64, 432)
    assert group_c % block_c == 0 and block_c & (block_c - 1) == 0
    assert block_c * block_s <= gnt._TILE_ELEMS
    assert block_c * block_s >= gnt._MIN_TILE_ELEMS
    # channels-last: channels are the contiguous axis, a tile takes them all (padded to a power of two)
    block_c, block_s, _ = gnt._plan(group_c, 4096, 64, 432, channels_last=True)
    assert block_c == min(gnt.triton.next_power_of_2(group_c), gnt._TILE_ELEMS // 16)


@needs_triton
def test_plan_splits_only_while_the_gpu_has_room():
    # A small group: one program per group, whatever the target.
    assert gnt._plan(group_c=4, S=35, groups=4, target_programs=528)[2] >= 35
    # SD's 1280 channels at 64x64, batch 2 on a 132-SM GPU: 64 groups are too few, so split along S into chunks of
    # whole tiles, none under _MIN_CHUNK_ELEMS elements, tiles not under _MIN_TILE_ELEMS.
    block_c, block_s, chunk_s = gnt._plan(group_c=40, S=4096, groups=64, target_programs=528)
    assert chunk_s < 4096 and chunk_s % block_s == 0
    assert 40 * chunk_s >= gnt._MIN_CHUNK_ELEMS and block_c * block_s >= gnt._MIN_TILE_ELEMS
    assert 64 * -(-4096 // chunk_s) >= 528 // 2  # whole tiles per chunk may round the count down
    # Enough groups to fill the GPU already: no split.
    assert gnt._plan(group_c=40, S=4096, groups=2048, target_programs=528)[2] >= 4096
    # The interpreter runs programs one after another, so it never asks for a split.
    assert gnt._target_programs(torch.device("cpu")) == 1


@needs_triton
@pytest.mark.parametrize(
    ("channels", "size", "programs"),
    [(320, 32, 256), (640, 32, 512), (1280, 32, 512), (640, 16, 128), (2560, 16, 512), (1280, 8, 64)],
)
def test_sd15_levels_spread_over_an_a100(channels, size, programs):
    """The launch an A100 (108 SMs) gets for SD 1.5's GroupNorms at batch 2, recorded on meta tensors: the 32x32 and
    16x16 levels used to run 64 programs (one per group); the 8x8 level's groups of 2560 elements stay whole."""
    from fastdiff.benchmarks.aot_compile import record_launches

    x = torch.empty(2, channels, size, size, device="meta", dtype=torch.float16)
    w = torch.empty(channels, device="meta", dtype=torch.float16)
    kernels = [gnt._group_norm_silu_fused_kernel, gnt._group_norm_stats_kernel, gnt._group_norm_apply_kernel]
    with simulated_gpu(108), record_launches(kernels) as launches:
        gnt.group_norm_silu_triton(x, 32, w, w, 1e-5, None, None, True)
    assert [launch.programs for launch in launches] == [programs] * len(launches)
    assert all((channels // 32) % launch.kwargs["BLOCK_C"] == 0 for launch in launches)


# NCHW groups of 10 channels (SD's count) in tiles of 2 channels, so the channel mask is constant; channels-last the
# same groups both in one program of 20 channels (float32) or each alone in 16 lanes (float16: no run of whole
# 16-byte vectors beats it); forced 16-lane tiles hold one group; forced chunks take the split path with each.
EXACT_TILE_CASES = [
    ("contiguous", None),
    ("contiguous", (2, 16, 32)),
    ("channels_last", None),
    ("channels_last", (16, 16, 32)),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("layout", "tiles"), EXACT_TILE_CASES)
def test_groups_of_ten_channels_match_reference(dtype, layout, tiles):
    x, w, b, sc, sh = _inputs((2, 20, 8, 8), 2, dtype=dtype, layout=layout)
    block_c, block_s, chunk_s = tiles or (None, None, None)
    if tiles is None:
        assert gnt._plan(10, 64, 4, 1, channels_last=layout == "channels_last")[0] == (
            16 if layout == "channels_last" else 2
        )
    out = gnt.group_norm_silu_triton(
        x, 2, w, b, 1e-5, sc, sh, True, block_c=block_c, block_s=block_s, chunk_s=chunk_s
    )
    assert out.is_contiguous(memory_format=_expected_format(x, layout))
    if dtype == torch.float32:
        _check_float32(out, group_norm_silu_reference(x, 2, w, b, scale=sc, shift=sh))
    else:
        _check_low_precision(out, x, 2, w, b, sc, sh, True)


@needs_triton
@pytest.mark.parametrize(
    ("group_c", "vector", "groups", "lanes_used"),
    [
        # SD's channels per group (32 groups) in half precision: runs of 120 channels in 128 lanes (240 of 256 at 80)
        (10, 8, 12, 320 / (3 * 128)),
        (20, 8, 6, 640 / (6 * 128)),
        (40, 8, 3, 1280 / (11 * 128)),
        (30, 8, 4, 960 / (8 * 128)),
        (60, 8, 2, 1920 / (16 * 128)),
        (80, 8, 3, 2560 / (11 * 256)),
        (16, 8, 1, 1.0),  # a power of two fills its lanes alone
        (10, 4, 6, 320 / (6 * 64)),  # float32: 60 channels are whole 16-byte vectors
        (320, 8, 1, 320 / 512),  # over 256 channels: one group a program, in 256-lane tiles
    ],
)
def test_channels_last_programs_take_runs_of_groups(group_c, vector, groups, lanes_used):
    assert gnt._groups_per_program(group_c, 32, vector) == groups
    block_c = min(gnt.triton.next_power_of_2(groups * group_c), 256)
    used = 32 * group_c / (-(-32 // groups) * -(-groups * group_c // block_c) * block_c)
    assert used == pytest.approx(lanes_used)
    if groups > 1:
        # every run (the last one shorter) is whole 16-byte vectors, and the kernel is told so
        assert gnt._lane_alignment(group_c, 32, groups, vector) == vector


@needs_triton
@pytest.mark.parametrize(
    ("channels", "size", "groups", "block_c", "programs"),
    [
        (320, 64, 12, 128, 768),  # 3 runs a sample (12 + 12 + 8 groups), split into 128 chunks
        (1280, 32, 3, 128, 704),
        # the 8x8 level: runs would need a second launch (split statistics); one group a program keeps one launch
        (1280, 8, 1, 64, 64),
    ],
)
def test_sd15_channels_last_launches_on_an_a100(channels, size, groups, block_c, programs):
    from fastdiff.benchmarks.aot_compile import record_launches

    x = torch.empty(2, channels, size, size, device="meta", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.empty(channels, device="meta", dtype=torch.float16)
    kernels = [gnt._group_norm_silu_fused_kernel, gnt._group_norm_stats_kernel, gnt._group_norm_apply_kernel]
    with simulated_gpu(108), record_launches(kernels) as launches:
        gnt.group_norm_silu_triton(x, 32, w, w, 1e-5, None, None, True)
    for launch in launches:
        assert (launch.kwargs["GROUPS"], launch.kwargs["BLOCK_C"], launch.programs) == (
            groups,
            block_c,
            programs,
        )


# channels per group: SD's 10 / 20 / 40, 30 (a run of 4 is 120 channels), 3 (runs of 5 in 16 lanes), 16 (a power
# of two: alone in float16); 5 groups, so runs of 3 leave a shorter last run of 2.
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_c", [10, 20, 40, 30, 3, 16])
@pytest.mark.parametrize(
    "forced", [None, (3, 8, 4)], ids=["auto", "runs-of-3-split"]
)  # (groups_per_program, block_s, chunk_s)
def test_channels_last_runs_of_groups_match_reference(dtype, group_c, forced):
    x, w, b, sc, sh = _inputs((2, 5 * group_c, 3, 5), 5, dtype=dtype, layout="channels_last")
    runs, block_s, chunk_s = forced or (None, None, None)
    out = gnt.group_norm_silu_triton(
        x, 5, w, b, 1e-5, sc, sh, True, block_s=block_s, chunk_s=chunk_s, groups_per_program=runs
    )
    assert out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        _check_float32(out, group_norm_silu_reference(x, 5, w, b, scale=sc, shift=sh))
    else:
        _check_low_precision(out, x, 5, w, b, sc, sh, True)


@needs_triton
def test_groups_per_program_must_fit_the_tile():
    x = torch.empty(1, 20, 4, 4, device="meta").contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="block_c >= 20"):
        gnt.group_norm_silu_triton(x, 2, None, None, 1e-5, None, None, True, block_c=16, groups_per_program=2)


@needs_triton
def test_huge_sample_is_refused_not_overflowed():
    """Meta tensors: no memory, but the launcher's 32-bit offset check sees the real sizes."""
    x = torch.empty(1, 2, 2**16, 2**15 + 1, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        gnt.group_norm_silu_triton(x, 1, None, None, 1e-5, None, None, True)


def _compile_for_sm90() -> None:
    """Compile each kernel for an H100 (sm_90) without a GPU: the interpreter tests cannot catch code that only
    the compiler rejects. Runs in a subprocess started with TRITON_INTERPRET=0."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True)
    cases = [  # kernel, element type, constexprs (a stride of 1 is specialised the way a launch does it)
        (gnt._group_norm_silu_fused_kernel, "fp16", dict(flags, stride_xc=1, stride_yc=1, BLOCK_C=64, BLOCK_S=64)),
        (gnt._group_norm_stats_kernel, "fp32", dict(stride_xs=1, BLOCK_C=16, BLOCK_S=256)),
        (gnt._group_norm_apply_kernel, "bf16", dict(flags, SILU=False, stride_xs=1, stride_ys=1, BLOCK_C=16,
                                                   BLOCK_S=256, BLOCK_K=8)),
        # channels-last runs of 3 groups of 40 channels in 128 lanes
        (gnt._group_norm_silu_fused_kernel, "fp16", dict(flags, stride_xc=1, stride_yc=1, BLOCK_C=128, BLOCK_S=32,
                                                        GROUPS=3, BLOCK_G=4, LANE_ALIGN=8)),
        (gnt._group_norm_apply_kernel, "fp16", dict(flags, stride_xc=1, stride_yc=1, BLOCK_C=128, BLOCK_S=32,
                                                   GROUPS=3, BLOCK_G=4, LANE_ALIGN=8, BLOCK_K=16)),
    ]  # fmt: skip
    for kernel, dtype, constexprs in cases:
        constexprs = {"GROUP_C": 40, "GROUPS": 1, "BLOCK_G": 1, "LANE_ALIGN": 1, **constexprs}
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name == "partial_ptr" else f"*{dtype}"
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert ".entry" in compiled.asm["ptx"]


@needs_triton
def test_kernels_compile_for_gpu(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gn_test', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module._compile_for_sm90()\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# Stable Diffusion shapes: (N, C, H, W), groups, layout, scale-shift on.
SD_CASES = [
    ((2, 1280, 64, 64), 32, "contiguous", False),
    ((2, 1280, 64, 64), 32, "channels_last", True),
    ((2, 320, 64, 64), 32, "contiguous", True),
    ((2, 320, 64, 64), 32, "channels_last", False),
    ((16, 640, 32, 32), 32, "contiguous", False),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("shape", "num_groups", "layout", "scale_shift"), SD_CASES)
def test_cuda_sd_shapes(dtype, shape, num_groups, layout, scale_shift):
    x, w, b, sc, sh = _inputs(
        shape, num_groups, dtype=dtype, layout=layout, scale=scale_shift, shift=scale_shift
    )
    x, w, b, sc, sh = (None if t is None else t.cuda() for t in (x, w, b, sc, sh))
    out = group_norm_silu(x, num_groups, w, b, scale=sc, shift=sh, backend="triton")
    assert out.is_contiguous(memory_format=_expected_format(x, layout))
    if dtype == torch.float32:
        _check_float32(out, group_norm_silu_reference(x, num_groups, w, b, scale=sc, shift=sh))
    else:
        _check_low_precision(out, x, num_groups, w, b, sc, sh, True)


@pytest.mark.cuda
@needs_cuda
def test_cuda_large_mean_split_path():
    x, w, b, _, _ = _inputs((2, 1280, 64, 64), 32, mean=1000.0, scale=False, shift=False)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5))
    _check_float32(group_norm_silu(x, 32, w, b, backend="triton"), ref)

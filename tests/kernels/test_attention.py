"""fastdiff.kernels.attention: the flash-attention Triton kernel against its float32 PyTorch reference.

CPU tests run the kernel under the Triton interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1).

Tolerances, against `attention_reference` evaluated in float32 on the same (rounded) inputs:
- float32: max|out - ref| <= 1e-5 * max(1, max|ref|).
- float16 / bfloat16: max|out - ref| <= 2 * max|sdpa - ref| + u, where sdpa is eager
  `F.scaled_dot_product_attention` run in the same low precision and u = finfo(dtype).eps / 2 is the dtype's unit
  roundoff (float16 4.9e-4, bfloat16 3.9e-3), one rounding of an output of magnitude 1.
- float32 with allow_tf32=True: max|out - ref| <= 5e-3 * max(1, max|ref|): TF32 rounds both operands of every
  product to 10 mantissa bits (relative 4.9e-4 each), on logits and weights of magnitude a few units. The
  interpreter multiplies in full float32 whatever the precision, so on CPU this checks the path, on a GPU the
  rounding.

bfloat16 under the interpreter: its `tl.dot` multiplies bfloat16 tiles as raw uint16 bits, so when the interpreter
is on the kernel upcasts bfloat16 dot operands to float32 (exact: a bf16 x bf16 product fits in float32, as in a
tensor-core MMA with float32 accumulation). The CPU bf16 tests therefore check the bf16 loads, the rounding of the
probabilities to bf16, the masks and the stores; the bf16 `tl.dot` itself is checked by the `cuda` tests.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdiff.errors import BackendUnavailableError
from fastdiff.kernels.attention import attention, attention_reference
from fastdiff.kernels.backend import interpreter_enabled, simulated_gpu, triton_importable

# The Triton half of the op, which `import fastdiff` does not load (tests that use it need triton).
kernel = importlib.import_module("fastdiff.kernels.attention_triton") if triton_importable() else None

interpreted = pytest.mark.skipif(
    not (triton_importable() and interpreter_enabled()), reason="needs triton and TRITON_INTERPRET=1"
)
needs_triton_only = pytest.mark.skipif(not triton_importable(), reason="needs triton")


def compiled_cuda(test):
    """Marks a test of the compiled kernel on a GPU."""
    for mark in (
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        pytest.mark.skipif(not triton_importable(), reason="needs triton"),
        pytest.mark.skipif(
            interpreter_enabled(), reason="tests the compiled kernel: run with TRITON_INTERPRET=0"
        ),
    ):
        test = mark(test)
    return test


def _qkv(shape, dtype=torch.float32, device="cpu", seed=0, head_dim_v=None):
    """Random q, k, v for (batch, heads, seq_q, seq_k, head_dim)."""
    batch, heads, seq_q, seq_k, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=g)
    k = torch.randn(batch, heads, seq_k, head_dim, generator=g)
    v = torch.randn(batch, heads, seq_k, head_dim_v or head_dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _reference32(q, k, v, scale=None):
    return attention_reference(q.float(), k.float(), v.float(), scale=scale)


def assert_close_float32(out, q, k, v, scale=None):
    ref = _reference32(q, k, v, scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"float32 error {err:.3g}"


def assert_close_tf32(out, q, k, v, scale=None):
    ref = _reference32(q, k, v, scale)
    err = (out - ref).abs().max().item()
    assert err <= 5e-3 * max(1.0, ref.abs().max().item()), f"tf32 error {err:.3g}"


def assert_close_low_precision(out, q, k, v, scale=None):
    ref = _reference32(q, k, v, scale)
    assert out.dtype == q.dtype and out.shape == ref.shape
    eager = F.scaled_dot_product_attention(q, k, v, scale=scale)
    eager_err = (eager.float() - ref).abs().max().item()
    err = (out.float() - ref).abs().max().item()
    tol = 2 * eager_err + torch.finfo(q.dtype).eps / 2
    assert err <= tol, f"{q.dtype} error {err:.3g} > {tol:.3g} (eager sdpa error {eager_err:.3g})"


# (batch, heads, seq_q, seq_k, head_dim): odd lengths leave masked tails on q and k; head dims 40, 80, 96 and 160
# are padded to 64, 128, 128 and 256 inside the kernel. The default tiles (_block_config) split several of these into
# more than one query or key block; test_small_tiles_rescale_across_many_blocks forces many.
SHAPES = [
    (2, 2, 33, 33, 40),  # self-attention, SD's head_dim
    (1, 2, 70, 17, 80),  # cross-attention, more queries than keys
    (1, 1, 5, 70, 160),  # cross-attention, more keys than queries, two key blocks
    (2, 2, 64, 64, 64),  # power-of-two head_dim, no tails
    (1, 3, 9, 77, 96),  # text-conditioning length 77
]


@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_matches_reference(shape):
    q, k, v = _qkv(shape)
    assert_close_float32(attention(q, k, v, backend="triton"), q, k, v)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_low_precision_matches_reference(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    assert_close_low_precision(attention(q, k, v, backend="triton"), q, k, v)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_small_tiles_rescale_across_many_blocks(dtype):
    # 16x16 tiles: 5 query blocks x 3 key blocks, both with tails. Keys grow along the sequence, so the running
    # max rises from block to block and every earlier partial sum must be rescaled correctly.
    q, k, v = _qkv((1, 2, 70, 45, 32), dtype)
    k = k * torch.linspace(0.2, 3.0, 45, dtype=dtype)[:, None]
    out = kernel.attention_triton(q, k, v, 1 / math.sqrt(32), block_m=16, block_n=16)
    check = assert_close_float32 if dtype == torch.float32 else assert_close_low_precision
    check(out, q, k, v)


@interpreted
def test_head_dim_of_v_may_differ():
    q, k, v = _qkv((1, 2, 19, 23, 32), head_dim_v=48)
    out = attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 19, 48)
    assert_close_float32(out, q, k, v)


@interpreted
@pytest.mark.parametrize("scale", [0.05, 0.9])
def test_custom_scale(scale):
    # scale 0.9 on head_dim 40 gives logits of tens: the softmax is nearly one-hot, which needs the max subtraction
    q, k, v = _qkv((1, 2, 21, 37, 40), seed=1)
    assert_close_float32(attention(q, k, v, scale=scale, backend="triton"), q, k, v, scale)


@interpreted
def test_strided_views_of_fused_qkv():
    # a fused projection (batch, seq, 3 * heads * head_dim) viewed as q, k, v without copies
    batch, seq, heads, head_dim = 2, 37, 2, 40
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=torch.Generator().manual_seed(2))
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    assert out.is_contiguous()
    assert_close_float32(out, q, k, v)


@interpreted
def test_strided_cross_attention_non_unit_head_dim_stride():
    # q in (batch, seq, heads, head_dim) memory order, k/v every other element of the last axis (stride 2),
    # v with 80 of 96 lanes
    q = torch.randn(1, 29, 3, 80).transpose(1, 2)
    k = torch.randn(1, 3, 13, 160)[..., ::2]
    v = torch.randn(1, 3, 13, 96)[..., :80]
    assert k.stride(-1) == 2
    assert_close_float32(attention(q, k, v, backend="triton"), q, k, v)


@interpreted
@pytest.mark.parametrize(
    ("q_shape", "kv_shape"),
    [((0, 2, 5, 8), (0, 2, 7, 8)), ((1, 2, 0, 8), (1, 2, 7, 8)), ((1, 0, 5, 8), (1, 0, 7, 8))],
    ids=["empty-batch", "empty-q", "no-heads"],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_inputs_give_empty_output(q_shape, kv_shape, backend):
    out = attention(torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape), backend=backend)
    assert out.shape == q_shape and out.dtype == torch.float32


@interpreted
def test_custom_op_registration_and_fake():
    q, k, v = _qkv((1, 2, 9, 11, 16))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.25, "triton", False))


@interpreted
def test_compiles_without_graph_break():
    q, k, v = _qkv((1, 2, 17, 9, 40))
    compiled = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True, backend="aot_eager")
    assert_close_float32(compiled(q, k, v) / 2, q, k, v)


def test_torch_backend_is_the_reference():
    q, k, v = _qkv((2, 2, 13, 7, 24))
    assert torch.equal(
        attention(q, k, v, scale=0.3, backend="torch"), attention_reference(q, k, v, scale=0.3)
    )


def test_reference_matches_sdpa():
    q, k, v = _qkv((2, 2, 13, 7, 24))
    assert_close_float32(F.scaled_dot_product_attention(q, k, v), q, k, v)


def test_triton_backend_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv((1, 1, 4, 4, 16))
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        attention(q, k, v, backend="triton")


def test_unknown_backend_raises():
    q, k, v = _qkv((1, 1, 4, 4, 16))
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cuda")


def _bad(**change):
    """Valid (q, k, v, scale) with one thing changed; values are shapes unless a tensor is given."""
    args = {"q": (2, 3, 5, 16), "k": (2, 3, 7, 16), "v": (2, 3, 7, 16), "scale": None}
    args.update(change)
    return [torch.randn(a) if isinstance(a, tuple) else a for a in (args["q"], args["k"], args["v"])], args[
        "scale"
    ]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"q": (3, 5, 16)}, r"^q must be 4-D"),
        ({"k": (2, 3, 7, 16, 1)}, r"^k must be 4-D"),
        ({"v": (7, 16)}, r"^v must be 4-D"),
        ({"k": (1, 3, 7, 16), "v": (1, 3, 7, 16)}, r"^k has \(batch, heads\)"),
        ({"k": (2, 2, 7, 16), "v": (2, 2, 7, 16)}, r"^k has \(batch, heads\)"),
        ({"v": (2, 4, 7, 16)}, r"^v has \(batch, heads\)"),
        ({"k": (2, 3, 7, 8)}, r"^k has head_dim 8 but q has 16"),
        ({"v": (2, 3, 6, 16)}, r"^v has seq 6 but k has 7"),
        ({"k": (2, 3, 0, 16), "v": (2, 3, 0, 16)}, r"^k must hold at least one key"),
        ({"q": (2, 3, 5, 300), "k": (2, 3, 7, 300)}, r"^q head_dim must be in 1\.\.256"),
        ({"v": (2, 3, 7, 257)}, r"^v head_dim must be in 1\.\.256"),
        ({"k": torch.randn(2, 3, 7, 16, dtype=torch.float64)}, r"^k\.dtype must be float16"),
        ({"v": torch.randn(2, 3, 7, 16, dtype=torch.float16)}, r"^v\.dtype is torch\.float16 but q\.dtype"),
        ({"k": torch.randn(2, 3, 7, 16, device="meta")}, r"^k is on meta but q is on cpu"),
        ({"scale": 0.0}, r"^scale must be a positive finite number"),
        ({"scale": -0.5}, r"^scale must be a positive finite number"),
        ({"scale": float("nan")}, r"^scale must be a positive finite number"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs_raise_value_error(change, match):
    (q, k, v), scale = _bad(**change)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, scale=scale)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"q": [[1.0]]}, r"^q must be a torch\.Tensor"), ({"scale": "0.1"}, r"^scale must be a positive float")],
)
def test_bad_types_raise_type_error(change, match):
    (q, k, v), scale = _bad(**change)
    with pytest.raises(TypeError, match=match):
        attention(q, k, v, scale=scale)


# Realistic shapes, compiled kernel on the GPU: (batch, heads, seq_q, seq_k, head_dim)
GPU_SHAPES = {
    "sd-64x64-self": (2, 8, 4096, 4096, 40),  # SD 1.x at 512 px: 64x64 latents, 320 channels in 8 heads
    "sd-64x64-cross": (2, 8, 4096, 77, 40),  # 77 text tokens, to_k/to_v project 768 -> 320 channels: 8 x 40
    "adm64-32x32": (4, 6, 1024, 1024, 64),  # ADM ImageNet-64, 384 channels at 32x32, 64-channel heads
    "adm64-8x8": (4, 12, 64, 64, 64),  # the same model at 8x8, 768 channels
    "head-dim-160": (1, 4, 333, 555, 160),  # padded to 256, tails on both sides
    "head-dim-80": (2, 4, 1000, 77, 80),  # padded to 128
}


@compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_cuda_low_precision_matches_reference(shape, dtype):
    q, k, v = _qkv(shape, dtype, device="cuda")
    assert_close_low_precision(attention(q, k, v), q, k, v)


@compiled_cuda
@pytest.mark.parametrize("shape", [GPU_SHAPES["sd-64x64-cross"], GPU_SHAPES["head-dim-160"]], ids=str)
def test_cuda_float32_matches_reference(shape):
    # float32 uses full-precision products (no TF32), so it holds the float32 tolerance on the GPU too
    q, k, v = _qkv(shape, device="cuda")
    assert_close_float32(attention(q, k, v), q, k, v)


@compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_strided_views_of_fused_qkv(dtype):
    batch, seq, heads, head_dim = 2, 4096, 8, 40
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert_close_low_precision(attention(q, k, v), q, k, v)


@compiled_cuda
def test_cuda_compiles_without_graph_break():
    q, k, v = _qkv(GPU_SHAPES["sd-64x64-cross"], torch.float16, device="cuda")
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    assert_close_low_precision(compiled(q, k, v), q, k, v)


def test_gradients_match_reference():
    """Training goes through the custom op: its backward must equal autograd through the reference."""
    from fastdiff.kernels.attention import attention, attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 2, 5, 8, generator=g)
    got = torch.autograd.grad(attention(q, k, v, backend="torch"), (q, k, v), grad)
    want = torch.autograd.grad(attention_reference(q, k, v), (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _recorded_launch(fn):
    """The kwargs of the one attention kernel launch that `fn()` makes, recorded instead of run."""
    from fastdiff.benchmarks.aot_compile import record_launches

    with record_launches([kernel._attention_fwd_kernel]) as launches:
        fn()
    assert len(launches) == 1
    return launches[0]


def _heads_view(batch, seq, heads, head_dim, dtype=torch.float16, device="cpu", offset=0):
    """(batch, heads, seq, head_dim) view of a (batch, seq, heads * head_dim) projection, as diffusers makes it;
    `offset` elements into its storage."""
    flat = torch.randn(batch * seq * heads * head_dim + offset, dtype=torch.float32).to(dtype).to(device)
    return flat[offset:].view(batch, seq, heads, head_dim).transpose(1, 2)


@needs_triton_only
def test_vector_alignment_needs_aligned_pointers_and_strides():
    sd = _heads_view(1, 8, 8, 40)  # strides (2560, 40, 320, 1): multiples of 8 halves
    assert kernel._vector_alignment(sd, sd, sd) == 8
    assert kernel._vector_alignment(sd.float(), sd.float()) == 4
    assert kernel._vector_alignment(_heads_view(1, 8, 8, 40, offset=4)) == 1  # base pointer 8 bytes off
    assert kernel._vector_alignment(_heads_view(1, 8, 8, 36)) == 1  # head stride 36 halves = 72 bytes
    assert (
        kernel._vector_alignment(torch.randn(1, 2, 8, 80, dtype=torch.float16)[..., ::2]) == 1
    )  # last stride 2


@needs_triton_only
@pytest.mark.parametrize(("offset", "align"), [(0, 8), (4, 1)])
def test_launch_passes_the_checked_alignment(offset, align):
    q = _heads_view(1, 8, 8, 40, offset=offset)
    launch = _recorded_launch(lambda: kernel.attention_triton(q, q, q, 0.1))
    assert launch.kwargs["ALIGN"] == align


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [0, 4], ids=["aligned", "misaligned"])
def test_aligned_and_misaligned_views_match_reference(dtype, offset):
    # head dim 40 views of (batch, seq, heads * 40) projections: ALIGN 8 (fp16) / 4 (fp32), or 1 off a 16-byte boundary
    q, k, v = (_heads_view(1, 33, 2, 40, dtype, offset=offset) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    check = assert_close_float32 if dtype == torch.float32 else assert_close_low_precision
    check(out, q, k, v)


def test_block_m_shrinks_until_every_sm_has_a_program():
    assert kernel._block_m_for_grid(64, 256, 16, None) == 64  # CPU interpreter: no SMs to fill
    assert kernel._block_m_for_grid(64, 256, 16, 108) == 32  # SD 1.5 16x16, batch 2 x 8 heads: 128 programs
    assert kernel._block_m_for_grid(64, 256, 16, 132) == 16  # H100: 256 programs
    assert kernel._block_m_for_grid(64, 64, 16, 108) == 16  # 8x8: 64 programs is all there is
    assert kernel._block_m_for_grid(128, 4096, 16, 132) == 128  # 512 programs already


@needs_triton_only
def test_short_sequences_get_small_tiles_on_a_gpu():
    q = _heads_view(2, 64, 8, 160, device="meta")
    with simulated_gpu(108):
        launch = _recorded_launch(lambda: kernel.attention_triton(q, q, q, 0.1))
    assert launch.kwargs["BLOCK_M"] == 16 and launch.kwargs["num_warps"] == 4
    assert launch.programs == 64


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_dim_160_in_16_row_tiles_with_4_warps(dtype):
    # the configuration the grid rule picks for SD's 8x8 level: BLOCK_M 16, 4 warps, BLOCK_D 256
    q, k, v = _qkv((1, 1, 40, 77, 160), dtype)
    out = kernel.attention_triton(q, k, v, 160**-0.5, block_m=16, block_n=32)
    check = assert_close_float32 if dtype == torch.float32 else assert_close_low_precision
    check(out, q, k, v)


@needs_triton_only
@pytest.mark.parametrize(
    ("seq", "head_dim", "sms", "config", "programs"),
    [
        # SD 1.5 32x32, head dim 80: 64 rows in 4 warps, 16-key blocks (3 blocks per A100 SM: one wave of 324 slots)
        (1024, 80, 108, (64, 16, 4, 3), 256),
        (1024, 80, 132, (64, 16, 4, 3), 256),
        # 16x16, head dim 160 on an A100: 32-row tiles take 16-key blocks (180 registers with 32, 152 with 16)
        (256, 160, 108, (32, 16, 4, 2), 128),
        (256, 160, 132, (16, 32, 4, 2), 256),
    ],
)
def test_sd15_launch_configs(seq, head_dim, sms, config, programs):
    q = _heads_view(2, seq, 8, head_dim, device="meta")
    with simulated_gpu(sms):
        launch = _recorded_launch(lambda: kernel.attention_triton(q, q, q, 0.1))
    got = tuple(launch.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    assert got == config and launch.programs == programs


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("head_dim", "block_m"), [(80, 64), (160, 32)])
def test_sixteen_key_blocks_match_reference(dtype, head_dim, block_m):
    # the tiles SD's 32x32 (d=80) and an A100's 16x16 (d=160) get: 16-key blocks, here 5 of them with a tail of 13
    q, k, v = _qkv((1, 1, 40, 77, head_dim), dtype)
    out = kernel.attention_triton(q, k, v, head_dim**-0.5, block_m=block_m, block_n=16)
    check = assert_close_float32 if dtype == torch.float32 else assert_close_low_precision
    check(out, q, k, v)


@pytest.fixture
def tf32_flag():
    """Restores torch's global TF32 flag. Not monkeypatch: torch.backends.cuda.matmul is a proxy object whose
    attributes monkeypatch (pytest >= 9.2) tries to delete on undo, which fails."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@needs_triton_only
@pytest.mark.parametrize(
    ("allow", "flag", "precision"),
    [(True, False, "tf32"), (False, True, "ieee"), (None, True, "tf32"), (None, False, "ieee")],
)
def test_allow_tf32_picks_the_float32_precision(tf32_flag, allow, flag, precision):
    torch.backends.cuda.matmul.allow_tf32 = flag
    q, k, v = _qkv((1, 1, 16, 16, 32))
    launch = _recorded_launch(lambda: attention(q, k, v, allow_tf32=allow, backend="triton"))
    assert launch.kwargs["PRECISION"] == precision


def test_tf32_read_is_marked_as_torch_marks_a_constant_result():
    # attention() reads the setting as a trace-time constant under torch.compile (test_compiles_without_graph_break)
    from fastdiff.kernels.attention import _torch_allows_tf32

    marked = torch.compiler.assume_constant_result(lambda: True)
    assert vars(marked) == vars(_torch_allows_tf32) == {"_dynamo_marked_constant": True}


@pytest.mark.parametrize(
    "setting",
    [
        'torch.backends.cuda.matmul.fp32_precision = "tf32"',
        'torch.backends.fp32_precision = "tf32"',
        'torch.set_float32_matmul_precision("high")',
    ],
)
def test_allow_tf32_follows_torchs_new_precision_api(setting):
    # In a new process: torch cannot return to reading its legacy flag once the new API was used, and reading
    # that flag then raises, so this also shows attention() no longer reads it.
    script = f"""
import torch
from fastdiff.kernels import attention
from fastdiff.kernels.attention import _torch_allows_tf32
q = torch.randn(1, 2, 8, 16)
{setting}
assert _torch_allows_tf32() is True
attention(q, q, q, backend="torch")
torch.backends.cuda.matmul.fp32_precision = "ieee"
assert _torch_allows_tf32() is False
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_triton_only
def test_allow_tf32_leaves_low_precision_alone():
    q, k, v = _qkv((1, 1, 16, 16, 32), torch.float16)
    for allow in (True, False):
        launch = _recorded_launch(lambda allow=allow: attention(q, k, v, allow_tf32=allow, backend="triton"))
        assert launch.kwargs["PRECISION"] == "tf32"  # the tensor-core path, whatever the flag


@interpreted
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_tf32_matches_reference(shape):
    q, k, v = _qkv(shape)
    assert_close_tf32(attention(q, k, v, allow_tf32=True, backend="triton"), q, k, v)


def test_allow_tf32_must_be_bool():
    q, k, v = _qkv((1, 1, 4, 4, 16))
    with pytest.raises(TypeError, match="allow_tf32 must be a bool or None"):
        attention(q, k, v, allow_tf32=1)


@compiled_cuda
@pytest.mark.parametrize("shape", [GPU_SHAPES["sd-64x64-cross"], GPU_SHAPES["head-dim-160"]], ids=str)
def test_cuda_tf32_matches_reference(shape):
    q, k, v = _qkv(shape, device="cuda")
    assert_close_tf32(attention(q, k, v, allow_tf32=True), q, k, v)

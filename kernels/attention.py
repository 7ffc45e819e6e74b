"""Flash-attention forward (online softmax), self- and cross-attention."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdiff.kernels.backend import (
    check_backend,
    decomposing,
    eager_call,
    resolve_backend,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Plain-PyTorch twin: softmax(q k^T * scale) v on (batch, heads, seq, head_dim), float32 math."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    w = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(w, v.float()).to(q.dtype)


def _attention_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str, allow_tf32: bool
) -> torch.Tensor:
    if resolve_backend(backend, q.device) == "triton":
        # an empty grid is not launchable
        if q.numel() == 0:
            return q.new_empty((*q.shape[:3], v.shape[3]))
        from fastdiff.kernels.attention_triton import attention_triton  # Triton loads on first use

        return attention_triton(q, k, v, scale, allow_tf32=allow_tf32)
    return attention_reference(q, k, v, scale=scale)


_attention_op = torch.library.custom_op("fastdiff::attention", mutates_args=())(_attention_body)


@_attention_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str, allow_tf32: bool
) -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, _backend, _allow_tf32 = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad: torch.Tensor):
    # Training is not the fast path: gradients come from recomputing the reference (autograd through it).
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        out = attention_reference(*leaves, scale=ctx.scale)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    return (*(next(grads) if t.requires_grad else None for t in leaves), None, None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """Validate attention inputs; return the softmax scale (1/sqrt(head_dim) when `scale` is None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all three must share one device"
            )
        if t.dtype != q.dtype:
            raise ValueError(
                f"{name}.dtype is {t.dtype} but q.dtype is {q.dtype}; all three must share one dtype"
            )
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name} has (batch, heads) = {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])}; they must match"
            )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has {q.shape[3]}; q and k must share head_dim")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has seq {v.shape[2]} but k has {k.shape[2]}; k and v must hold the same keys")
    if k.shape[2] == 0:
        raise ValueError("k must hold at least one key (seq_k = 0): softmax over no keys is undefined")
    for name, d in (("q", q.shape[3]), ("v", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[3])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def _trace_time_constant(fn: Callable[[], bool]) -> Callable[[], bool]:
    # What torch.compiler.assume_constant_result does, without the import of torch._dynamo (1.7 s) that it
    # costs an eager run; tests check that torch's decorator still marks functions this way.
    fn._dynamo_marked_constant = True
    return fn


@_trace_time_constant
def _torch_allows_tf32() -> bool:
    # Reading the legacy allow_tf32 flag raises once a caller has used the new fp32_precision API, so the new
    # one is read where it exists (it reflects settings made through either API). Dynamo cannot trace that getter:
    # a compiled graph takes its value at trace time as a constant, as it does the legacy flag.
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T * scale) v on (batch, heads, seq, head_dim).

    k and v may hold a different number of keys than q has queries (cross-attention), v may have its own
    head_dim, and all three may be strided views (e.g. slices of a fused qkv projection). The output is
    contiguous, in q's dtype; `scale` defaults to 1/sqrt(head_dim). `allow_tf32` lets the Triton kernel multiply
    float32 inputs on tensor cores in TF32 (10-bit mantissa: relative error about 1e-3); None follows
    torch's float32 matmul setting (`torch.backends.cuda.matmul.fp32_precision`, which the legacy `allow_tf32`
    flag and `torch.set_float32_matmul_precision` also set; off by default), and float16 / bfloat16 inputs
    ignore it.
    """
    scale = _check_inputs(q, k, v, scale)
    if allow_tf32 is None:
        allow_tf32 = _torch_allows_tf32()
    elif not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    if decomposing():
        check_backend(backend)
        return attention_reference(q, k, v, scale=scale)
    # the backend is resolved inside the op, so a compiled graph keeps one opaque node
    if eager_call(q, k, v):
        return _attention_body(q, k, v, scale, backend, allow_tf32)
    return _attention_op(q, k, v, scale, backend, allow_tf32)

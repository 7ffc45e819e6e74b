"""The Triton per-step sampler kernel and its launch (`fastdiff.kernels.sampler_step` imports this on first use;
the row math is described there)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels.backend import memory_format
from fastdiff.table import COLUMN, LEARNED_VARIANCES

# Column offsets of the row (the schema lives in fastdiff.table).
_K = {name: tl.constexpr(i) for name, i in COLUMN.items()}
_A, _B, _P, _Q = _K["a"], _K["b"], _K["p"], _K["q"]
_XC_X, _XC_S, _XC_0, _XC_1, _XC_2, _XC_3 = (_K[f"xc_{n}"] for n in ("x", "s", "0", "1", "2", "3"))
_C, _D, _E, _S = _K["c"], _K["d"], _K["e"], _K["s"]
_F1, _F2, _F3, _LV0, _LV1 = _K["f1"], _K["f2"], _K["f3"], _K["lv0"], _K["lv1"]


@triton.jit
def _gather(ptr, offs, mask, sample_numel, batch_stride, STRIDED: tl.constexpr):
    # A channel slice of the model output (learned variance: m = out[:, :C], v = out[:, C:]) is dense within
    # each sample but strided across the batch: index it per sample instead of copying it.
    if STRIDED:
        b = offs // sample_numel
        idx = b * batch_stride + (offs - b * sample_numel)
    else:
        idx = offs
    return tl.load(ptr + idx, mask=mask).to(tl.float32)


@triton.jit(do_not_specialize=["step", "guidance_scale", "clip"])
def _sampler_step_kernel(
    x_ptr,
    m_ptr,
    u_ptr,
    z_ptr,
    v_ptr,
    h_ptr,
    xs_ptr,
    scale_ptr,
    out_ptr,
    table_ptr,
    table_row_stride,
    table_col_stride,
    num_steps,
    step,
    step_ptr,
    guidance_scale,
    guidance_ptr,
    clip,
    n_elements,
    sample_numel,
    m_batch_stride,
    u_batch_stride,
    v_batch_stride,
    STEP_FROM_PTR: tl.constexpr,
    HAS_CFG: tl.constexpr,
    GUIDANCE_FROM_PTR: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    VARIANCE: tl.constexpr,  # 0: none, 1: "learned" (log of v), 2: "learned_range" (v itself)
    SLOTS: tl.constexpr,
    PUSH_X0: tl.constexpr,
    HAS_XS: tl.constexpr,
    STRIDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.load(step_ptr).to(tl.int64) if STEP_FROM_PTR else step.to(tl.int64)
    # A device-side step cannot be range-checked without a host sync: read row 0 instead of out-of-bounds
    # memory and poison c so that the whole output is NaN, which no caller can mistake for a result.
    in_range = (i >= 0) & (i < num_steps)
    row = table_ptr + tl.where(in_range, i, 0) * table_row_stride
    a = tl.load(row + _A * table_col_stride)
    b = tl.load(row + _B * table_col_stride)
    p = tl.load(row + _P * table_col_stride)
    q = tl.load(row + _Q * table_col_stride)
    c = tl.where(in_range, tl.load(row + _C * table_col_stride), float("nan"))
    d = tl.load(row + _D * table_col_stride)
    e = tl.load(row + _E * table_col_stride)

    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    m = _gather(m_ptr, offs, mask, sample_numel, m_batch_stride, STRIDED)
    if HAS_CFG:
        w = tl.load(guidance_ptr).to(tl.float32) if GUIDANCE_FROM_PTR else guidance_scale
        u = _gather(u_ptr, offs, mask, sample_numel, u_batch_stride, STRIDED)
        m = u + w * (m - u)
    x0 = a * x + b * m
    if HAS_THRESHOLD:
        # the per-sample scale of dynamic thresholding, computed before the launch (a quantile)
        sc = tl.load(scale_ptr + offs // sample_numel, mask=mask, other=1.0).to(tl.float32)
        x0 = tl.minimum(tl.maximum(x0, -sc), sc) / sc
    elif HAS_CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    eps = p * x + q * m
    if SLOTS >= 1:
        h1 = tl.load(h_ptr + offs, mask=mask)
        h1f = h1.to(tl.float32)
    if SLOTS >= 2:
        h2 = tl.load(h_ptr + n_elements + offs, mask=mask)
        h2f = h2.to(tl.float32)
    if SLOTS >= 3:
        h3f = tl.load(h_ptr + 2 * n_elements + offs, mask=mask).to(tl.float32)
    if HAS_XS:
        xs = tl.load(xs_ptr + offs, mask=mask).to(tl.float32)
        xc = (
            tl.load(row + _XC_X * table_col_stride) * x
            + tl.load(row + _XC_S * table_col_stride) * xs
            + tl.load(row + _XC_0 * table_col_stride) * x0
        )
        if SLOTS >= 1:
            xc = xc + tl.load(row + _XC_1 * table_col_stride) * h1f
        if SLOTS >= 2:
            xc = xc + tl.load(row + _XC_2 * table_col_stride) * h2f
        if SLOTS >= 3:
            xc = xc + tl.load(row + _XC_3 * table_col_stride) * h3f
    else:
        xc = x
    out = c * x0 + d * eps + e * xc
    if SLOTS >= 1:
        out = out + tl.load(row + _F1 * table_col_stride) * h1f
    if SLOTS >= 2:
        out = out + tl.load(row + _F2 * table_col_stride) * h2f
    if SLOTS >= 3:
        out = out + tl.load(row + _F3 * table_col_stride) * h3f
    if HAS_NOISE:
        z = tl.load(row + _S * table_col_stride) * tl.load(z_ptr + offs, mask=mask).to(tl.float32)
        if VARIANCE != 0:
            v = _gather(v_ptr, offs, mask, sample_numel, v_batch_stride, STRIDED)
            if VARIANCE == 1:
                v = tl.log(v)
            lv0 = tl.load(row + _LV0 * table_col_stride)
            lv1 = tl.load(row + _LV1 * table_col_stride)
            z = tl.exp(0.5 * (lv0 + lv1 * v)) * z
        out = out + z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    # The sampler state, in place: every element is read above and written here by the same program.
    if SLOTS >= 3:
        tl.store(h_ptr + 2 * n_elements + offs, h2, mask=mask)
    if SLOTS >= 2:
        tl.store(h_ptr + n_elements + offs, h1, mask=mask)
    if SLOTS >= 1:
        push = x0 if PUSH_X0 else eps
        tl.store(h_ptr + offs, push.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_XS:
        tl.store(xs_ptr + offs, xc.to(xs_ptr.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor | None, fmt: torch.memory_format) -> tuple[torch.Tensor | None, int | None]:
    """(t, its batch stride) for the kernel's flat walk in layout `fmt`: t itself when it is dense in `fmt` (batch
    stride None) or, in the contiguous layout, dense within each sample (a channel slice of a 2C model output);
    otherwise a dense copy (the usual callers pass matching layouts and pay nothing)."""
    if t is None or t.is_contiguous(memory_format=fmt):
        return t, None
    if (
        fmt == torch.contiguous_format
        and t.dim() > 1
        and t[0].is_contiguous()
        and t.stride(0) >= t[0].numel()
    ):
        return t, t.stride(0)
    return t.contiguous(memory_format=fmt), None


def sampler_step_triton(
    out: torch.Tensor,
    x: torch.Tensor,
    eps: torch.Tensor,
    table: torch.Tensor,
    step: int,
    step_tensor: torch.Tensor | None,
    noise: torch.Tensor | None,
    eps_uncond: torch.Tensor | None,
    guidance_scale: float,
    guidance_tensor: torch.Tensor | None,
    clip: float | None,
    history: torch.Tensor | None = None,
    xs: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    history_kind: str = "",
    learned_variance: str = "",
) -> None:
    """Launch the kernel writing into `out`, a dense tensor of `memory_format(out)`; inputs are brought to it, and
    `history` / `xs` (which the kernel updates in place) must already be dense in it."""
    fmt = memory_format(out)
    x, noise = (_flat(t, fmt)[0] for t in (x, noise))
    (eps, m_stride), (eps_uncond, u_stride) = _flat(eps, fmt), _flat(eps_uncond, fmt)
    variance, v_stride = _flat(variance if noise is not None else None, fmt)
    n = out.numel()
    sample_numel = n // out.shape[0]
    strided = any(s is not None for s in (m_stride, u_stride, v_stride))
    # The interpreter costs about 1.5 ms per program whatever its size; on a GPU 1024-element blocks keep
    # enough programs in flight for small latents.
    max_block = 4096 if out.device.type == "cpu" else 1024
    block = min(max_block, triton.next_power_of_2(n))
    _sampler_step_kernel[(triton.cdiv(n, block),)](
        x,
        eps,
        x if eps_uncond is None else eps_uncond,
        x if noise is None else noise,
        x if variance is None else variance,
        x if history is None else history,
        x if xs is None else xs,
        table if scale is None else scale,
        out,
        table,
        table.stride(0),
        table.stride(1),
        table.shape[0],
        step,
        table if step_tensor is None else step_tensor,
        guidance_scale,
        table if guidance_tensor is None else guidance_tensor,
        0.0 if clip is None else clip,
        n,
        sample_numel,
        sample_numel if m_stride is None else m_stride,
        sample_numel if u_stride is None else u_stride,
        sample_numel if v_stride is None else v_stride,
        STEP_FROM_PTR=step_tensor is not None,
        HAS_CFG=eps_uncond is not None,
        GUIDANCE_FROM_PTR=guidance_tensor is not None,
        HAS_CLIP=clip is not None,
        HAS_THRESHOLD=scale is not None,
        HAS_NOISE=noise is not None,
        VARIANCE=0 if variance is None else 1 + LEARNED_VARIANCES.index(learned_variance),
        SLOTS=0 if history is None else history.shape[0],
        PUSH_X0=history_kind == "x0",
        HAS_XS=xs is not None,
        STRIDED=strided,
        BLOCK=block,
        num_warps=max(1, min(4, block // 256)),
    )

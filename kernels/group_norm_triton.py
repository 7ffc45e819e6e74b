"""The Triton GroupNorm (+ scale-shift) + SiLU kernels and their launch plan (`fastdiff.kernels.group_norm`
imports this on first use; the algorithm is described there)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels.backend import memory_format, multiprocessor_count

# Elements per (BLOCK_C, BLOCK_S) tile; the smallest tile a split may shrink it to (2 warps of 8 half-precision
# elements per thread: still 16-byte loads); the fewest elements of a group worth a program of their own.
_TILE_ELEMS = 4096
_MIN_TILE_ELEMS = 512
_MIN_CHUNK_ELEMS = 2048


@triton.jit
def _merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.: statistics of the union of two disjoint sets, each given as (count, mean, m2)."""
    total = count + count_b
    delta = mean_b - mean
    frac = count_b / total
    return total, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@triton.jit
def _channel_mask(cs, GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """cs < GROUP_C; constant true (no per-lane compare) when tiles divide the group's channels exactly."""
    if GROUP_C % BLOCK_C == 0:
        return tl.full((BLOCK_C,), 1, tl.int1)
    return cs < GROUP_C


@triton.jit
def _chunk_stats(
    x_ptr,
    pivot,
    GROUP_C: tl.constexpr,
    s_lo,
    s_hi,
    stride_c,
    stride_s,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """(count, mean, m2) of x - pivot over channels [0, GROUP_C) x positions [s_lo, s_hi) of one group."""
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for c0 in range(0, GROUP_C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = _channel_mask(cs, GROUP_C, BLOCK_C)
        n_c = tl.minimum(GROUP_C - c0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (ss < s_hi)[None, :]
            v = tl.load(x_ptr + cs[:, None] * stride_c + ss[None, :] * stride_s, mask=mask, other=0.0)
            v = tl.where(mask, v.to(tl.float32) - pivot, 0.0)
            n_t = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(tl.float32)
            mean_t = tl.sum(tl.sum(v, axis=1), axis=0) / n_t
            d = tl.where(mask, v - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            count, mean, m2 = _merge(count, mean, m2, n_t, mean_t, m2_t)
    return count, mean, m2


@triton.jit
def _normalize_chunk(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    pivot,
    mean,
    rstd,
    GROUP_C: tl.constexpr,
    s_lo,
    s_hi,
    stride_xc,
    stride_xs,
    stride_yc,
    stride_ys,
    stride_w,
    stride_b,
    stride_scale,
    stride_shift,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """y = silu(((x - pivot - mean) * rstd * w + b) * (1 + scale) + shift) on one chunk of one group."""
    for c0 in range(0, GROUP_C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = _channel_mask(cs, GROUP_C, BLOCK_C)
        # Per channel, y = (x - pivot) * a + b_: weight, bias, scale, shift and the statistics folded once.
        a = tl.full((BLOCK_C,), 1.0, tl.float32) * rstd
        b_ = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_W:
            a = a * tl.load(w_ptr + cs * stride_w, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b_ = tl.load(b_ptr + cs * stride_b, mask=c_mask, other=0.0).to(tl.float32)
        b_ = b_ - mean * a
        if HAS_SCALE:
            factor = 1.0 + tl.load(scale_ptr + cs * stride_scale, mask=c_mask, other=0.0).to(tl.float32)
            a = a * factor
            b_ = b_ * factor
        if HAS_SHIFT:
            b_ = b_ + tl.load(shift_ptr + cs * stride_shift, mask=c_mask, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (ss < s_hi)[None, :]
            v = tl.load(x_ptr + cs[:, None] * stride_xc + ss[None, :] * stride_xs, mask=mask, other=0.0)
            y = (v.to(tl.float32) - pivot) * a[:, None] + b_[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(
                y_ptr + cs[:, None] * stride_yc + ss[None, :] * stride_ys,
                y.to(y_ptr.dtype.element_ty),
                mask=mask,
            )


@triton.jit
def _group_norm_silu_fused_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    num_groups,
    GROUP_C: tl.constexpr,
    S,
    eps,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_w,
    stride_b,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (sample, group): statistics of the whole group, then normalise it."""
    pid = tl.program_id(0)
    n = (pid // num_groups).to(tl.int64)
    c_first = (pid % num_groups).to(tl.int64) * GROUP_C
    x_g = x_ptr + n * stride_xn + c_first * stride_xc
    pivot = tl.load(x_g).to(tl.float32)
    count, mean, m2 = _chunk_stats(x_g, pivot, GROUP_C, 0, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    _normalize_chunk(
        x_g,
        y_ptr + n * stride_yn + c_first * stride_yc,
        w_ptr + c_first * stride_w,
        b_ptr + c_first * stride_b,
        scale_ptr + n * stride_scale_n + c_first * stride_scale_c,
        shift_ptr + n * stride_shift_n + c_first * stride_shift_c,
        pivot,
        mean,
        rstd,
        GROUP_C,
        0,
        S,
        stride_xc,
        stride_xs,
        stride_yc,
        stride_ys,
        stride_w,
        stride_b,
        stride_scale_c,
        stride_shift_c,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        SILU,
        BLOCK_C,
        BLOCK_S,
    )


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,
    partial_ptr,
    num_groups,
    GROUP_C: tl.constexpr,
    S,
    chunk_s,
    stride_xn,
    stride_xc,
    stride_xs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (group, k): the (count, mean, m2) triple of chunk k into partial[group, k, :]."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = (pid // num_groups).to(tl.int64)
    c_first = (pid % num_groups).to(tl.int64) * GROUP_C
    x_g = x_ptr + n * stride_xn + c_first * stride_xc
    pivot = tl.load(x_g).to(tl.float32)
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    count, mean, m2 = _chunk_stats(x_g, pivot, GROUP_C, s_lo, s_hi, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
    out = partial_ptr + (pid * tl.num_programs(1) + k) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    partial_ptr,
    num_groups,
    GROUP_C: tl.constexpr,
    S,
    chunk_s,
    eps,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_w,
    stride_b,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (group, k): combine the group's chunk triples, then normalise chunk k."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    n = (pid // num_groups).to(tl.int64)
    c_first = (pid % num_groups).to(tl.int64) * GROUP_C
    x_g = x_ptr + n * stride_xn + c_first * stride_xc
    pivot = tl.load(x_g).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < num_chunks
    parts = partial_ptr + (pid * num_chunks + ks) * 3
    counts = tl.load(parts, mask=k_mask, other=0.0)
    means = tl.load(parts + 1, mask=k_mask, other=0.0)
    m2s = tl.load(parts + 2, mask=k_mask, other=0.0)
    # The chunk means are all relative to the same pivot, so this one-shot parallel combine is stable.
    count = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / count
    dev = tl.where(k_mask, means - mean, 0.0)
    m2 = tl.sum(m2s + counts * dev * dev, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    s_lo = k * chunk_s
    _normalize_chunk(
        x_g,
        y_ptr + n * stride_yn + c_first * stride_yc,
        w_ptr + c_first * stride_w,
        b_ptr + c_first * stride_b,
        scale_ptr + n * stride_scale_n + c_first * stride_scale_c,
        shift_ptr + n * stride_shift_n + c_first * stride_shift_c,
        pivot,
        mean,
        rstd,
        GROUP_C,
        s_lo,
        tl.minimum(s_lo + chunk_s, S),
        stride_xc,
        stride_xs,
        stride_yc,
        stride_ys,
        stride_w,
        stride_b,
        stride_scale_c,
        stride_shift_c,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        SILU,
        BLOCK_C,
        BLOCK_S,
    )


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should reach before splitting groups stops paying: a few waves of SMs on a
    GPU; one under the CPU interpreter, which runs programs one after another."""
    sms = multiprocessor_count(device)
    return 1 if sms is None else 4 * sms


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """t as (N, C, S) without copying; raises RuntimeError when the spatial dims' strides do not merge."""
    return t.view(t.shape[0], t.shape[1], -1)


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _plan(
    group_c: int, S: int, groups: int, target_programs: int, channels_last: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, chunk_s) for `groups` groups of group_c channels x S positions.

    Channel tiles: in channels-last memory the channels are the contiguous axis, so a tile takes all of a group's
    channels (padded to a power of two) for wide loads along them. Otherwise positions are contiguous and the
    tile takes the largest power of two of channels that divides group_c (2 of SD's 10, 8 of 40), so no lane is
    masked off (padding 10 channels to 16 left 37.5% of the lanes idle) and the channel loop runs whole tiles.

    Splitting: while the launch has fewer than `target_programs` programs, a group is split along S into chunks of
    whole tiles, each chunk at least _MIN_CHUNK_ELEMS elements; the tile may shrink along S to fit a chunk, down to
    _MIN_TILE_ELEMS. So groups of SD's 32x32 and 16x16 levels spread over the GPU, and a group too small to split
    that way runs in one program (chunk_s >= S).
    """
    # group_c & -group_c: the largest power of two dividing group_c
    block_c = triton.next_power_of_2(group_c) if channels_last else group_c & -group_c
    block_c = min(block_c, _TILE_ELEMS // 16)
    block_s = min(triton.next_power_of_2(S), max(_TILE_ELEMS // block_c, 16))
    chunks = min(triton.cdiv(target_programs, groups), group_c * S // _MIN_CHUNK_ELEMS)
    if chunks <= 1:
        return block_c, block_s, S
    min_block_s = min(block_s, max(16, triton.next_power_of_2(triton.cdiv(_MIN_TILE_ELEMS, block_c))))
    split_s = max(min_block_s, min(block_s, _prev_power_of_2(S // chunks)))
    chunk_s = split_s * max(1, (S // chunks) // split_s)
    # whole tiles per chunk (only the group's last tile is ragged), and no chunk under _MIN_CHUNK_ELEMS
    chunk_s = max(chunk_s, split_s * triton.cdiv(triton.cdiv(_MIN_CHUNK_ELEMS, group_c), split_s))
    if chunk_s >= S:
        return block_c, block_s, S
    return block_c, split_s, chunk_s


def group_norm_silu_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    *,
    block_c: int | None = None,
    block_s: int | None = None,
    chunk_s: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels. `block_c`, `block_s` (powers of two) and `chunk_s` (positions per program;
    `chunk_s >= S` means one program per group) override the heuristics, so tests can reach every path on
    small shapes."""
    N, C = x.shape[:2]
    fmt = memory_format(x)
    try:
        xv = _flat_view(x)
    except RuntimeError:
        # Spatial dims whose strides do not merge (an unusual permutation): read a copy instead.
        xv = _flat_view(x.contiguous(memory_format=fmt))
    y = torch.empty_like(x, memory_format=fmt)
    yv = _flat_view(y)
    S = xv.shape[2]
    # Offsets within one sample are 32-bit in the kernels (only the sample's base offset is 64-bit).
    if max((C - 1) * t.stride(1) + (S - 1) * t.stride(2) for t in (xv, yv)) >= 2**31:
        raise ValueError(
            f"x: one sample of shape {tuple(x.shape[1:])} spans 2**31 elements or more, beyond the Triton "
            "kernels' 32-bit offsets; use backend='torch'"
        )
    group_c = C // num_groups
    auto_c, auto_s, auto_chunk = _plan(
        group_c, S, N * num_groups, _target_programs(x.device), channels_last=xv.stride(1) == 1
    )
    block_c = block_c or auto_c
    block_s = block_s or auto_s
    chunk_s = chunk_s or auto_chunk
    num_chunks = triton.cdiv(S, chunk_s)
    # about 16 bytes per thread per tile: 16-byte vector loads, and no idle warps on small tiles
    num_warps = min(8, max(1, block_c * block_s * x.element_size() // 512))
    # Absent operands get x as a placeholder pointer; the HAS_* flags keep the kernel from reading it.
    w = xv if weight is None else weight
    b = xv if bias is None else bias
    sc = xv if scale is None else scale
    sh = xv if shift is None else shift
    tensors = (xv, yv, w, b, sc, sh)
    flags = dict(
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        SILU=silu,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
    )
    strides = (
        *xv.stride(),
        *yv.stride(),
        w.stride(0),
        b.stride(0),
        sc.stride(0),
        sc.stride(1),
        sh.stride(0),
        sh.stride(1),
    )
    if num_chunks == 1:
        _group_norm_silu_fused_kernel[(N * num_groups,)](
            *tensors, num_groups, group_c, S, eps, *strides, **flags, num_warps=num_warps
        )
        return y
    grid = (N * num_groups, num_chunks)
    partial = torch.empty((N * num_groups, num_chunks, 3), device=x.device, dtype=torch.float32)
    _group_norm_stats_kernel[grid](
        xv,
        partial,
        num_groups,
        group_c,
        S,
        chunk_s,
        *xv.stride(),
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=num_warps,
    )
    _group_norm_apply_kernel[grid](
        *tensors,
        partial,
        num_groups,
        group_c,
        S,
        chunk_s,
        eps,
        *strides,
        **flags,
        BLOCK_K=triton.next_power_of_2(num_chunks),
        num_warps=num_warps,
    )
    return y

"""The Triton GroupNorm (+ scale-shift) + SiLU kernels and their launch plan (`fastdiff.kernels.group_norm`
imports this on first use; the algorithm is described there)."""

from __future__ import annotations

import math

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
def _program_groups(pid, num_groups, GROUPS: tl.constexpr):
    """(sample, first group, groups held) of program `pid`: a sample's groups in runs of GROUPS adjacent groups, the
    last run shorter when GROUPS does not divide num_groups."""
    per_sample = tl.cdiv(num_groups, GROUPS)
    g_first = (pid % per_sample) * GROUPS
    return (pid // per_sample).to(tl.int64), g_first, tl.minimum(num_groups - g_first, GROUPS)


@triton.jit
def _group_lanes(held, GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr, LANE_ALIGN: tl.constexpr):
    """The channel lanes of a program holding several groups: lane index, the lane's group within the program, and
    whether the lane holds a channel. `held * GROUP_C` is a multiple of LANE_ALIGN (the wrapper checked); stating it
    keeps the mask constant over vectors of LANE_ALIGN lanes, so loads stay vectorised."""
    cs = tl.arange(0, BLOCK_C)
    n_c = (held * GROUP_C // LANE_ALIGN) * LANE_ALIGN
    return cs, cs // GROUP_C, cs < n_c


@triton.jit
def _group_sum(v, gid, BLOCK_G: tl.constexpr):
    """Per lane, the sum of v over the lanes of the same group (gid: each lane's group)."""
    onehot = gid[:, None] == tl.arange(0, BLOCK_G)[None, :]
    per_group = tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)
    return tl.sum(tl.where(onehot, per_group[None, :], 0.0), axis=1)


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
def _chunk_stats_lanes(
    x_ptr,
    pivot,
    cs,
    gid,
    lanes,
    s_lo,
    s_hi,
    stride_c,
    stride_s,
    GROUP_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """(count, mean, m2) of x - pivot over positions [s_lo, s_hi) of several groups held in one channel tile, each
    given per lane (every lane of a group holds its group's figures). Statistics are kept per channel along the
    positions (no cross-lane reduction per tile), then combined into groups once."""
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros_like(pivot)
    m2 = tl.zeros_like(pivot)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = lanes[:, None] & (ss < s_hi)[None, :]
        v = tl.load(x_ptr + cs[:, None] * stride_c + ss[None, :] * stride_s, mask=mask, other=0.0)
        v = tl.where(mask, v.to(tl.float32) - pivot[:, None], 0.0)
        n_t = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
        mean_t = tl.sum(v, axis=1) / n_t
        d = tl.where(mask, v - mean_t[:, None], 0.0)
        count, mean, m2 = _merge(count, mean, m2, n_t, mean_t, tl.sum(d * d, axis=1))
    # channels -> groups: every channel counts the same positions, so a group's mean is its channels' plain mean
    mean_g = _group_sum(mean, gid, BLOCK_G) / GROUP_C
    dev = mean - mean_g
    m2_g = _group_sum(m2 + count * dev * dev, gid, BLOCK_G)
    return count * GROUP_C, mean_g, m2_g


@triton.jit
def _normalize_channels(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    cs,
    c_mask,
    pivot,
    mean,
    rstd,
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
    """y = silu(((x - pivot - mean) * rstd * w + b) * (1 + scale) + shift) on channels cs (where c_mask) at positions
    [s_lo, s_hi); pivot, mean and rstd are one scalar for all lanes or one value per lane."""
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
    p = tl.zeros((BLOCK_C,), dtype=tl.float32) + pivot
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (ss < s_hi)[None, :]
        v = tl.load(x_ptr + cs[:, None] * stride_xc + ss[None, :] * stride_xs, mask=mask, other=0.0)
        y = (v.to(tl.float32) - p[:, None]) * a[:, None] + b_[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(
            y_ptr + cs[:, None] * stride_yc + ss[None, :] * stride_ys,
            y.to(y_ptr.dtype.element_ty),
            mask=mask,
        )


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
    """_normalize_channels over one group's channels, BLOCK_C at a time (pivot, mean, rstd: the group's scalars)."""
    for c0 in range(0, GROUP_C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        _normalize_channels(
            x_ptr,
            y_ptr,
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            cs,
            _channel_mask(cs, GROUP_C, BLOCK_C),
            pivot,
            mean,
            rstd,
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
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            SILU,
            BLOCK_C,
            BLOCK_S,
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
    GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    LANE_ALIGN: tl.constexpr,
):
    """One program per GROUPS adjacent groups of a sample: statistics of the whole groups, then normalise them."""
    n, g_first, held = _program_groups(tl.program_id(0), num_groups, GROUPS)
    c_first = g_first.to(tl.int64) * GROUP_C
    x_g = x_ptr + n * stride_xn + c_first * stride_xc
    y_g = y_ptr + n * stride_yn + c_first * stride_yc
    w_g = w_ptr + c_first * stride_w
    b_g = b_ptr + c_first * stride_b
    scale_g = scale_ptr + n * stride_scale_n + c_first * stride_scale_c
    shift_g = shift_ptr + n * stride_shift_n + c_first * stride_shift_c
    if GROUPS == 1:
        pivot = tl.load(x_g).to(tl.float32)
        count, mean, m2 = _chunk_stats(x_g, pivot, GROUP_C, 0, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        _normalize_chunk(
            x_g,
            y_g,
            w_g,
            b_g,
            scale_g,
            shift_g,
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
    else:
        cs, gid, lanes = _group_lanes(held, GROUP_C, BLOCK_C, LANE_ALIGN)
        # each lane's pivot: the first element of its group
        pivot = tl.load(x_g + gid * GROUP_C * stride_xc, mask=lanes, other=0.0).to(tl.float32)
        count, mean, m2 = _chunk_stats_lanes(
            x_g, pivot, cs, gid, lanes, 0, S, stride_xc, stride_xs, GROUP_C, BLOCK_G, BLOCK_S
        )
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        _normalize_channels(
            x_g,
            y_g,
            w_g,
            b_g,
            scale_g,
            shift_g,
            cs,
            lanes,
            pivot,
            mean,
            rstd,
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
    GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    LANE_ALIGN: tl.constexpr,
):
    """Program (run of groups, k): the (count, mean, m2) triple of chunk k of each group into partial[group, k, :]."""
    k = tl.program_id(1)
    n, g_first, held = _program_groups(tl.program_id(0), num_groups, GROUPS)
    x_g = x_ptr + n * stride_xn + g_first.to(tl.int64) * GROUP_C * stride_xc
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    if GROUPS == 1:
        pivot = tl.load(x_g).to(tl.float32)
        count, mean, m2 = _chunk_stats(
            x_g, pivot, GROUP_C, s_lo, s_hi, stride_xc, stride_xs, BLOCK_C, BLOCK_S
        )
        out = partial_ptr + (tl.program_id(0) * tl.num_programs(1) + k) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)
    else:
        cs, gid, lanes = _group_lanes(held, GROUP_C, BLOCK_C, LANE_ALIGN)
        pivot = tl.load(x_g + gid * GROUP_C * stride_xc, mask=lanes, other=0.0).to(tl.float32)
        count, mean, m2 = _chunk_stats_lanes(
            x_g, pivot, cs, gid, lanes, s_lo, s_hi, stride_xc, stride_xs, GROUP_C, BLOCK_G, BLOCK_S
        )
        # every lane holds its group's triple; the group's first lane writes it
        out = partial_ptr + ((n * num_groups + g_first + gid) * tl.num_programs(1) + k) * 3
        first = lanes & (cs % GROUP_C == 0)
        tl.store(out, tl.zeros_like(mean) + count, mask=first)
        tl.store(out + 1, mean, mask=first)
        tl.store(out + 2, m2, mask=first)


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
    GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    LANE_ALIGN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (run of groups, k): combine each group's chunk triples, then normalise chunk k."""
    k = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    n, g_first, held = _program_groups(tl.program_id(0), num_groups, GROUPS)
    c_first = g_first.to(tl.int64) * GROUP_C
    x_g = x_ptr + n * stride_xn + c_first * stride_xc
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < num_chunks
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    # The chunk means are all relative to the same pivot, so this one-shot parallel combine is stable.
    if GROUPS == 1:
        pivot = tl.load(x_g).to(tl.float32)
        parts = partial_ptr + (tl.program_id(0) * num_chunks + ks) * 3
        counts = tl.load(parts, mask=k_mask, other=0.0)
        means = tl.load(parts + 1, mask=k_mask, other=0.0)
        m2s = tl.load(parts + 2, mask=k_mask, other=0.0)
        count = tl.sum(counts, axis=0)
        mean = tl.sum(counts * means, axis=0) / count
        dev = tl.where(k_mask, means - mean, 0.0)
        m2 = tl.sum(m2s + counts * dev * dev, axis=0)
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
            s_lo,
            s_hi,
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
    else:
        cs, gid, lanes = _group_lanes(held, GROUP_C, BLOCK_C, LANE_ALIGN)
        pivot = tl.load(x_g + gid * GROUP_C * stride_xc, mask=lanes, other=0.0).to(tl.float32)
        # each held group's chunk triples, combined per group, then handed to the group's lanes
        js = tl.arange(0, BLOCK_G)
        parts = partial_ptr + ((n * num_groups + g_first + js)[:, None] * num_chunks + ks[None, :]) * 3
        part_mask = (js < held)[:, None] & k_mask[None, :]
        counts = tl.load(parts, mask=part_mask, other=0.0)
        means = tl.load(parts + 1, mask=part_mask, other=0.0)
        m2s = tl.load(parts + 2, mask=part_mask, other=0.0)
        count_g = tl.maximum(tl.sum(counts, axis=1), 1.0)  # 1.0: groups past `held`, whose lanes are masked
        mean_g = tl.sum(counts * means, axis=1) / count_g
        dev = tl.where(part_mask, means - mean_g[:, None], 0.0)
        rstd_g = 1.0 / tl.sqrt(tl.sum(m2s + counts * dev * dev, axis=1) / count_g + eps)
        onehot = gid[:, None] == js[None, :]
        mean = tl.sum(tl.where(onehot, mean_g[None, :], 0.0), axis=1)
        rstd = tl.sum(tl.where(onehot, rstd_g[None, :], 0.0), axis=1)
        _normalize_channels(
            x_g,
            y_ptr + n * stride_yn + c_first * stride_yc,
            w_ptr + c_first * stride_w,
            b_ptr + c_first * stride_b,
            scale_ptr + n * stride_scale_n + c_first * stride_scale_c,
            shift_ptr + n * stride_shift_n + c_first * stride_shift_c,
            cs,
            lanes,
            pivot,
            mean,
            rstd,
            s_lo,
            s_hi,
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


def _groups_per_program(group_c: int, num_groups: int, vector: int) -> int:
    """How many adjacent groups one program of a channels-last GroupNorm takes, their channels side by side in one
    channel tile of next_power_of_2(k * group_c) lanes (at most _TILE_ELEMS // 16).

    A group of SD's 10, 20 or 40 channels alone pads to 16, 32 or 64 lanes (62.5% used) and gives each pixel 20-80
    contiguous bytes. Candidates whose runs are whole 16-byte vectors (k * group_c and the last, shorter run both
    multiples of `vector` elements) come first, so loads stay 16 bytes wide; among them, the most lanes used over a
    sample's programs, then the fewest groups. SD's 10 / 20 / 40 / 30 / 60 / 80 channels per group (32 groups, half
    precision): k = 12 / 6 / 3 / 4 / 2 / 3, 120 channels of 128 lanes (240 of 256 at 80; a sample's last program
    holds fewer groups).
    """
    best, best_key = 1, None
    for k in range(1, num_groups + 1):
        lanes = k * group_c
        if lanes > _TILE_ELEMS // 16:
            break
        tail = num_groups % k or k
        whole_vectors = lanes % vector == 0 and tail * group_c % vector == 0
        used = num_groups * group_c / (triton.cdiv(num_groups, k) * triton.next_power_of_2(lanes))
        key = (whole_vectors, round(used, 9))
        if best_key is None or key > best_key:
            best, best_key = k, key
    return best


def _lane_alignment(group_c: int, num_groups: int, groups: int, vector: int) -> int:
    """The largest power of two (at most `vector`) dividing the channel count of every program's run of groups."""
    runs = math.gcd(groups * group_c, (num_groups % groups or groups) * group_c)
    return min(runs & -runs, vector)


def _plan(
    group_c: int, S: int, groups: int, target_programs: int, channels_last: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, chunk_s) for `groups` groups of group_c channels x S positions.

    Channel tiles: in channels-last memory the channels are the contiguous axis, so a tile takes all of a program's
    channels (group_c: those of its run of groups, see _groups_per_program; padded to a power of two) for wide loads
    along them. Otherwise positions are contiguous and the
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
    groups_per_program: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels. `block_c`, `block_s` (powers of two), `chunk_s` (positions per program;
    `chunk_s >= S` means one program per run of groups) and `groups_per_program` override the heuristics, so tests
    can reach every path on small shapes."""
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
    channels_last = xv.stride(1) == 1
    target = _target_programs(x.device)
    vector = 16 // x.element_size()
    groups = groups_per_program or 1
    if groups_per_program is None and channels_last and block_c is None:
        groups = _groups_per_program(group_c, num_groups, vector)
    auto_c, auto_s, auto_chunk = _plan(
        groups * group_c, S, N * triton.cdiv(num_groups, groups), target, channels_last
    )
    if groups_per_program is None and groups > 1 and auto_chunk < S:
        one = _plan(group_c, S, N * num_groups, target, channels_last)
        if one[2] >= S:
            # merging groups must not turn one launch (a program per group) into two (split statistics)
            groups, (auto_c, auto_s, auto_chunk) = 1, one
    block_c = block_c or auto_c
    if groups > 1 and (not 1 <= groups <= num_groups or block_c < groups * group_c):
        raise ValueError(
            f"groups_per_program={groups} needs 1 <= groups <= {num_groups} and block_c >= {groups * group_c}"
        )
    block_s = block_s or auto_s
    chunk_s = chunk_s or auto_chunk
    num_chunks = triton.cdiv(S, chunk_s)
    # about 16 bytes per thread per tile: 16-byte vector loads, and no idle warps on small tiles
    num_warps = min(8, max(1, block_c * block_s * x.element_size() // 512))
    if groups > 1:
        # 4 warps: with 8, ptxas holds a run's apply kernel to 64 registers and spills (sm_90, 4 groups of 30)
        num_warps = min(num_warps, 4)
    lanes = dict(
        GROUPS=groups,
        BLOCK_G=triton.next_power_of_2(groups),
        LANE_ALIGN=_lane_alignment(group_c, num_groups, groups, vector) if groups > 1 else 1,
    )
    programs = N * triton.cdiv(num_groups, groups)
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
        **lanes,
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
        _group_norm_silu_fused_kernel[(programs,)](
            *tensors, num_groups, group_c, S, eps, *strides, **flags, num_warps=num_warps
        )
        return y
    grid = (programs, num_chunks)
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
        **lanes,
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

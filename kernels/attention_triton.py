"""The Triton flash-attention kernel and its launch (`fastdiff.kernels.attention` imports this on first use)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdiff.kernels.backend import interpreter_enabled, multiprocessor_count


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # UPCAST: the interpreter multiplies bfloat16 tiles as raw uint16 bits; bf16 x bf16 products are exact in
    # float32, so multiplying the upcast tiles with float32 accumulation is the same arithmetic as a bf16 MMA.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads,
    seq_q,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head) against all keys, BLOCK_N keys at a time.
    if ALIGN > 1:
        # The wrapper checked that every stride is a multiple of ALIGN elements (16 bytes) and every base
        # pointer 16-byte aligned: rows of the q, k, v and output tiles can then move as 16-byte vectors
        # (cp.async on sm_80+). Triton's own specialisation only marks strides divisible by 16 elements (head
        # dim 40: no). `(s // ALIGN) * ALIGN` states it to the compiler (tl.multiple_of on a kernel argument
        # is dropped); it is the identity on the checked strides.
        stride_qb = (stride_qb // ALIGN) * ALIGN
        stride_qh = (stride_qh // ALIGN) * ALIGN
        stride_qm = (stride_qm // ALIGN) * ALIGN
        stride_kb = (stride_kb // ALIGN) * ALIGN
        stride_kh = (stride_kh // ALIGN) * ALIGN
        stride_kn = (stride_kn // ALIGN) * ALIGN
        stride_vb = (stride_vb // ALIGN) * ALIGN
        stride_vh = (stride_vh // ALIGN) * ALIGN
        stride_vn = (stride_vn // ALIGN) * ALIGN
        stride_ob = (stride_ob // ALIGN) * ALIGN
        stride_oh = (stride_oh // ALIGN) * ALIGN
        stride_om = (stride_om // ALIGN) * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    o_base = Out + batch * stride_ob + head * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seq_q
    # head dims are padded to a power of two in registers only: the padded lanes load as zeros
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, seq_k, BLOCK_N):
        mask_n = (start_n + offs_n) < seq_k
        k = tl.load(k_ptrs + start_n * stride_kn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        # scores in log2 units (qk_scale = scale * log2(e)) so exp2 does the softmax
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # every block holds at least one valid key, so m_new is finite and alpha is 0 on the first block
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        # normalise by the sum of the probabilities as rounded for the p @ v product, so the output stays
        # an exact weighted mean of v (measured: a quarter less bfloat16 error than summing the unrounded p)
        p = p.to(v.dtype)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        acc = acc * alpha[:, None] + _dot(p, v, UPCAST, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_dv[None, :],
    )


def _block_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim and element size.

    Chosen from the static compile report (python -m fastdiff.benchmarks.kernels --static): with 16-byte aligned
    rows, every float16/bfloat16 config the wrapper launches stays at or under 168 registers on sm_80 and sm_90, with
    no spills. Padded head dim 128 (SD's 80) takes 64-row tiles in 4 warps, one warp per 16 rows (the softmax row
    reductions stay within a warp), and 16-key blocks: 165 registers on sm_80, so 3 blocks fit an A100 SM (3 x 4 warps
    x 168 registers of its 65536; 3 x 35.5 KB of shared memory) and SD 1.5's 256 programs at the 32x32 level run in
    one wave of 324 slots instead of 1.19 waves of 216 (32-key blocks need 170-173 registers: 2 blocks per SM).
    Padded head dim 256 (SD's 160) keeps 8 warps on 64 rows; the wrapper gives smaller tiles 4 warps and, at 32 rows,
    16-key blocks (178-180 registers with 32). float32 (exact or TF32) tiles hold twice the bytes and get smaller
    tiles.
    """
    if dtype == torch.float32:
        if block_d <= 64:
            return 64, 32, 8, 2
        return (32, 32, 8, 2) if block_d <= 128 else (32, 16, 8, 2)
    if block_d <= 64:
        return 128, 32, 8, 3
    if block_d <= 128:
        return 64, 16, 4, 3
    return 64, 32, 8, 2


def _vector_alignment(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every tensor starts 16-byte aligned, has a unit last stride and all other strides
    are multiples of 16 bytes (the kernel may then load 16-byte vectors); 1 otherwise."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(s % vec for s in t.stride()[:-1]):
            return 1
    return vec


def _block_m_for_grid(block_m: int, seq_q: int, heads: int, sms: int | None) -> int:
    """Halve the query tile (down to 16 rows) while the launch would leave SMs without a program: short sequences
    (SD's 16x16 and 8x8 levels) otherwise keep most of the GPU idle."""
    if sms is None:
        return block_m
    while block_m > 16 and triton.cdiv(seq_q, block_m) * heads < sms:
        block_m //= 2
    return block_m


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the flash-attention kernel on validated inputs of any strides; `block_*` override the tile sizes."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k, head_dim_v = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, seq_q, head_dim_v), device=q.device, dtype=q.dtype)
    # tl.dot needs every tile dimension >= 16
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    cfg_m, cfg_n, num_warps, num_stages = _block_config(max(block_d, block_dv), q.dtype)
    # short sequences (ADM attention at 8x8: 64 tokens) do not need full-size tiles
    cfg_m = min(cfg_m, max(16, triton.next_power_of_2(seq_q)))
    block_m = block_m or _block_m_for_grid(cfg_m, seq_q, batch * heads, multiprocessor_count(q.device))
    if block_m < cfg_m and block_m <= 32:
        # 8 warps on a tile of 32 rows or fewer split it so thinly that ptxas caps registers at 128 and spills
        num_warps = 4
        if block_m == 32 and max(block_d, block_dv) > 128:
            # 32 x 256 tiles with 32-key blocks need 178-180 registers on sm_80; 16-key blocks 148-152
            cfg_n = 16
    block_n = block_n or min(cfg_n, max(16, triton.next_power_of_2(seq_k)))
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        heads,
        seq_q,
        seq_k,
        scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # the interpreter's bfloat16 tl.dot is broken (see _dot)
        UPCAST=q.dtype == torch.bfloat16 and interpreter_enabled(),
        # float32 inputs get full-precision products unless TF32 is allowed (low-precision inputs ignore it)
        PRECISION="ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32",
        ALIGN=_vector_alignment(q, k, v, out),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

"""Fused GroupNorm (+ ADM scale-shift) + SiLU.

For x of shape (N, C, *spatial), group g of sample n holds channels [g * C/G, (g + 1) * C/G) at all S spatial
positions. The Triton path views x as (N, C, S) through its strides (contiguous NCHW and channels-last alike, no
copy) and walks a group in (BLOCK_C, BLOCK_S) tiles, so a group of any size is never loaded at once:

- statistics: every tile gives its own count, mean and sum of squared deviations (exact two-pass within the tile),
  and tiles are merged with Chan's parallel formula. All values are taken relative to a pivot, the group's first
  element, so a large common offset (x = 1000 + noise) costs no precision: x - pivot is exact in float32.
- normalise: per channel, (x - pivot) * A + B with A, B folding mean, rstd, weight, bias, scale and shift; then SiLU.
- a launch that already has enough groups to fill the GPU (or a group too small to share) runs both phases in one
  program per group; otherwise each group is split along S into K chunks: a stats kernel writes one
  (count, mean, m2) triple per chunk, and each normalise program combines its group's K triples before normalising
  its chunk.
- tiles hold a power of two of channels that divides the group's channel count (NCHW) or all of them (channels-last,
  where they are the contiguous axis), see _plan. In channels-last memory one program takes a run of adjacent groups
  (SD's groups of 10 / 20 / 40 channels: 12 / 6 / 3 of them, 120 channels in 128 lanes instead of 10 in 16), keeps
  statistics per channel along the positions and combines each group's channels once at the end (each lane then holds
  its group's figures); see _groups_per_program.
- the group's channel count is a compile-time constant (one specialisation per group size, a handful per model):
  it lets the compiler prove the channel mask is constant over vectors, so channels-last loads vectorise too.

Dtypes: x is float32, float16 or bfloat16; weight, bias, scale and shift are either x's dtype or float32 (float32
parameters with a half x are the usual mixed-precision case). All math is float32; the output has x's dtype and
x's memory format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff.kernels.backend import (
    check_backend,
    decomposing,
    eager_call,
    memory_format,
    resolve_backend,
)


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch twin: group_norm, then `* (1 + scale) + shift` per (sample, channel), then SiLU; float32 math."""
    y = F.group_norm(
        x.float(),
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    expand = (...,) + (None,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.float()[expand])
    if shift is not None:
        y = y + shift.float()[expand]
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _group_norm_silu_body(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    backend: str,
) -> torch.Tensor:
    if resolve_backend(backend, x.device) == "triton":
        from fastdiff.kernels.group_norm_triton import group_norm_silu_triton  # Triton loads on first use

        return group_norm_silu_triton(x, num_groups, weight, bias, eps, scale, shift, silu)
    y = group_norm_silu_reference(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu)
    return y.contiguous(memory_format=memory_format(x))


_group_norm_silu_op = torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())(
    _group_norm_silu_body
)


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu, backend):
    return torch.empty_like(x, memory_format=memory_format(x))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale, shift, silu, _backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.config = (num_groups, eps, silu)


def _backward(ctx, grad):
    """Gradients of the reference twin, recomputed: the forward is the same function, whichever backend ran."""
    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 5, 6)]
    leaves = [
        None if t is None else t.detach().requires_grad_(need)
        for t, need in zip(ctx.saved_tensors, needs, strict=True)
    ]
    x, weight, bias, scale, shift = leaves
    num_groups, eps, silu = ctx.config
    with torch.enable_grad():
        y = group_norm_silu_reference(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad))
    gx, gw, gb, gscale, gshift = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
    return gx, None, gw, gb, None, gscale, gshift, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(x, num_groups, weight, bias, eps, scale, shift) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"x must be (N, C, *spatial) with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {C} channels of x, got {num_groups}")
    if not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    for name, t, shape in (
        ("weight", weight, (C,)),
        ("bias", bias, (C,)),
        ("scale", scale, (N, C)),
        ("shift", shift, (N, C)),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name} must have x's dtype {x.dtype} or float32, got {t.dtype}")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """GroupNorm of x (N, C, *spatial), optional ADM scale-shift with (N, C) `scale`/`shift`, then SiLU.

    x is float32, float16 or bfloat16, contiguous or channels-last; the output has x's dtype and memory format.
    weight/bias (C,) and scale/shift (N, C) are optional, each in x's dtype or float32. `silu=False` gives plain
    GroupNorm (+ scale-shift). `backend` is "auto", "triton" or "torch" (see fastdiff.kernels.backend).
    """
    _check_inputs(x, num_groups, weight, bias, eps, scale, shift)
    if decomposing():
        check_backend(backend)
        return group_norm_silu_reference(
            x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu
        )
    if x.numel() == 0:
        resolve_backend(backend, x.device)
        # Every layout test passes on an empty tensor; keep x's strides as they are.
        return torch.empty_like(x)
    args = (x, num_groups, weight, bias, float(eps), scale, shift, bool(silu), backend)
    if eager_call(x, weight, bias, scale, shift):
        return _group_norm_silu_body(*args)
    return _group_norm_silu_op(*args)

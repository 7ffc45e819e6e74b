"""Fused GroupNorm (+ ADM scale-shift) + SiLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.kernels.backend import resolve_backend


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
    """GroupNorm of x (N, C, *spatial), optional ADM scale-shift with (N, C) `scale`/`shift`, then SiLU."""
    resolve_backend(backend, x.device)
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu)

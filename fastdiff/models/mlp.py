"""A small residual MLP denoiser for 2-D toy data (the swiss roll of `fastdiff.data.swiss_roll`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.unet import timestep_embedding, timestep_rows


class _ResidualMLPBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h))) + projection of the time embedding))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc1(F.silu(self.norm(h))) + self.emb_proj(emb)
        return h + self.fc2(F.silu(r))


class MLPDenoiser(nn.Module):
    """`forward(x, t) -> eps` for points x of shape (B, dim); t is (B,), 0-d, or a number broadcast to the batch."""

    def __init__(
        self, dim: int = 2, hidden: int = 128, num_layers: int = 4, time_embed_dim: int = 64
    ) -> None:
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("hidden", hidden),
            ("num_layers", num_layers),
            ("time_embed_dim", time_embed_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim = dim
        self.config = {
            "dim": dim,
            "hidden": hidden,
            "num_layers": num_layers,
            "time_embed_dim": time_embed_dim,
        }
        self.time_embed_dim = time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.in_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(hidden) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Predict the noise eps of points `x` (B, dim) at timesteps `t`."""
        if not torch.compiler.is_compiling():
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != self.dim:
                raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        t = timestep_rows(t, x.shape[0], x.device)  # one row when every sample has the same t: embedded once
        emb = F.silu(self.time_embed(timestep_embedding(t, self.time_embed_dim).to(x.dtype)))
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out_proj(F.silu(self.out_norm(h)))

"""A small residual MLP denoiser for 2-D toy data (the swiss roll of `fastdiff.data.swiss_roll`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.unet import timestep_embedding, timestep_rows


class _ResidualMLPBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h))) + emb_proj(time embedding))); `forward` takes the projection."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        r = self.fc1(F.silu(self.norm(h))) + projected
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

    def _projections(self, t: torch.Tensor) -> list[torch.Tensor]:
        emb = F.silu(
            self.time_embed(timestep_embedding(t, self.time_embed_dim).to(self.in_proj.weight.dtype))
        )
        return [block.emb_proj(emb) for block in self.blocks]

    def timestep_table(self, t: torch.Tensor) -> torch.Tensor:
        """Everything the model computes from the timestep alone, for each timestep of `t` (S,): the embedding
        as each block projects it, (S, num_layers, hidden). `forward(x, t[i], time_row=table[i:i + 1])` equals
        `forward(x, t[i])` without that work (up to rounding): a sampling loop computes the table once per run.
        """
        return torch.stack(self._projections(t), dim=1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, *, time_row: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise eps of points `x` (B, dim) at timesteps `t`; `time_row`: the rows of
        `timestep_table` for `t`, (1 or B, num_layers, hidden), when the caller has them."""
        if not torch.compiler.is_compiling():
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != self.dim:
                raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
            expected = (len(self.blocks), self.in_proj.out_features)
            if time_row is not None and (
                time_row.dim() != 3
                or time_row.shape[0] not in (1, x.shape[0])
                or time_row.shape[1:] != expected
            ):
                raise ValueError(
                    f"time_row must have shape (1 or {x.shape[0]}, {expected[0]}, {expected[1]}) (rows of "
                    f"timestep_table), got {tuple(time_row.shape)}"
                )
        if time_row is None:
            # one row when every sample has the same t: embedded once
            projections = self._projections(timestep_rows(t, x.shape[0], x.device))
        else:
            projections = time_row.to(x.dtype).unbind(1)
        h = self.in_proj(x)
        for block, projected in zip(self.blocks, projections, strict=True):
            h = block(h, projected)
        return self.out_proj(F.silu(self.out_norm(h)))

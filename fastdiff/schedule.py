"""Noise schedules: betas, cumulative alphas, the closed-form forward process and timestep spacing."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# Far beyond any trained model (1000 is usual); bounds the tables built from a checkpoint's declared schedule.
MAX_TRAIN_TIMESTEPS = 100_000

KINDS = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
_DIFFUSERS_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at `max_beta`."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_train_timesteps, dtype=np.float64)
    t1 = steps / num_train_timesteps
    t2 = (steps + 1) / num_train_timesteps
    ratio = np.array([alpha_bar(b) / alpha_bar(a) for a, b in zip(t1, t2, strict=True)])
    return np.minimum(1.0 - ratio, max_beta)


class NoiseSchedule:
    """A discrete noise schedule of `num_train_timesteps` steps, held in float64.

    `betas[t]`, `alphas[t] = 1 - betas[t]` and `alphas_cumprod[t] = prod_{s<=t} alphas[s]` are float64 tensors;
    the forward process is q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | np.ndarray, *, kind: str = "custom"):
        abar = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if abar.dim() != 1 or abar.numel() < 1:
            raise ValueError(
                f"alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(abar.shape)}"
            )
        if not torch.isfinite(abar).all() or (abar <= 0).any() or (abar >= 1).any():
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        if (abar[1:] > abar[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing")
        self.kind = kind
        self.alphas_cumprod = abar
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas = abar / prev
        self.betas = 1.0 - self.alphas

    @property
    def num_train_timesteps(self) -> int:
        """Number of discrete training timesteps T."""
        return self.alphas_cumprod.numel()

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps})"

    @classmethod
    def from_betas(
        cls, betas: torch.Tensor | np.ndarray | list[float], *, kind: str = "custom"
    ) -> NoiseSchedule:
        """Schedule from explicit betas (any float dtype; stored in float64)."""
        b = np.asarray(
            torch.as_tensor(betas).double().cpu() if isinstance(betas, torch.Tensor) else betas,
            dtype=np.float64,
        )
        if b.ndim != 1 or b.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {b.shape}")
        if not np.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas must lie strictly between 0 and 1")
        return cls(np.cumprod(1.0 - b), kind=kind)

    @classmethod
    def from_kind(
        cls, kind: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """`linear` (DDPM), `scaled_linear` (latent diffusion: linear in sqrt(beta)) or `cosine` (improved DDPM)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if (
            not isinstance(num_train_timesteps, int)
            or isinstance(num_train_timesteps, bool)
            or not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS
        ):
            raise ValueError(
                f"num_train_timesteps must be an int in [1, {MAX_TRAIN_TIMESTEPS}], got {num_train_timesteps!r}"
            )
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
            )
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        else:
            betas = _cosine_betas(num_train_timesteps)
        return cls.from_betas(betas, kind=kind)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> NoiseSchedule:
        """Schedule of a diffusers scheduler (its own `alphas_cumprod`, bit for bit) or of a scheduler config."""
        abar = getattr(scheduler_or_config, "alphas_cumprod", None)
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise TypeError(
                f"scheduler_or_config must be a diffusers scheduler or its config, got {type(scheduler_or_config).__name__}"
            )
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True is not supported (alphas_cumprod would reach 0)")
        name = config.get("beta_schedule", "linear")
        kind = _DIFFUSERS_KINDS.get(name, "custom")
        if isinstance(abar, torch.Tensor):
            return cls(abar.double().cpu(), kind=kind)
        if config.get("trained_betas") is not None:
            return cls.from_betas(config["trained_betas"])
        if name not in _DIFFUSERS_KINDS:
            raise ValueError(
                f"beta_schedule {name!r} is not supported; use one of {sorted(_DIFFUSERS_KINDS)}"
            )
        return cls.from_kind(
            kind,
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
        )

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """Descending int64 timesteps for `num_steps` sampling steps, the same numbers as diffusers' set_timesteps."""
        T = self.num_train_timesteps
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if (
            not isinstance(num_steps, numbers.Integral)
            or isinstance(num_steps, bool)
            or not 1 <= num_steps <= T
        ):
            raise ValueError(
                f"num_steps must be an int in [1, {T}] (the schedule's length), got {num_steps!r}"
            )
        num_steps = int(num_steps)
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
        return torch.from_numpy(ts.copy())

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form forward process: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; `t` is an int or a (B,) tensor."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        t = torch.as_tensor(t, dtype=torch.long)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != x0.shape[0]):
            raise ValueError(
                f"t must be an int or a tensor of shape ({x0.shape[0]},), got shape {tuple(t.shape)}"
            )
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps}), got {t.tolist()}")
        abar = self.alphas_cumprod[t.cpu()]
        view = (-1,) + (1,) * (x0.dim() - 1) if t.dim() == 1 else ()
        sa = abar.sqrt().to(device=x0.device, dtype=x0.dtype).reshape(view)
        sb = (1 - abar).sqrt().to(device=x0.device, dtype=x0.dtype).reshape(view)
        return sa * x0 + sb * noise

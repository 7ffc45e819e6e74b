"""Noise schedules: betas, cumulative alphas, the closed-form forward process and timestep spacing
(`NoiseSchedule`); the sigma schedules of flow matching (`FlowSchedule`); and the sigma spacings that
diffusers' sigma-space schedulers share (Karras, exponential, beta)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastdiff.checks import integral

# Far beyond any trained model (1000 is usual); bounds the tables built from a checkpoint's declared schedule.
MAX_TRAIN_TIMESTEPS = 100_000

KINDS = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SPACINGS = ("karras", "exponential", "beta")
TIME_SHIFTS = ("exponential", "linear")
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
        # The last value may be 0: a schedule with zero terminal SNR (rescale_zero_terminal_snr).
        if not torch.isfinite(abar).all() or (abar[:-1] <= 0).any() or abar[-1] < 0 or (abar >= 1).any():
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1 (the last value may be 0)")
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

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """This schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
        Steps are Flawed", Algorithm 1; diffusers' `rescale_betas_zero_snr=True`): sqrt(alphas_cumprod) shifted so
        that its last value is 0 and scaled so that its first is unchanged. Computed in float64."""
        root = self.alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        return NoiseSchedule(root**2, kind=self.kind)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> NoiseSchedule:
        """Schedule of a diffusers scheduler (its own `alphas_cumprod`, bit for bit) or of a scheduler config."""
        abar = getattr(scheduler_or_config, "alphas_cumprod", None)
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise TypeError(
                f"scheduler_or_config must be a diffusers scheduler or its config, got {type(scheduler_or_config).__name__}"
            )
        name = config.get("beta_schedule", "linear")
        kind = _DIFFUSERS_KINDS.get(name, "custom")
        if isinstance(abar, torch.Tensor):  # already rescaled by the scheduler when it was asked to
            return cls(abar.double().cpu(), kind=kind)
        if config.get("trained_betas") is not None:
            schedule = cls.from_betas(config["trained_betas"])
        elif name not in _DIFFUSERS_KINDS:
            raise ValueError(
                f"beta_schedule {name!r} is not supported; use one of {sorted(_DIFFUSERS_KINDS)}"
            )
        else:
            schedule = cls.from_kind(
                kind,
                int(config.get("num_train_timesteps", 1000)),
                float(config.get("beta_start", 1e-4)),
                float(config.get("beta_end", 0.02)),
            )
        return (
            schedule.rescale_zero_terminal_snr() if config.get("rescale_betas_zero_snr", False) else schedule
        )

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """Descending int64 timesteps for `num_steps` sampling steps, the same numbers as diffusers' set_timesteps."""
        T = self.num_train_timesteps
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        steps = integral(num_steps)
        if steps is None or not 1 <= steps <= T:
            raise ValueError(
                f"num_steps must be an int in [1, {T}] (the schedule's length), got {num_steps!r}"
            )
        num_steps = steps
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
        return torch.from_numpy(ts.copy())

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) per training timestep (float64): the noise level of the
        variance-exploding state x_t / sqrt(abar_t) that Euler-type samplers integrate."""
        abar = self.alphas_cumprod
        return ((1.0 - abar) / abar).sqrt()

    def sigma_to_t(self, sigmas: np.ndarray, log_sigmas: np.ndarray | None = None) -> np.ndarray:
        """The fractional training timestep of each sigma: linear interpolation in log sigma between the two
        neighbouring training timesteps (diffusers' `_sigma_to_t`, clamped to [0, T - 1]). `log_sigmas`: the
        training log sigmas to interpolate (default: from `sigmas` in float64; diffusers' own are float32)."""
        if log_sigmas is None:
            log_sigmas = np.log(self.sigmas.numpy())
        log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
        below = np.cumsum(log_sigma[None, :] >= log_sigmas[:, None], axis=0).argmax(axis=0)
        low = below.clip(max=log_sigmas.shape[0] - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
        return (1.0 - w) * low + w * (low + 1)

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


def spaced_sigmas(spacing: str, sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """`num_steps` descending sigmas from sigma_max to sigma_min (float64), spaced as diffusers' `use_karras_sigmas`
    ("karras": Karras et al. 2022 eq. 5, rho = 7), `use_exponential_sigmas` ("exponential": uniform in log sigma)
    or `use_beta_sigmas` ("beta": beta(0.6, 0.6) quantiles, Lee et al. 2024)."""
    if spacing not in SIGMA_SPACINGS:
        raise ValueError(f"sigma spacing must be one of {SIGMA_SPACINGS}, got {spacing!r}")
    ramp = np.linspace(0.0, 1.0, num_steps)
    if spacing == "karras":
        rho = 7.0
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))
    try:
        from scipy.stats import beta
    except ImportError:
        raise ImportError("beta sigmas need scipy; install it with: pip install scipy") from None
    return sigma_min + beta.ppf(1.0 - ramp, 0.6, 0.6) * (sigma_max - sigma_min)


def sigma_spacing_of(config: Mapping[str, Any]) -> str | None:
    """Which of diffusers' `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` a config sets."""
    chosen = [name for name in SIGMA_SPACINGS if config.get(f"use_{name}_sigmas", False)]
    if len(chosen) > 1:
        raise ValueError(
            f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, got {chosen}"
        )
    return chosen[0] if chosen else None


class FlowSchedule:
    """A flow-matching (rectified flow) schedule: x_sigma = (1 - sigma) x0 + sigma noise, sigma from 1 to 0, and the
    model predicts the velocity noise - x0 at timestep sigma * num_train_timesteps (SD3, Flux).

    The sigmas of `num_steps` steps follow diffusers' FlowMatchEulerDiscreteScheduler: evenly spaced between the
    shifted training sigmas, then shifted by `shift` (sigma' = shift s / (1 + (shift - 1) s)), or, with
    `use_dynamic_shifting`, by the resolution-dependent `mu` (`time_shift_type` "exponential":
    e^mu / (e^mu + 1/s - 1); "linear": mu / (mu + 1/s - 1)); optionally stretched so the last one is
    `shift_terminal`, respaced by `sigma_spacing` (see `spaced_sigmas`), and inverted (`invert_sigmas`).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        *,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        sigma_spacing: str | None = None,
        invert_sigmas: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
    ):
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, int)
            or num_train_timesteps < 1
        ):
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFTS}, got {time_shift_type!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be None or in [0, 1), got {shift_terminal!r}")
        if sigma_spacing is not None and sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"sigma_spacing must be None or one of {SIGMA_SPACINGS}, got {sigma_spacing!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.time_shift_type = time_shift_type
        self.shift_terminal = shift_terminal or None
        self.sigma_spacing = sigma_spacing
        self.invert_sigmas = bool(invert_sigmas)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        # The training sigmas N/N .. 1/N, shifted unless the shift is dynamic: their ends bound every schedule.
        train = np.arange(num_train_timesteps, 0, -1, dtype=np.float64) / num_train_timesteps
        if not self.use_dynamic_shifting:
            train = self._shift(train, self.shift)
        self.sigma_max, self.sigma_min = float(train[0]), float(train[-1])

    def __repr__(self) -> str:
        shift = "dynamic" if self.use_dynamic_shifting else self.shift
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, shift={shift})"

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> FlowSchedule:
        """The schedule of a diffusers FlowMatchEulerDiscreteScheduler (its current `shift`, which `set_shift`
        may have changed) or of its config."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise TypeError(
                "scheduler_or_config must be a diffusers scheduler or its config, "
                f"got {type(scheduler_or_config).__name__}"
            )
        shift = getattr(scheduler_or_config, "shift", None)
        return cls(
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("shift", 1.0) if shift is None else shift),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            time_shift_type=config.get("time_shift_type", "exponential"),
            shift_terminal=config.get("shift_terminal"),
            sigma_spacing=sigma_spacing_of(config),
            invert_sigmas=bool(config.get("invert_sigmas", False)),
            base_shift=float(config.get("base_shift") or 0.5),
            max_shift=float(config.get("max_shift") or 1.15),
            base_image_seq_len=int(config.get("base_image_seq_len", 256)),
            max_image_seq_len=int(config.get("max_image_seq_len", 4096)),
        )

    @staticmethod
    def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
        return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift of an image of `image_seq_len` latent tokens: linear from base_shift at
        base_image_seq_len to max_shift at max_image_seq_len (what diffusers' Flux pipelines pass as `mu`)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len

    def sigmas(
        self,
        num_steps: int | None = None,
        *,
        mu: float | None = None,
        sigmas: Any = None,
        timesteps: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of a sampling run, float64: one timestep per step and num_steps + 1 sigmas (the last
        one 0, or 1 when inverted). `sigmas` / `timesteps` replace the evenly spaced ones before shifting, as in
        diffusers' `set_timesteps`; given timesteps are also the model's timesteps as they are."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be given when use_dynamic_shifting is set (see FlowSchedule.mu)")
        given = [np.asarray(v, dtype=np.float64).reshape(-1) for v in (sigmas, timesteps) if v is not None]
        if any(len(v) != len(given[0]) for v in given) or any(len(v) < 1 for v in given):
            raise ValueError("sigmas and timesteps must be non-empty and of the same length")
        if num_steps is None:
            if not given:
                raise ValueError("give num_steps, sigmas or timesteps")
            num_steps = len(given[0])
        steps = integral(num_steps)
        if steps is None or steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        num_steps = steps
        if given and len(given[0]) != num_steps:
            raise ValueError(f"{len(given[0])} sigmas or timesteps for num_steps={num_steps}")
        n = self.num_train_timesteps
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        elif timesteps is not None:
            sig = np.asarray(timesteps, dtype=np.float64).reshape(-1) / n
        else:
            sig = np.linspace(self.sigma_max * n, self.sigma_min * n, num_steps) / n
        if self.use_dynamic_shifting:
            r = 1.0 / sig - 1.0
            sig = (
                math.exp(mu) / (math.exp(mu) + r) if self.time_shift_type == "exponential" else mu / (mu + r)
            )
        else:
            sig = self._shift(sig, self.shift)
        if self.shift_terminal is not None:
            if num_steps < 2:
                raise ValueError("shift_terminal stretches the sigmas of at least 2 steps, got num_steps=1")
            one_minus = 1.0 - sig
            sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.shift_terminal))
        if self.sigma_spacing is not None:
            sig = spaced_sigmas(self.sigma_spacing, sig[-1], sig[0], num_steps)
        ts = np.asarray(timesteps, dtype=np.float64).reshape(-1) if timesteps is not None else sig * n
        if self.invert_sigmas:
            sig = 1.0 - sig
            ts = sig * n
        return ts, np.append(sig, 1.0 if self.invert_sigmas else 0.0)

    def q_sample(self, x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        """The state at noise level `sigma`: (1 - sigma) x0 + sigma noise (diffusers' `scale_noise`)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if not 0 <= sigma <= 1:
            raise ValueError(f"sigma must lie in [0, 1], got {sigma!r}")
        return (1.0 - sigma) * x0 + sigma * noise

"""Toy data sets: scikit-learn's bundled handwritten digits as small images, and the 2-D swiss roll."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff.errors import missing_extra

# t of the roll spans [1.5 pi, 4.5 pi]; each coordinate t cos t, t sin t then has a mean square of about E[t^2] / 2.
_ROLL_T_MIN, _ROLL_T_MAX = 1.5 * math.pi, 4.5 * math.pi
_ROLL_SCALE = math.sqrt((_ROLL_T_MAX**3 - _ROLL_T_MIN**3) / (3 * (_ROLL_T_MAX - _ROLL_T_MIN)) / 2)


def load_digits(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (no download) as images (1797, 1, image_size, image_size) in [-1, 1].

    Pixel values 0..16 are mapped linearly to [-1, 1], then resized bilinearly (antialias off) if image_size > 8.
    The default is the native 8x8: resizing adds no information but multiplies the training cost of the shipped
    model by 4 (it must train in minutes on 2 CPU cores); grids are enlarged for viewing instead.
    Returns (images float32, labels int64 in 0..9).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {image_size!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise missing_extra("scikit-learn", "train") from None
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != 8:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
        )
    return images.contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)


def swiss_roll(n: int, *, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) of the 2-D swiss roll (t cos t, t sin t), t uniform in [1.5 pi, 4.5 pi].

    Scaled so each coordinate has a root-mean-square of about 1; `noise` is the standard deviation of Gaussian
    noise added in those units. Deterministic for a seeded `generator`.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    t = _ROLL_T_MIN + (_ROLL_T_MAX - _ROLL_T_MIN) * torch.rand(n, generator=generator)
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / _ROLL_SCALE
    if noise:
        points = points + noise * torch.randn(n, 2, generator=generator)
    return points

"""Denoising networks: the ADM U-Net and a small MLP for 2-D toy data."""

from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.unet import PRESETS, UNet, UNetConfig

__all__ = ["PRESETS", "MLPDenoiser", "UNet", "UNetConfig"]

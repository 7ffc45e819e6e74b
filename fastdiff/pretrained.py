"""Checkpoints (safetensors with a JSON header) and the shipped pretrained digits model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.errors import CheckpointError
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.output import atomic_path
from fastdiff.schedule import NoiseSchedule

FORMAT = "fastdiff-checkpoint-v1"
PRETRAINED = {"digits": "digits.safetensors"}


@dataclass
class Pretrained:
    """A loaded model with what is needed to sample from it."""

    model: nn.Module
    schedule: NoiseSchedule
    image_size: int | None
    channels: int | None
    num_classes: int | None
    prediction_type: str = "epsilon"
    metadata: dict[str, Any] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the batch dimension)."""
        if self.image_size is None:
            return (self.model.dim,)
        return (self.channels, self.image_size, self.image_size)


def build_model(model_type: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate a `unet` (UNetConfig fields) or `mlp` (MLPDenoiser arguments) from its JSON config."""
    if model_type == "unet":
        return UNet(UNetConfig.from_dict(config))
    if model_type == "mlp":
        return MLPDenoiser(**config)
    raise CheckpointError(f"unknown model type {model_type!r}")


def model_spec(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(model_type, config) describing `model` so that `build_model` rebuilds it."""
    if isinstance(model, UNet):
        return "unet", model.config.to_dict()
    if isinstance(model, MLPDenoiser):
        return "mlp", model.config
    raise TypeError(f"model must be a fastdiff UNet or MLPDenoiser, got {type(model).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    schedule_spec: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights and everything needed to rebuild it, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    model_type, config = model_spec(model)
    header = {
        "format": FORMAT,
        "model_type": model_type,
        "config": config,
        "schedule": schedule_spec,
        **(extra or {}),
    }
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fastdiff": json.dumps(header)})
    return Path(path)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None) -> Pretrained:
    """Load a checkpoint written by `save_checkpoint` (or `fastdiff train`); the model is in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta["fastdiff"])
        if header.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}")
        tensors = load_file(str(path))
        model = build_model(header["model_type"], header["config"])
        model.load_state_dict(tensors)
        schedule = NoiseSchedule.from_kind(**header["schedule"])
    except CheckpointError:
        raise
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path} is not a valid fastdiff checkpoint: {err}") from err
    model.eval().to(device or "cpu")
    is_unet = isinstance(model, UNet)
    return Pretrained(
        model=model,
        schedule=schedule,
        image_size=model.config.image_size if is_unet else None,
        channels=model.config.in_channels if is_unet else None,
        num_classes=model.num_classes if is_unet else None,
        prediction_type=header.get("prediction_type", "epsilon"),
        metadata=header,
    )


def load_pretrained(name: str = "digits", device: torch.device | str | None = None) -> Pretrained:
    """The checkpoint shipped inside the package (no network access): `digits`, a class-conditional 16x16 model."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    with resources.as_file(resources.files("fastdiff") / "weights" / PRETRAINED[name]) as path:
        return load_checkpoint(path, device)

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
from fastdiff.fingerprint import state_sha256
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.output import write_bytes_atomic
from fastdiff.samplers import PREDICTION_TYPES
from fastdiff.schedule import NoiseSchedule

FORMAT = "fastdiff-checkpoint-v1"
# Shipped checkpoints: file name and the sha256 of their weights (fastdiff.fingerprint.state_sha256), checked on
# every load, since these files predate the hash that save_checkpoint now writes into the metadata.
PRETRAINED = {
    "digits": ("digits.safetensors", "6d3c4f1dfcd4705291789de86c56c562fbad6c97f137e23ce19d8e772e641c80")
}


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
    """Write the model's weights and everything needed to rebuild it, atomically (temp file, then rename).

    The metadata records `weights_sha256`, the hash of the weights that `load_checkpoint` verifies.
    """
    from safetensors.torch import save

    model_type, config = model_spec(model)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {
        "format": FORMAT,
        "model_type": model_type,
        "config": config,
        "schedule": schedule_spec,
        **(extra or {}),
        "weights_sha256": state_sha256(tensors),
    }
    return write_bytes_atomic(path, save(tensors, metadata={"fastdiff": json.dumps(header)}))


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The fastdiff JSON header of a checkpoint and the name -> shape of its tensors (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    if "fastdiff" not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file without fastdiff metadata, not a fastdiff checkpoint"
        )
    header = json.loads(meta["fastdiff"])
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the fastdiff metadata is {type(header).__name__}, expected a JSON object"
        )
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}")
    prediction = header.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(
            f"{path}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction!r}"
        )
    return header, shapes


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Within it, `normal_` initialisers (nn.Embedding's) do nothing: on meta tensors there is nothing to fill, and
    torch's meta `normal_` imports torch._dynamo (1.7 s of every `fastdiff sample`). A mode, so thread-local."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, torch.nn.init.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


# The largest value of each shape field of a checkpoint's config, checked at load. The stored tensors bound the
# widths, but not `image_size` (no weight depends on it): 2**20 ran out of memory at the first attention, 4096
# ran for minutes and crashed in conv2d. The bounds also keep building the declared model on the meta device
# (`_check_shapes`) quick: a config of 10**9 residual blocks would loop for hours. Far beyond any released model
# (ADM's largest is 512 x 512, 256 channels x 4; Stable Diffusion's U-Net 320 x 4 channels, 2 blocks a level).
CONFIG_BOUNDS: dict[str, dict[str, int]] = {
    "unet": {
        "image_size": 1024,
        "in_channels": 1024,
        "out_channels": 1024,
        "low_res_channels": 1024,
        "model_channels": 4096,
        "num_res_blocks": 64,
        "num_heads": 1024,
        "num_head_channels": 4096,
        "num_classes": 1_000_000,
        "num_groups": 4096,
    },
    "mlp": {"dim": 4096, "hidden": 65536, "num_layers": 1024, "time_embed_dim": 65536},
}
# channel_mult: at most this many levels, each at most this multiple of model_channels.
MAX_LEVELS, MAX_CHANNEL_MULT = 12, 64


def _check_config_bounds(path: Path, model_type: Any, config: Any) -> None:
    """Refuse a config whose shape fields exceed CONFIG_BOUNDS (their types are the model's to check)."""
    if not isinstance(config, dict) or model_type not in CONFIG_BOUNDS:
        return
    for name, bound in CONFIG_BOUNDS[model_type].items():
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise CheckpointError(
                f"{path}: config {name} = {value} is beyond the largest fastdiff loads ({bound}); the "
                f"bounds of every field are in fastdiff.pretrained.CONFIG_BOUNDS"
            )
    mult = config.get("channel_mult")
    if model_type == "unet" and isinstance(mult, list):
        too_big = [m for m in mult if isinstance(m, int) and m > MAX_CHANNEL_MULT]
        if len(mult) > MAX_LEVELS or too_big:
            raise CheckpointError(
                f"{path}: config channel_mult = {mult[:16]}{' ...' if len(mult) > 16 else ''} is beyond the largest "
                f"fastdiff loads (at most {MAX_LEVELS} levels, each at most {MAX_CHANNEL_MULT})"
            )


def _check_shapes(path: Path, model_type: str, config: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """The declared model, built without memory on the meta device, must have exactly the stored tensors, so a
    config declaring a huge model is refused before anything is allocated."""
    with torch.device("meta"), _NoRandomInit():
        expected = {k: tuple(v.shape) for k, v in build_model(model_type, config).state_dict().items()}
    if expected != shapes:
        diff = sorted(k for k in set(expected) | set(shapes) if expected.get(k) != shapes.get(k))
        raise CheckpointError(
            f"{path}: the declared {model_type} config does not match the stored tensors ({len(diff)} differ, "
            f"e.g. {diff[0]!r}: {expected.get(diff[0])} declared, {shapes.get(diff[0])} stored)"
        )


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str | None = None, *, weights_sha256: str | None = None
) -> Pretrained:
    """Load a checkpoint written by `save_checkpoint` (or `fastdiff train`); the model is in eval mode.

    The weights are checked against the hash in the metadata (or `weights_sha256`, for files written before
    it was recorded): a mismatch raises CheckpointError naming the corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder, expected a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        header, shapes = _read_header(path)
        _check_config_bounds(path, header["model_type"], header["config"])
        _check_shapes(path, header["model_type"], header["config"], shapes)
        schedule = NoiseSchedule.from_kind(**header["schedule"])
        tensors = load_file(str(path))
        expected = header.get("weights_sha256", weights_sha256)
        if expected is not None and state_sha256(tensors) != expected:
            raise CheckpointError(
                f"{path} is corrupt: its weights do not match the sha256 recorded when it was written"
            )
        model = build_model(header["model_type"], header["config"])
        model.load_state_dict(tensors)
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
    """The checkpoint shipped inside the package (no network access): `digits`, a class-conditional 8x8 model."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    file, sha256 = PRETRAINED[name]
    with resources.as_file(resources.files("fastdiff") / "weights" / file) as path:
        return load_checkpoint(path, device, weights_sha256=sha256)


def load_model(
    name_or_path: str,
    device: torch.device | str | None = None,
    *,
    argument: str = "model",
    dtype: torch.dtype = torch.float32,
) -> Pretrained:
    """A shipped model by name (`digits`) or a checkpoint file written by `fastdiff train` (`.safetensors`),
    its weights cast to `dtype`.

    `argument` names the model in the error for anything else (the CLI: "--model")."""
    if name_or_path in PRETRAINED:
        pre = load_pretrained(name_or_path, device=device)
    elif name_or_path.endswith(".safetensors"):
        pre = load_checkpoint(name_or_path, device=device)
    else:
        raise ValueError(
            f"{argument}: unknown model {name_or_path!r}; use one of {sorted(PRETRAINED)} or a .safetensors file"
        )
    pre.model.to(dtype)
    return pre

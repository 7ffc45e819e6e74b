"""The models the sampling benchmark runs: what each one is, how it is built, its sampler and its conditioning.

| workload         | model                                                     | default sampler | conditioning          |
|------------------|-----------------------------------------------------------|-----------------|-----------------------|
| `digits`         | the shipped checkpoint (`load_pretrained("digits")`)      | DDIM 50         | class labels, CFG 2   |
| `ddpm-cifar10`   | `UNet(UNetConfig.preset("ddpm-cifar10"))`, random weights | DDIM 50         | none                  |
| `adm-imagenet64` | `UNet(UNetConfig.preset("adm-imagenet64"))`, random       | DDIM 50         | class labels, CFG 2   |
| `sd15-unet`      | diffusers `UNet2DConditionModel`, SD 1.5 config, random   | DDIM 50         | 77x768 text, CFG 7.5  |
| `sd15-unet-N`    | the same at NxN latents (`latent_size=N`, 8N x 8N images)   | DDIM 50         | 77x768 text, CFG 7.5  |
| `swissroll`      | `MLPDenoiser()`, random weights                           | DDPM 1000       | none                  |

`sd15-unet` at its own 64x64 latents takes minutes per sample on a CPU, so it is GPU only there; a reduced
`latent_size` (a multiple of 8: the U-Net downsamples three times) runs the full 860M-parameter model on any device,
as its own workload `sd15-unet-<latent_size>` (16: 1.3 s per CFG-batched U-Net call on our 2-core CPUs).

Random weights: the ADM U-Net zero-initialises the last convolution of every residual branch and its output,
so a freshly built model predicts exactly zero and every backend would "agree" trivially. Those all-zero
parameters get small random values (seeded), so that the numerical comparison of backends means something.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdiff.samplers import SAMPLERS, Sampler, build_sampler
from fastdiff.schedule import NoiseSchedule

# Stable Diffusion 1.5's U-Net (CompVis/stable-diffusion-v1-5, unet/config.json), written out so that nothing
# is downloaded: 860M parameters, 64x64x4 latents, 77x768 CLIP text states.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
SD15_TEXT_TOKENS = 77
# The workloads whose latent size `latent_size` sets (a model built from a config, not a fixed checkpoint).
LATENT_WORKLOADS = ("sd15-unet",)


@dataclass(frozen=True)
class WorkloadSpec:
    """A benchmark workload: its defaults and a builder of its model on a device."""

    name: str
    description: str
    sampler: str
    steps: int
    guidance_scale: float = 1.0
    gpu_only: str | None = None  # why it is skipped without a GPU (at its default size)


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec("digits", "shipped digits U-Net, 8x8x1, 10 classes, CFG 2", "ddim", 50, 2.0),
        WorkloadSpec("ddpm-cifar10", "DDPM CIFAR-10 U-Net (35.7M), 32x32x3, random weights", "ddim", 50),
        WorkloadSpec(
            "adm-imagenet64", "ADM ImageNet-64 U-Net, 1000 classes, CFG 2, random weights", "ddim", 50, 2.0
        ),
        WorkloadSpec(
            "sd15-unet",
            "SD 1.5 U-Net (diffusers, 860M), 4-channel latents, 77x768 text, CFG 7.5, random weights",
            "ddim",
            50,
            7.5,
            gpu_only="GPU only: the 860M-parameter SD 1.5 U-Net takes minutes per sample on a CPU at 64x64 "
            "latents (--latent-size 16 runs it at 16x16)",
        ),
        WorkloadSpec(
            "swissroll", "MLPDenoiser on 2-D points, random weights (per-step overhead)", "ddpm", 1000
        ),
    )
}


@dataclass
class Workload:
    """A built workload: the float32 model on its device, its schedule and sampler, and its conditioning."""

    spec: WorkloadSpec
    model: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    sampler_kind: str
    steps: int
    weights: str
    make_cond: Callable[[int, torch.device, torch.dtype], tuple[dict | None, dict | None]]
    is_diffusers: bool = False
    notes: list[str] = field(default_factory=list)
    latent_size: int | None = None
    _by_dtype: dict[torch.dtype, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The name of its results rows: the spec's, with the latent size when one was chosen."""
        return workload_name(self.spec.name, self.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def guidance_scale(self) -> float:
        return self.spec.guidance_scale

    def sampler(self) -> Sampler:
        """The fastdiff sampler of this workload: any registered name (`fastdiff.samplers.SAMPLERS`) with its
        registered defaults (the eager row's diffusers scheduler, `backends.DIFFUSERS_LOOPS`, uses the same numbers)."""
        return build_sampler(self.sampler_kind, self.schedule, self.steps)

    def model_as(self, dtype: torch.dtype) -> nn.Module:
        """The model in `dtype` (a cached copy for anything but float32); backends copy it again before editing."""
        if dtype == torch.float32:
            return self.model
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = copy.deepcopy(self.model).to(dtype)
        return self._by_dtype[dtype]

    def conds(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[dict | None, dict | None]:
        """(cond, uncond) keyword arguments of the denoiser for a batch; uncond is None without guidance."""
        return self.make_cond(batch, device, dtype)

    def describe(self) -> dict[str, Any]:
        """The JSON description of the workload in the results file."""
        return {
            "description": self.spec.description,
            "model": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "sample_shape": list(self.sample_shape),
            "sampler": self.sampler_kind,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "schedule": self.schedule.kind,
            "weights": self.weights,
            "notes": list(self.notes),
            **({"latent_size": self.latent_size} if self.latent_size is not None else {}),
        }


def workload_name(name: str, latent_size: int | None) -> str:
    """`sd15-unet-16` for `sd15-unet` at latent size 16: a run at another size is a distinct case."""
    return name if latent_size is None else f"{name}-{latent_size}"


def latent_factor(overrides: dict[str, Any] | None = None) -> int:
    """What the SD 1.5 U-Net's latent size must be a multiple of: 2 per downsampling (every down block but the
    last halves the latents). diffusers runs other sizes by resizing to the skip connections' sizes in the up
    blocks; the benchmark refuses them, so that every size runs the same network as the full-size model."""
    blocks = {**SD15_UNET_CONFIG, **(overrides or {})}["down_block_types"]
    return 2 ** (len(blocks) - 1)


def check_latent_size(latent_size: object, overrides: dict[str, Any] | None = None) -> int | None:
    """`latent_size` if the SD 1.5 U-Net (with `overrides`) can take it, None for None; ValueError otherwise."""
    if latent_size is None:
        return None
    factor = latent_factor(overrides)
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(
            f"latent_size must be a positive integer (a multiple of {factor}), got {latent_size!r}"
        )
    if latent_size % factor:
        raise ValueError(
            f"latent_size must be a multiple of {factor} (the U-Net halves the latents {factor.bit_length() - 1} "
            f"times; at other sizes diffusers resizes inside the up blocks, a different model), got {latent_size}"
        )
    return latent_size


def cpu_skip_reason(name: str, latent_size: int | None) -> str | None:
    """Why workload `name` (at `latent_size`) is not run without a GPU, or None when it is."""
    spec = WORKLOADS[name]
    return None if latent_size is not None and name in LATENT_WORKLOADS else spec.gpu_only


def randomize_zero_parameters(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every all-zero parameter (zero-initialised output layers) small random values, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _class_conds(num_classes: int) -> Callable:
    def make(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
        labels = torch.arange(batch, device=device) % num_classes
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, num_classes)}

    return make


def _no_conds(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[None, None]:
    return None, None


def _text_conds(tokens: int, dim: int) -> Callable:
    def make(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
        # Fixed random stand-ins for the CLIP states of a prompt and of the empty prompt.
        gen = torch.Generator().manual_seed(1234)
        text, empty = torch.randn(2, 1, tokens, dim, generator=gen).to(device=device, dtype=dtype)
        return (
            {"encoder_hidden_states": text.repeat(batch, 1, 1)},
            {"encoder_hidden_states": empty.repeat(batch, 1, 1)},
        )

    return make


def _random_unet(preset: str, seed: int):
    from fastdiff.models import UNet, UNetConfig

    torch.manual_seed(seed)
    return randomize_zero_parameters(UNet(UNetConfig.preset(preset)), seed)


def sd15_unet(seed: int = 0, **overrides: Any) -> nn.Module:
    """The SD 1.5 U-Net with random weights (diffusers' default init); `overrides` shrink it for tests."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        from fastdiff.errors import missing_extra

        raise missing_extra("diffusers", "diffusers") from None
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SD15_UNET_CONFIG, **overrides})


def build_workload(
    name: str,
    device: torch.device,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    sd15_overrides: dict[str, Any] | None = None,
    latent_size: int | None = None,
) -> Workload:
    """Build workload `name` in float32 and eval mode on `device`; `sampler` / `steps` override its defaults.

    `sd15_overrides` change fields of the SD 1.5 U-Net config (tests build a tiny one to run its code path on CPU).
    `latent_size` (workloads in `LATENT_WORKLOADS` only) samples latents of that height and width instead of the
    config's 64: a multiple of 8 for SD 1.5 (ValueError otherwise); the workload is then named `sd15-unet-<size>`.
    """
    from fastdiff import train

    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if latent_size is not None and name not in LATENT_WORKLOADS:
        raise ValueError(f"latent_size applies to the workloads {LATENT_WORKLOADS} only, not {name!r}")
    latent_size = check_latent_size(latent_size, sd15_overrides)
    spec = WORKLOADS[name]
    notes: list[str] = []
    is_diffusers = False
    if name == "digits":
        from fastdiff.pretrained import load_pretrained

        try:
            pre = load_pretrained("digits")
            model, schedule = pre.model, pre.schedule
            weights = "pretrained: fastdiff/weights/digits.safetensors"
        except FileNotFoundError:
            model = _random_unet("digits", seed)
            schedule = NoiseSchedule.from_kind(**train.DIGITS_SCHEDULE)
            weights = "random"
            notes.append("the shipped digits checkpoint is absent: random weights of the digits preset")
        sample_shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
        make_cond = _class_conds(model.num_classes)
    elif name in ("ddpm-cifar10", "adm-imagenet64"):
        model = _random_unet(name, seed)
        kind = "linear" if name == "ddpm-cifar10" else "cosine"
        schedule = NoiseSchedule.from_kind(kind)
        weights = "random"
        sample_shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
        make_cond = _no_conds if model.num_classes is None else _class_conds(model.num_classes)
    elif name == "sd15-unet":
        sized = {} if latent_size is None else {"sample_size": latent_size}
        model = sd15_unet(seed, **{**(sd15_overrides or {}), **sized})
        schedule = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
        weights = "random"
        config = model.config
        sample_shape = (config.in_channels, config.sample_size, config.sample_size)
        make_cond = _text_conds(SD15_TEXT_TOKENS, config.cross_attention_dim)
        if sd15_overrides:
            notes.append(f"SD 1.5 config changed: {sorted(sd15_overrides)}")
        is_diffusers = True
        notes.append("text states are fixed random tensors (no CLIP encoder in the loop)")
    else:
        from fastdiff.models import MLPDenoiser

        torch.manual_seed(seed)
        model = MLPDenoiser()
        schedule = NoiseSchedule.from_kind(**train.SWISSROLL_SCHEDULE)
        weights = "random"
        sample_shape = (model.dim,)
        make_cond = _no_conds
    workload = Workload(
        spec=spec,
        model=model.to(device).eval(),
        schedule=schedule,
        sample_shape=sample_shape,
        sampler_kind=sampler or spec.sampler,
        steps=steps or spec.steps,
        weights=weights,
        make_cond=make_cond,
        is_diffusers=is_diffusers,
        notes=notes,
        latent_size=latent_size,
    )
    workload.sampler()  # fails early on a step count the schedule cannot give
    return workload

"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), in guided-diffusion's vocabulary.

A `UNetConfig` builds the whole network: an encoder of `ResBlock`s (with `AttentionBlock`s at chosen feature-map
resolutions) and `Downsample`s, a middle block (ResBlock, attention, ResBlock), and a decoder that mirrors the
encoder and concatenates its skip connections. A sinusoidal timestep embedding (plus a class embedding for
class-conditional models) is fed into every ResBlock.

Two module types carry all of the network's normalisation and attention, so `fastdiff.accelerate()` can swap in
fused kernels by flipping one attribute: `GroupNormSiLU` (every GroupNorm, with its SiLU and ADM scale-shift) and
`AttentionBlock` (every self-attention); both call `fastdiff.kernels` with their `backend`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastdiff.kernels as kernels
from fastdiff.guidance import null_class_cond


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a `UNet`; frozen, JSON-serialisable with `to_dict()` / `from_dict()`.

    `attention_resolutions` are feature-map sizes (e.g. (16, 8) on a 32x32 model means attention after the first
    downsample and the second); the middle block always has attention. `num_head_channels > 0` overrides
    `num_heads`. `low_res_channels > 0` makes an SR3-style super-resolution model: `forward` takes `low_res`,
    upsamples it bilinearly to `image_size` and concatenates it to `x` along channels. `learn_sigma=True` gives the
    output conv `2 * out_channels` channels as ADM's learned-variance checkpoints have, and `forward` returns them
    all: the epsilon prediction, then the variance interpolation v of improved DDPM (for
    `DDPMSampler(variance="learned_range")`; fixed-variance samplers use the first half). `rescale_residual` scales every
    residual sum (ResBlock and attention) by 1/sqrt(2).
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = 1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    num_classes: int | None = None
    low_res_channels: int = 0
    learn_sigma: bool = False
    rescale_residual: bool = False
    num_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("num_head_channels", self.num_head_channels, -1)
        if self.num_head_channels == 0:
            raise ValueError("num_head_channels must be -1 (use num_heads) or a positive int, got 0")
        _check_int("low_res_channels", self.low_res_channels, 0)
        _check_int("num_groups", self.num_groups, 1)
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 1)
        for name in (
            "use_scale_shift_norm",
            "resblock_updown",
            "conv_resample",
            "learn_sigma",
            "rescale_residual",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

        object.__setattr__(self, "channel_mult", _int_tuple("channel_mult", self.channel_mult))
        object.__setattr__(
            self,
            "attention_resolutions",
            _int_tuple("attention_resolutions", self.attention_resolutions, empty=True),
        )
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by 2**(len(channel_mult) - 1) = {2 ** (levels - 1)}"
            )
        resolutions = self.resolutions()
        bad = [r for r in self.attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are not feature-map resolutions of this model; "
                f"choose from {resolutions}"
            )
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.num_groups:
                raise ValueError(
                    f"model_channels * channel_mult = {channels} channels is not divisible by num_groups ({self.num_groups})"
                )
        # The middle block always has attention, at the lowest resolution.
        attended = {self.channel_mult[-1]} | {
            m for m, r in zip(self.channel_mult, resolutions, strict=True) if r in self.attention_resolutions
        }
        for mult in sorted(attended):
            self.attention_heads(self.model_channels * mult)

    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level of the encoder, from `image_size` down."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    def attention_heads(self, channels: int) -> int:
        """Number of heads of an attention block over `channels` channels; ValueError if they do not divide."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels ({self.num_head_channels}) must divide every attended channel count, got {channels}"
                )
            return channels // self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide every attended channel count, got {channels}"
            )
        return self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the fields (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of `to_dict()`; ValueError on unknown or missing keys."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {unknown}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing UNetConfig keys: {missing}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named configuration from `PRESETS`, with optional field overrides (e.g. a small test build)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _int_tuple(name: str, value: object, *, empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"{name} must contain positive ints, got {value!r}")
    if not items and not empty:
        raise ValueError(f"{name} must not be empty")
    return items


PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": UNetConfig(
        image_size=32,
        in_channels=3,
        model_channels=128,
        out_channels=3,
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        channel_mult=(1, 2, 2, 2),
    ),
    # Dhariwal & Nichol 2021, ImageNet 64x64 class-conditional (epsilon only, no learned variance).
    "adm-imagenet64": UNetConfig(
        image_size=64,
        in_channels=3,
        model_channels=192,
        out_channels=3,
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        dropout=0.1,
        channel_mult=(1, 2, 3, 4),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        num_classes=1000,
    ),
    # sklearn's digits at their native 8x8: upsampling adds no information but 4x the compute, and the
    # 2-core CPU training budget (minutes) is what decides. 1.08M parameters (a 4.3 MB fp32 checkpoint).
    "digits": UNetConfig(
        image_size=8,
        in_channels=1,
        model_channels=32,
        out_channels=1,
        num_res_blocks=2,
        attention_resolutions=(4,),
        channel_mult=(1, 2),
        num_heads=2,
        use_scale_shift_norm=True,
        num_classes=10,
        num_groups=8,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (N,), int or float: [cos(t f_i), sin(t f_i)], float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def broadcast_timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a (batch,) tensor on `device`: t is (batch,), a 0-d or 1-element tensor, or a Python number."""
    if isinstance(t, torch.Tensor):
        if t.dim() == 0 or t.shape == (1,):
            return t.to(device).reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) or be a scalar, got shape {tuple(t.shape)}")
        return t.to(device)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a tensor or a number, got {type(t).__name__}")
    return torch.full((batch,), float(t), device=device)


def timestep_rows(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """`broadcast_timesteps`, except that one timestep for the whole batch stays one row, (1,): a number, a 0-d or
    1-element tensor, or a (batch,) tensor of stride 0 (the expanded view the sampling loops pass). A model embeds
    that row once and broadcasts the embedding, instead of embedding the same timestep batch times (for the
    swiss-roll MLP at batch 64 that is 6 of its 16 matrix products)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape == (1,):
        return broadcast_timesteps(t, 1, device)
    t = broadcast_timesteps(t, batch, device)
    return t[:1] if batch == 1 or t.stride(0) == 0 else t


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: ADM starts every residual branch (and the output) at zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm, then ADM's `* (1 + scale) + shift` when given, then SiLU when `silu`; runs `kernels.group_norm_silu`.

    `backend` ("torch", "triton", "auto") picks the kernel; `fastdiff.accelerate()` flips it.
    """

    def __init__(self, num_groups: int, num_channels: int, *, silu: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu
        self.backend = "torch"

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        return kernels.group_norm_silu(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            scale=scale,
            shift=shift,
            silu=self.silu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}, backend={self.backend!r}"


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; those that are `TimestepBlock`s also receive the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, followed by a 3x3 conv when `use_conv`."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv when `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block: norm-SiLU-conv, add the embedding (or scale-shift the second norm), norm-SiLU-dropout-conv.

    With `up` / `down` (BigGAN style), both branches are resampled inside the block, the main one after its first
    norm-SiLU. The last conv is zero-initialised, so a new block starts as its skip connection.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        *,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        num_groups: int = 32,
        rescale_residual: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.rescale_residual = rescale_residual
        self.in_norm = GroupNormSiLU(num_groups, channels)
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = None
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = GroupNormSiLU(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_norm(x)
        if self.h_upd is not None:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        if self.use_scale_shift_norm:
            # a one-row embedding (one timestep, no labels) serves the batch as a stride-0 view
            scale, shift = emb_out.expand(h.shape[0], -1).chunk(2, dim=1)
            h = self.out_norm(h, scale=scale, shift=shift)
        else:
            h = self.out_norm(h + emb_out[:, :, None, None])
        out = self.skip_connection(x) + self.out_conv(self.dropout(h))
        return out * (1 / math.sqrt(2)) if self.rescale_residual else out


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions: GroupNorm, 1x1 qkv, `kernels.attention`, zero-init 1x1 out.

    `backend` ("torch", "triton", "auto") picks the attention kernel; `fastdiff.accelerate()` flips it.
    """

    def __init__(
        self, channels: int, num_heads: int, *, num_groups: int = 32, rescale_residual: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.rescale_residual = rescale_residual
        self.backend = "torch"
        self.norm = GroupNormSiLU(num_groups, channels, silu=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # qkv channels are laid out [q | k | v], each split into heads: (B, 3, heads, head_dim, H*W).
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        a = kernels.attention(q, k, v, backend=self.backend)
        a = a.transpose(-1, -2).reshape(b, c, height, width)
        out = x + self.proj_out(a)
        return out * (1 / math.sqrt(2)) if self.rescale_residual else out

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"


class UNet(nn.Module):
    """The ADM U-Net: `forward(x, t, class_labels=None, low_res=None) -> eps`, the same shape as `x`.

    For a class-conditional model the label `num_classes` is the null label of classifier-free guidance, and
    `class_labels=None` means all-null. Inputs are validated in eager mode; checking the label values reads them
    on the host (one device sync), which is skipped under torch.compile and during CUDA graph capture.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        self.num_classes = config.num_classes
        mc = config.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = None if config.num_classes is None else nn.Embedding(config.num_classes + 1, emb_ch)

        def res_block(channels: int, out_channels: int, **updown: bool) -> ResBlock:
            return ResBlock(
                channels,
                emb_ch,
                config.dropout,
                out_channels,
                use_scale_shift_norm=config.use_scale_shift_norm,
                num_groups=config.num_groups,
                rescale_residual=config.rescale_residual,
                **updown,
            )

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(
                channels,
                config.attention_heads(channels),
                num_groups=config.num_groups,
                rescale_residual=config.rescale_residual,
            )

        ch = config.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(
                    nn.Conv2d(config.in_channels + config.low_res_channels, ch, 3, padding=1)
                )
            ]
        )
        skip_channels = [ch]
        resolutions = config.resolutions()
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * mc)]
                ch = mult * mc
                if resolutions[level] in config.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                down = (
                    res_block(ch, ch, down=True)
                    if config.resblock_updown
                    else Downsample(ch, config.conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if resolutions[level] in config.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == config.num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if config.resblock_updown
                        else Upsample(ch, config.conv_resample)
                    )
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out_norm = GroupNormSiLU(config.num_groups, ch)
        out_ch = config.out_channels * (2 if config.learn_sigma else 1)
        self.out_conv = _zero(nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise eps of `x` at timesteps `t` ((B,), 0-d or a number), optionally conditioned."""
        cfg = self.config
        if not torch.compiler.is_compiling():
            self._check_inputs(x, class_labels, low_res)
        batch = x.shape[0]
        t = timestep_rows(t, batch, x.device)  # one row when every sample has the same t: embedded once
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(class_labels.long())

        h = x
        if cfg.low_res_channels:
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, low_res.to(h.dtype)], dim=1)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(self.out_norm(h))

    def _check_inputs(
        self, x: torch.Tensor, class_labels: torch.Tensor | None, low_res: torch.Tensor | None
    ) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        if class_labels is not None:
            if self.num_classes is None:
                raise ValueError("class_labels given to an unconditional model (config.num_classes is None)")
            if (
                not isinstance(class_labels, torch.Tensor)
                or class_labels.is_floating_point()
                or (class_labels.dtype in (torch.bool, torch.complex64, torch.complex128))
            ):
                raise TypeError("class_labels must be an integer tensor")
            if class_labels.shape != (batch,):
                raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
            # Reading the values syncs with the device, which a CUDA graph capture forbids.
            capturing = class_labels.is_cuda and torch.cuda.is_current_stream_capturing()
            if (
                not capturing
                and class_labels.numel()
                and (int(class_labels.min()) < 0 or int(class_labels.max()) > self.num_classes)
            ):
                raise ValueError(
                    f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null label), "
                    f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]"
                )
        if cfg.low_res_channels:
            if low_res is None:
                raise ValueError(
                    f"low_res is required: this model has low_res_channels={cfg.low_res_channels}"
                )
            if (
                not isinstance(low_res, torch.Tensor)
                or low_res.dim() != 4
                or low_res.shape[:2]
                != (
                    batch,
                    cfg.low_res_channels,
                )
            ):
                shape = tuple(low_res.shape) if isinstance(low_res, torch.Tensor) else type(low_res).__name__
                raise ValueError(
                    f"low_res must have shape ({batch}, {cfg.low_res_channels}, h, w), got {shape}"
                )
        elif low_res is not None:
            raise ValueError(
                "low_res given to a model without low-resolution conditioning (low_res_channels=0)"
            )

    def null_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The unconditional counterpart of `cond` for classifier-free guidance: null class labels, same shape."""
        if self.num_classes is None:
            raise ValueError("class_labels given to an unconditional model (config.num_classes is None)")
        return null_class_cond(cond, self.num_classes)

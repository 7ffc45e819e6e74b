"""accelerate(): swap fastdiff's fused kernels into our U-Net and diffusers U-Nets; as_denoiser(): one calling convention.

Our `UNet` routes every GroupNorm through `GroupNormSiLU` and every attention through `AttentionBlock`, so
accelerating it means choosing their kernel backend. A diffusers U-Net (`UNet2DModel`, `UNet2DConditionModel`) is
rewritten module by module, only where the rewrite is exactly the computation it replaces:

- `ResnetBlock2D` with a SiLU nonlinearity: both norms become `GroupNormSiLU(silu=True)` and the block becomes a
  `FusedResnetBlock2D` (same parameters, same state-dict keys) whose forward skips the separate SiLU calls; with
  `time_embedding_norm="scale_shift"`, `norm2(h) * (1 + scale) + shift` and the SiLU are one `group_norm_silu`
  call. The block's SiLU module is still applied to the time embedding.
- `conv_norm_out` + `conv_act` (SiLU) at the end of the U-Net: one `GroupNormSiLU`, and `conv_act` -> Identity.
- every other `nn.GroupNorm` (attention `group_norm`, `Transformer2DModel.norm`, ...): `GroupNormSiLU(silu=False)`.
- `Attention` modules running diffusers' default processor (`AttnProcessor2_0` / `AttnProcessor`):
  `FastAttnProcessor`, which calls `fastdiff.kernels.attention` on strided views of one fused projection (q/k/v
  for self-attention, k/v for cross-attention). The fused weight is one tensor of which `to_q.weight`,
  `to_k.weight` and `to_v.weight` are slices (`_FusedProjection`): the parameters, and so the state dict's keys,
  stay those of the original model, and anything that writes them in place (`load_state_dict`, `copy_`, peft's
  `fuse_lora`) writes the fused weight too. Projections wrapped by LoRA / peft layers run as separate calls, so
  adapters loaded before or after `accelerate()` keep working. Calls with an attention mask run through the
  original processor (counted in `fallback_calls`).

Anything else is left as it is and listed in the `AccelerationReport` that `report(module)` returns.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

import fastdiff.kernels as kernels
from fastdiff.engine.weights import DERIVED_ATTR
from fastdiff.guidance import null_class_cond
from fastdiff.kernels.attention import MAX_HEAD_DIM
from fastdiff.kernels.backend import BACKENDS, resolve_backend
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.unet import AttentionBlock, GroupNormSiLU, UNet, broadcast_timesteps

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("group_norm_silu", "group_norm", "attention")
_REPORT_ATTR = "_fastdiff_report"


@dataclass(frozen=True)
class Swap:
    """One rewrite (or, in `AccelerationReport.skipped`, one thing left alone): module path, kind, and what/why."""

    path: str
    kind: str
    detail: str


@dataclass
class Coverage:
    """How many of one kind of op were found in the model and how many run through a fastdiff kernel."""

    found: int = 0
    fused: int = 0

    @property
    def complete(self) -> bool:
        return self.fused == self.found


@dataclass
class AccelerationReport:
    """What `accelerate()` did to a model: the swaps, what it left alone, and coverage per kind of op.

    Kinds: `group_norm_silu` (a GroupNorm followed by SiLU), `group_norm` (any other GroupNorm), `attention`.
    `fallback_calls` counts attention calls that ran the original diffusers processor (attention masks); it is
    read from the live processors by `report()`.
    """

    model: str
    kernels: str
    backend: str
    dtype: torch.dtype
    channels_last: bool
    swaps: list[Swap] = field(default_factory=list)
    skipped: list[Swap] = field(default_factory=list)
    coverage: dict[str, Coverage] = field(default_factory=lambda: {k: Coverage() for k in KINDS})
    fallback_calls: int = 0

    @property
    def complete(self) -> bool:
        """True when every op found runs through a fastdiff kernel."""
        return all(c.complete for c in self.coverage.values())

    def _fused(self, path: str, kind: str, detail: str, count: int = 1) -> None:
        self.coverage[kind].found += count
        self.coverage[kind].fused += count
        self.swaps.append(Swap(path, kind, detail))

    def _skip(self, path: str, kind: str, reason: str, count: int = 1) -> None:
        self.coverage[kind].found += count
        self.skipped.append(Swap(path, kind, reason))

    def __str__(self) -> str:
        lines = [
            f"accelerate({self.model}): kernels={self.kernels!r} ({self.backend} here), "
            f"dtype={str(self.dtype).removeprefix('torch.')}, channels_last={self.channels_last}",
            f"{'op':<16}{'found':>7}{'fused':>7}{'coverage':>10}",
        ]
        for kind, c in self.coverage.items():
            pct = f"{100.0 * c.fused / c.found:.0f}%" if c.found else "-"
            lines.append(f"{kind:<16}{c.found:>7}{c.fused:>7}{pct:>10}")
        lines += [f"not fused: {s.path or '<root>'} ({s.kind}): {s.detail}" for s in self.skipped]
        if self.fallback_calls:
            lines.append(f"attention calls run by the original processor (masks): {self.fallback_calls}")
        return "\n".join(lines)


def _group_norm_silu_from(norm: nn.GroupNorm, silu: bool, backend: str) -> GroupNormSiLU:
    """A GroupNormSiLU sharing `norm`'s parameters (or their absence) and settings."""
    new = GroupNormSiLU(norm.num_groups, norm.num_channels, silu=silu, eps=norm.eps)
    new.affine = norm.affine
    new.weight, new.bias = norm.weight, norm.bias
    new.backend = backend
    new.train(norm.training)
    return new


class _FusedProjection:
    """One weight (and bias) tensor whose row blocks are the weights (biases) of the projections `names` of an
    attention module, for one `F.linear` in place of several.

    Each projection's parameters are re-pointed at their block (`param.data = block`), so the model keeps its
    parameters and state-dict keys, and a write into a parameter in place is a write into the fused tensor. A
    parameter that no longer points at its block (a new `nn.Parameter`, `.to(dtype)`, a deep copy) makes
    `intact` false, and `refresh` fuses the parameters as they are now. Under LoRA / peft wrappers the base
    layers are fused, so the fused path serves again once the adapters are unloaded. This object is what
    `fastdiff.engine.weights` refreshes (`DERIVED_ATTR`) before it fingerprints the weights a graph will read.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._pointers: list[int] = []

    @staticmethod
    def _pointers_of(layers: list[nn.Linear]) -> list[int]:
        return [p.data_ptr() for layer in layers for p in (layer.weight, layer.bias) if p is not None]

    def intact(self, layers: list[nn.Linear]) -> bool:
        """Whether every parameter of `layers` still is its block of the fused tensors (which this object keeps
        alive, so no other tensor can have those addresses)."""
        return self._pointers_of(layers) == self._pointers

    def refresh(self, attn: nn.Module) -> bool:
        """Fuse the (base) projections of `attn` anew unless they are intact; True when it did."""
        layers = [getattr(attn, name) for name in self.names]
        layers = [getattr(layer, "base_layer", layer) for layer in layers]
        if not _fusable(layers) or self.intact(layers):
            return False
        # A fused tensor made under inference_mode could not be written in place outside it (load_state_dict).
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([layer.weight for layer in layers])
            biased = layers[0].bias is not None
            self.bias = torch.cat([layer.bias for layer in layers]) if biased else None
            start = 0
            for layer in layers:
                stop = start + layer.weight.shape[0]
                layer.weight.data = self.weight[start:stop]
                if biased:
                    layer.bias.data = self.bias[start:stop]
                start = stop
        self._pointers = self._pointers_of(layers)
        return True


def _fusable(layers: list[Any]) -> bool:
    """Plain linear projections with biases all present or all absent (peft / LoRA wrappers are not)."""
    return (
        all(type(layer) is nn.Linear for layer in layers)
        and len({layer.bias is None for layer in layers}) == 1
    )


def _fused_projection(
    attn: nn.Module, names: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the projections `names` of `attn` as one linear map, or None when they must run as
    separate calls (a LoRA / peft layer wraps one of them)."""
    layers = [getattr(attn, name) for name in names]
    fused = attn.__dict__.get(DERIVED_ATTR)
    if not isinstance(fused, _FusedProjection) or fused.names != names or not _fusable(layers):
        return None
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(layer.weight.requires_grad for layer in layers)
    ):
        # Traced or differentiated: concatenate the live parameters, so a compiled graph holds no copy of them.
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        return torch.cat([layer.weight for layer in layers]), bias
    if not fused.intact(layers):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # parameters are not re-pointed inside a CUDA graph capture
        fused.refresh(attn)
    return fused.weight, fused.bias


def _fusion_group(attn: nn.Module) -> tuple[str, ...]:
    """The projections of `attn` that read the same input: q/k/v for self-attention, k/v for cross-attention."""
    return ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")


class FastAttnProcessor:
    """A diffusers attention processor running `fastdiff.kernels.attention`, numerically the default one it replaces.

    Handles self- and cross-attention, `spatial_norm`, `group_norm`, `norm_cross`, `norm_q`/`norm_k`, the residual
    connection and `rescale_output_factor` as `AttnProcessor2_0` does, reading q/k/v (or k/v) as strided views of
    one fused projection when the projections are plain `nn.Linear` layers (`_fused_projection`); LoRA-wrapped
    projections run one by one. A call with an attention mask (which the kernel does not take) runs `fallback`,
    the processor it replaced, and is counted in `fallback_calls` (outside torch.compile).
    """

    def __init__(self, fallback: Any, backend: str, scale_from_module: bool) -> None:
        self.fallback = fallback
        self.backend = backend
        # AttnProcessor2_0 lets SDPA scale by 1/sqrt(head_dim) (kernel default); AttnProcessor uses attn.scale.
        self.scale_from_module = scale_from_module
        self.fallback_calls = 0

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:
            if not torch.compiler.is_compiling():
                self.fallback_calls += 1
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            # GroupNorm over (B, C, H, W) is GroupNorm over (B, C, H*W): normalise first, skip a transpose.
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        elif attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        heads = attn.heads

        def split_heads(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
            # (B, S, parts * heads * d) -> `parts` strided (B, heads, S, d) views, no copy.
            return list(t.unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0))

        def project(names: tuple[str, ...], source: torch.Tensor) -> list[torch.Tensor]:
            fused = _fused_projection(attn, names)
            if fused is not None:
                return split_heads(torch.nn.functional.linear(source, *fused), len(names))
            return [split_heads(getattr(attn, name)(source), 1)[0] for name in names]

        if encoder_hidden_states is None and not attn.is_cross_attention:
            query, key, value = project(("to_q", "to_k", "to_v"), hidden_states)
        else:
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            (query,) = project(("to_q",), hidden_states)
            key, value = project(("to_k", "to_v"), encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = attn.scale if self.scale_from_module else None
        out = kernels.attention(query, key, value, scale=scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fused_resnet_forward(
    self: Any, input_tensor: torch.Tensor, temb: torch.Tensor, *args: Any, **kwargs: Any
):
    """ResnetBlock2D.forward with norm+SiLU fused (norm1/norm2 are GroupNormSiLU(silu=True)).

    The deprecated `scale` argument is ignored, as diffusers ignores it.
    """
    hidden_states = self.norm1(input_tensor)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: nearest upsampling of large NHWC batches fails
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)
        if self.time_embedding_norm == "default":
            temb = temb[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
            )
        scale, shift = temb.to(hidden_states.dtype).chunk(2, dim=1)
        hidden_states = self.norm2(hidden_states, scale=scale, shift=shift)
    else:
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


@functools.cache
def _diffusers() -> SimpleNamespace:
    """diffusers' classes that accelerate() rewrites, and the fused block subclass (built on first use)."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

    fused = type(
        "FusedResnetBlock2D",
        (ResnetBlock2D,),
        {
            "__module__": __name__,
            "__doc__": "A diffusers ResnetBlock2D whose GroupNorm+SiLU pairs run as one fastdiff kernel each.",
            "forward": _fused_resnet_forward,
        },
    )
    return SimpleNamespace(
        UNets=(UNet2DModel, UNet2DConditionModel),
        Attention=Attention,
        default_processors=(AttnProcessor2_0, AttnProcessor),
        AttnProcessor2_0=AttnProcessor2_0,
        ResnetBlock2D=ResnetBlock2D,
        ResnetBlockCondNorm2D=ResnetBlockCondNorm2D,
        FusedResnetBlock2D=fused,
    )


def __getattr__(name: str) -> Any:
    # FusedResnetBlock2D subclasses a diffusers class, so it exists only once diffusers is imported; resolving it
    # here keeps pickle able to find it by name.
    if name == "FusedResnetBlock2D":
        return _diffusers().FusedResnetBlock2D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_diffusers(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "diffusers"


def _resnet_unfusable(block: nn.Module) -> str | None:
    if block.time_emb_proj is None and block.time_embedding_norm == "scale_shift":
        return "scale_shift without time_emb_proj"
    for name in ("norm1", "norm2"):
        if type(getattr(block, name)) is not nn.GroupNorm:
            return f"{name} is a {type(getattr(block, name)).__name__}, not nn.GroupNorm"
    return None


def _attention_unfusable(attn: nn.Module, d: SimpleNamespace) -> str | None:
    processor = attn.processor
    if type(processor) not in d.default_processors:
        return f"processor {type(processor).__name__} is not one of diffusers' defaults"
    if attn.to_k is None or attn.to_v is None or attn.added_kv_proj_dim is not None:
        return "added key/value projections"
    if attn.to_out is None:
        return "no output projection"
    if attn.inner_kv_dim != attn.inner_dim:
        return "fewer key/value heads than query heads"
    if attn.fused_projections:
        return "projections already fused by the user"
    head_dim = attn.inner_dim // attn.heads
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def _accelerate_ours(model: nn.Module, backend: str, rep: AccelerationReport) -> None:
    for path, m in model.named_modules():
        if isinstance(m, GroupNormSiLU):
            m.backend = backend
            rep._fused(path, "group_norm_silu" if m.silu else "group_norm", f"backend={backend!r}")
        elif isinstance(m, AttentionBlock):
            m.backend = backend
            rep._fused(path, "attention", f"backend={backend!r}")


def _accelerate_diffusers(model: nn.Module, backend: str, rep: AccelerationReport) -> None:
    d = _diffusers()
    modules = dict(model.named_modules())
    claimed: set[int] = set()  # norms already counted as half of a GroupNorm+SiLU pair

    for path, m in modules.items():
        if isinstance(m, d.ResnetBlockCondNorm2D):
            rep._skip(path, "group_norm_silu", "conditional norm (ada_group / spatial) is not fused", 2)
        elif isinstance(m, d.ResnetBlock2D) and type(m.nonlinearity) is nn.SiLU:
            why = _resnet_unfusable(m) if type(m) is d.ResnetBlock2D else None
            if type(m) not in (d.ResnetBlock2D, d.FusedResnetBlock2D):
                why = f"{type(m).__name__} subclasses ResnetBlock2D with its own forward"
            if why:
                rep._skip(path, "group_norm_silu", why, 2)
            elif type(m) is d.ResnetBlock2D:
                m.norm1 = _group_norm_silu_from(m.norm1, True, backend)
                m.norm2 = _group_norm_silu_from(m.norm2, True, backend)
                m.__class__ = d.FusedResnetBlock2D
            else:
                m.norm1.backend = m.norm2.backend = backend
            claimed.update((id(m.norm1), id(m.norm2)))
            if why:
                continue
            rep._fused(path, "group_norm_silu", f"norm1+SiLU, norm2+{m.time_embedding_norm}+SiLU", 2)
        elif isinstance(m, d.UNets) and m.conv_norm_out is not None:
            norm, act = m.conv_norm_out, m.conv_act
            where = f"{path}.conv_norm_out" if path else "conv_norm_out"
            if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
                m.conv_norm_out = _group_norm_silu_from(norm, True, backend)
                m.conv_act = nn.Identity()
            elif isinstance(norm, GroupNormSiLU) and norm.silu and isinstance(act, nn.Identity):
                norm.backend = backend
            else:
                continue
            claimed.add(id(m.conv_norm_out))
            rep._fused(where, "group_norm_silu", "conv_norm_out + conv_act")

    for path, m in dict(model.named_modules()).items():
        if id(m) in claimed or not isinstance(m, nn.GroupNorm):
            continue
        parent_path, _, name = path.rpartition(".")
        if type(m) is nn.GroupNorm:
            setattr(model.get_submodule(parent_path), name, _group_norm_silu_from(m, False, backend))
        elif isinstance(m, GroupNormSiLU) and not m.silu:
            m.backend = backend
        else:
            rep._skip(path, "group_norm", f"{type(m).__name__} is not nn.GroupNorm")
            continue
        rep._fused(path, "group_norm", "plain group norm")

    for path, m in model.named_modules():
        if not isinstance(m, d.Attention):
            continue
        if isinstance(m.processor, FastAttnProcessor):
            m.processor.backend = backend
        else:
            why = _attention_unfusable(m, d)
            if why:
                rep._skip(path, "attention", why)
                continue
            scale_from_module = type(m.processor) is not d.AttnProcessor2_0
            fused = m.__dict__[DERIVED_ATTR] = _FusedProjection(_fusion_group(m))
            fused.refresh(m)
            m.set_processor(FastAttnProcessor(m.processor, backend, scale_from_module))
        kind = "cross-attention, fused k/v" if m.is_cross_attention else "self-attention, fused q/k/v"
        rep._fused(path, "attention", kind)


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def accelerate(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    kernels: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """The model with fastdiff's fused kernels swapped in: our `UNet`, or a diffusers `UNet2DModel` /
    `UNet2DConditionModel` (see the module docstring for exactly what is rewritten). Outputs equal the original's
    up to floating-point rounding.

    `dtype` (float32, float16, bfloat16) casts the model; None keeps its dtype (keep float32 on CPUs without bf16
    hardware). `channels_last` converts it to channels-last memory (None: when it has 2-D convolutions).
    `kernels` is the backend of every swapped op: "auto" (Triton where it runs, else the PyTorch reference),
    "triton" or "torch".
    Returns a deep copy unless `inplace=True`; `report(model)` tells what was done.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError("model is a torch.compile()d module: accelerate the module first, then compile it")
    if kernels not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {kernels!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {DTYPES}, got {dtype!r}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be None or a bool, got {channels_last!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    device = _model_device(model)
    backend = resolve_backend(kernels, device)  # an explicit "triton" that cannot run here fails now
    if not inplace:
        model = copy.deepcopy(model)
    if dtype is not None:
        model.to(dtype=dtype)
    if channels_last is None:
        # oneDNN convolutions skip their layout reorders on channels-last tensors: the compiled digits U-Net
        # (batch 128, 2 CPU cores) took 34.6 ms a call against 41.7-45.5 ms, and 49 ms against 55 ms eagerly.
        channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    param = next(iter(model.parameters()), None)
    rep = AccelerationReport(
        model=type(model).__name__,
        kernels=kernels,
        backend=backend,
        dtype=param.dtype if param is not None else torch.float32,
        channels_last=channels_last,
    )
    # An accelerated diffusers model holds GroupNormSiLU modules too: it is accelerated as a diffusers model.
    if any(_is_diffusers(m) for m in model.modules()):
        _accelerate_diffusers(model, kernels, rep)
    else:
        _accelerate_ours(model, kernels, rep)
    setattr(model, _REPORT_ATTR, rep)
    return model


def _unwrap(module: Any) -> Any:
    """The accelerated model inside torch.compile and as_denoiser wrappers."""
    module = getattr(module, "_orig_mod", module)
    if isinstance(module, DiffusersDenoiser):
        module = getattr(module.unet, "_orig_mod", module.unet)
    return module


def report(module: nn.Module) -> AccelerationReport:
    """The AccelerationReport of a model returned by `accelerate()` (also through `as_denoiser` or torch.compile)."""
    target = _unwrap(module)
    rep = getattr(target, _REPORT_ATTR, None) if isinstance(target, nn.Module) else None
    if rep is None:
        raise ValueError(f"{type(module).__name__} was not returned by fastdiff.accelerate()")
    rep.fallback_calls = sum(
        m.processor.fallback_calls
        for m in target.modules()
        if isinstance(getattr(m, "processor", None), FastAttnProcessor)
    )
    return rep


# Once fastdiff/__init__.py exports the function, the name `fastdiff.accelerate` is the function, not this module:
# as an attribute of the function, `fastdiff.accelerate.report(model)` works either way.
accelerate.report = report


class DiffusersDenoiser(nn.Module):
    """A diffusers U-Net as a fastdiff denoiser: `forward(x, t, **cond) -> tensor` (the `.sample` of the output).

    `t` is a (B,) tensor, 0-d tensor or number; `cond` holds the U-Net's keyword arguments (`encoder_hidden_states`,
    `class_labels`, ...). x and floating-point conditions are cast to the U-Net's dtype and the output back to
    x's dtype. `null_cond` exists when a null class label was given (`null_class_label`); otherwise pass `uncond`
    to classifier-free guidance explicitly.
    """

    _fastdiff_wraps = "unet"  # fastdiff.update_weights(denoiser, ...) takes the U-Net's state-dict keys

    def __init__(self, unet: nn.Module, *, null_class_label: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.null_class_label = null_class_label

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        dtype = self.unet.dtype
        t = broadcast_timesteps(t, x.shape[0], x.device)
        cond = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in cond.items()
        }
        out = self.unet(x.to(dtype), t, **cond, return_dict=False)[0]
        return out.to(x.dtype)

    @property
    def null_cond(self) -> Any:
        """`null_cond(cond)` -> cond with every class label replaced by the null label; None without a null label."""
        return None if self.null_class_label is None else self._null_cond

    def _null_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        return null_class_cond(cond, self.null_class_label)


def as_denoiser(module: nn.Module, *, null_class_label: int | None = None) -> nn.Module:
    """`module` as a denoiser `denoiser(x, t, **cond) -> tensor`.

    Our `UNet` and `MLPDenoiser` already are one and are returned as they are. A diffusers U-Net (also accelerated or
    torch.compile()d) is wrapped in a `DiffusersDenoiser`; `null_class_label` names the class label its
    training used as "no class", which gives it a `null_cond` for classifier-free guidance.
    """
    if isinstance(module, DiffusersDenoiser):
        return module
    target = getattr(module, "_orig_mod", module)
    if isinstance(target, (UNet, MLPDenoiser)):
        if null_class_label is not None:
            raise ValueError("null_class_label is only for diffusers U-Nets; our UNet has its own null label")
        return module
    if not isinstance(target, nn.Module) or not _is_diffusers(target):
        raise TypeError(
            f"module must be a fastdiff UNet / MLPDenoiser or a diffusers U-Net, got {type(module).__name__}"
        )
    if null_class_label is not None:
        if isinstance(null_class_label, bool) or not isinstance(null_class_label, int):
            raise TypeError(f"null_class_label must be an int, got {null_class_label!r}")
        embedding = getattr(target, "class_embedding", None)
        if embedding is None:
            raise ValueError("null_class_label given but this U-Net has no class embedding")
        if isinstance(embedding, nn.Embedding) and not 0 <= null_class_label < embedding.num_embeddings:
            raise ValueError(
                f"null_class_label must be in [0, {embedding.num_embeddings}), got {null_class_label}"
            )
    return DiffusersDenoiser(module, null_class_label=null_class_label)


__all__ = [
    "AccelerationReport",
    "Coverage",
    "DiffusersDenoiser",
    "FastAttnProcessor",
    "Swap",
    "accelerate",
    "as_denoiser",
    "report",
]

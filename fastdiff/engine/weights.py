"""Which weights a captured graph or compiled loop reads: a cheap fingerprint, and updates written in place.

A CUDA graph replays the addresses it captured; the compiled CPU loop takes the parameters as inputs (inductor's
freezing, which would fold them into the code, is off); peft's adapter scales are Python numbers that a graph
bakes in. So a change of weights is one of two kinds:

- in place (`load_state_dict`, `param.data.copy_`, `update_weights`, peft's merge in `fuse_lora`): the storage
  a graph reads holds the new values, and nothing needs to be captured again. It shows as new tensor version
  counters (`WeightsState.versions`), except `param.data.copy_` (`.data` has its own counter), which only a
  read of the values sees (`WeightsWatch.checksum`: what exported graphs, which hold a copy, need).
- anything else (a new `nn.Parameter`, `.to(dtype)`, an adapter added, removed, activated, disabled or rescaled):
  the `WeightsState.layout` changes, and a graph or compiled loop built for another layout must not be replayed.

`WeightsWatch(module).state()` gives both. It runs wherever user code may have run since the last replay: the
diffusers U-Net replayer checks it at every U-Net call (a pipeline's own code runs between them); the engine at
every `sample()` and after each callback, the only user code between two of its replays (a CUDA graph replay
runs no Python; eager and compiled steps read the live parameters, the compiled loop is one call). It touches
each tensor twice (its storage address and its version counter) and re-walks the module tree only when a
module, parameter or buffer was registered somewhere since the last call (global registration hooks, installed
on first use, count those). Not seen: a parameter swapped by writing `module._parameters[...]` directly (as `.to()` does under
`torch.__future__.set_overwrite_module_params_on_conversion(True)`), and `.data` re-pointed at a tensor of the same
address but another shape or dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from fastdiff.fingerprint import weights_checksum

# A module attribute holding an object with `refresh(module) -> bool`: state the module derives from its
# parameters and must re-derive when their storage changes (accelerate()'s fused attention projections).
DERIVED_ATTR = "_fastdiff_derived"
# A class attribute naming the attribute that holds the module a wrapper runs (SamplingEngine: "denoiser",
# DiffusersDenoiser: "unet"), so that `update_weights` takes that module's state-dict keys.
WRAPS_ATTR = "_fastdiff_wraps"

_generation = 0
_hooks: list[Any] = []
_version = attrgetter("_version")
# `WeightsWatch.sampled()` reads this many elements from the middle of each weight tensor.
SAMPLED_PER_TENSOR = 16
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _middle_bytes(t: torch.Tensor) -> torch.Tensor | None:
    """SAMPLED_PER_TENSOR elements from the middle of `t`'s memory, as a byte view of it (None for a tensor whose
    elements do not fill one block of memory, or that is not a floating-point CPU tensor)."""
    if t.device.type != "cpu" or not t.is_floating_point() or t.numel() == 0:
        return None
    last = _CHANNELS_LAST.get(t.dim())
    if not (t.is_contiguous() or (last is not None and t.is_contiguous(memory_format=last))):
        return None
    k = min(SAMPLED_PER_TENSOR, t.numel())
    return t.detach().as_strided((k,), (1,), t.storage_offset() + (t.numel() - k) // 2).view(torch.uint8)


def _registered(*_: Any) -> None:
    # A module built inside a compiled forward (diffusers' mid block slices `self.resnets[1:]`, a new ModuleList
    # every call) is no change of the model's structure; counted while dynamo traces, the count would become a
    # guard that fails on every call (torch.compile of the SD 1.5 U-Net recompiled up to its limit, then ran eager).
    if torch.compiler.is_compiling():
        return
    global _generation
    _generation += 1


def _watch_registrations() -> None:
    if not _hooks:
        from torch.nn.modules import module as m

        _hooks.extend(
            register(_registered)
            for register in (
                m.register_module_module_registration_hook,
                m.register_module_parameter_registration_hook,
                m.register_module_buffer_registration_hook,
            )
        )


def _tuner_layer_class() -> type | None:
    # Adapters exist only once peft is imported; importing it here would cost every user a second.
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(tuners, "BaseTunerLayer", None)


def _adapter_state(layer: Any) -> tuple:
    scaling = getattr(layer, "scaling", None)
    return (
        tuple(layer.active_adapters),
        tuple(layer.merged_adapters),
        bool(layer.disable_adapters),
        tuple(scaling.items()) if isinstance(scaling, dict) else None,
    )


@dataclass(frozen=True)
class WeightsState:
    """A module's weights at one moment: `layout` (storage addresses, dtypes, shapes, devices, adapter names,
    scales and activity: what a graph bakes in) and `versions` (the tensors' version counters: in-place writes)."""

    layout: tuple
    versions: tuple


class WeightsWatch:
    """The cheap fingerprint of one module's weights (parameters and buffers), for a check before every replay.

    `state()` first lets modules re-derive what they cache from parameters whose storage changed (`DERIVED_ATTR`),
    so that the layout it returns is the one the next call will read.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        _watch_registrations()
        self.module = module
        self._generation: int | None = None
        self._pointers: list[int] | None = None

    def _collect(self) -> None:
        modules = list(self.module.modules())
        tensors = {
            id(t): t
            for m in modules
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        }
        self._tensors = list(tensors.values())
        # Inference tensors keep no version counter; they can only be written inside inference_mode.
        self._versioned = [t for t in self._tensors if not t.is_inference()]
        tuner = _tuner_layer_class()
        self._adapters = [m for m in modules if tuner is not None and isinstance(m, tuner)]
        self._derived = [(m, m.__dict__[DERIVED_ATTR]) for m in modules if DERIVED_ATTR in m.__dict__]
        self._generation = _generation
        self._pointers = None
        self._sample_views: list[torch.Tensor] | None = None

    def state(self) -> WeightsState:
        """The module's `WeightsState` now."""
        if self._generation != _generation:
            self._collect()
        pointers = list(map(torch.Tensor.data_ptr, self._tensors))
        if pointers != self._pointers:
            if [derived.refresh(m) for m, derived in self._derived].count(True):
                pointers = list(map(torch.Tensor.data_ptr, self._tensors))
            self._pointers = pointers
            self._meta = tuple((t.dtype, t.shape, t.device) for t in self._tensors)
            self._sample_views = None
        adapters = tuple(map(_adapter_state, self._adapters))
        return WeightsState((tuple(pointers), self._meta, adapters), tuple(map(_version, self._versioned)))

    def sampled(self) -> torch.Tensor:
        """A few bytes of every floating-point CPU weight, read in place (`SAMPLED_PER_TENSOR` elements from the
        middle of each): a content check cheap enough for every call (20-30 us for the digits U-Net) that sees
        a `param.data` write when it changes one of those elements, as a new fine-tune, a merged LoRA or a
        rescale does. Call `state()` first (a tensor's storage moved: the views follow). CUDA weights are left
        out: comparing them would wait for the GPU on every call."""
        if self._generation != _generation:
            self._collect()
        if self._sample_views is None:
            found = (_middle_bytes(t) for t in self._tensors)
            self._sample_views = [v for v in found if v is not None]
        if not self._sample_views:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.cat(self._sample_views)

    def checksum(self) -> torch.Tensor:
        """`fastdiff.fingerprint.weights_checksum` of the watched tensors: reads every weight once, so it also sees
        writes no version counter records (`param.data.copy_`); for checks once per run, not per replay."""
        if self._generation != _generation:
            self._collect()
        return weights_checksum(self._tensors)


def wrapped_module(target: Any) -> Any:
    """The module a wrapper runs (SamplingEngine, as_denoiser, torch.compile, graph_unet), unwrapped fully."""
    while True:
        inner = getattr(type(target), WRAPS_ATTR, None)
        if inner is not None:
            target = getattr(target, inner)
        elif isinstance(target, nn.Module) and isinstance(getattr(target, "_orig_mod", None), nn.Module):
            target = target._orig_mod
        else:
            return target


def update_weights(target: Any, state_dict: Mapping[str, torch.Tensor], *, strict: bool = False) -> list[str]:
    """Copy `state_dict` into the storage `target`'s weights already live in: the cheap path of a weight swap.

    `target`: a `SamplingEngine`, an nn.Module (also accelerated, torch.compile()d, or an `as_denoiser` wrapper;
    keys are the wrapped module's) or a diffusers U-Net replayed by `graph_unet`. Graphs and compiled loops
    read the new values without being captured or compiled again. Every key must name a parameter or buffer of
    the module, with the same shape and dtype (ValueError otherwise, before anything is written); `strict=True`
    also requires every key of the module. A change of shape or dtype cannot be written in place: load it with
    `module.load_state_dict(sd, assign=True)` or `module.to(dtype)`, and the next call captures anew.
    Exported denoisers (ONNX Runtime, TensorRT) say what to call instead. Returns the keys written.
    """
    module = wrapped_module(target)
    own = getattr(module, "update_weights", None)
    if callable(own) and not isinstance(module, nn.Module):
        return own(state_dict)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "update_weights takes a SamplingEngine over a module, an nn.Module (accelerated, compiled or wrapped by "
            f"as_denoiser) or an exported denoiser; got {type(target).__name__}"
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    targets = module.state_dict(keep_vars=True)
    unknown = [k for k in state_dict if k not in targets]
    if unknown:
        raise ValueError(
            f"state_dict has {len(unknown)} key(s) that {type(module).__name__} does not: {unknown[:5]}"
        )
    missing = [k for k in targets if k not in state_dict]
    if strict and missing:
        raise ValueError(f"strict=True: state_dict lacks {len(missing)} key(s) of the module: {missing[:5]}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        current = targets[key]
        if value.shape != current.shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, the module's is {tuple(current.shape)}: "
                "a new shape cannot be written in place (load_state_dict(..., assign=True) captures anew)"
            )
        if value.dtype != current.dtype:
            raise ValueError(
                f"state_dict[{key!r}] is {value.dtype}, the module's is {current.dtype}: cast it first "
                f"(value.to({current.dtype})), or cast the module (module.to(dtype) captures anew)"
            )
    # inference_mode also admits parameters created under it (inference tensors); others get new versions.
    with torch.inference_mode():
        for key, value in state_dict.items():
            targets[key].copy_(value)
    return list(state_dict)


__all__ = [
    "DERIVED_ATTR",
    "WRAPS_ATTR",
    "WeightsState",
    "WeightsWatch",
    "update_weights",
    "wrapped_module",
]

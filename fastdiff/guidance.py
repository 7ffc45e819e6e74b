"""Classifier-free guidance: validating cond / uncond, null conditions, and batching both branches in one call."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch


def null_class_cond(cond: Mapping[str, Any], null_label: int) -> dict[str, Any]:
    """The unconditional counterpart of `cond` for a model with a null class: every class label -> `null_label`.

    Other conditioning (text states, low-res images) has no generic null: those need an explicit `uncond`.
    """
    uncond: dict[str, Any] = {}
    for key, value in cond.items():
        if key != "class_labels":
            raise ValueError(
                f"no null condition for {key!r}: pass an explicit `uncond` for it to classifier-free guidance"
            )
        uncond[key] = None if value is None else torch.full_like(value, null_label)
    return uncond


# The largest |guidance_scale| accepted. Pipelines use 1 to about 30; far beyond, the guided output is the
# difference of the two branches scaled into saturation: eager overflows to inf (refused as NaN), while exported
# runtimes (onnxruntime, OpenVINO) return huge finite values that become images of pure saturated noise.
MAX_GUIDANCE_SCALE = 1000.0


def check_guidance_scale(guidance_scale: Any, name: str = "guidance_scale") -> float:
    """`guidance_scale` as a float if it is a real number with |scale| <= MAX_GUIDANCE_SCALE; ValueError naming
    `name` otherwise (NaN, inf, a bool, a string, or absurdly large)."""
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, numbers.Real)
        or not abs(guidance_scale) <= MAX_GUIDANCE_SCALE
    ):
        raise ValueError(
            f"{name} must be a number in [-{MAX_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}] (pipelines use 1 to "
            f"about 30), got {guidance_scale!r}"
        )
    return float(guidance_scale)


def guidance_conds(
    denoiser: Any, cond: Mapping[str, Any] | None, uncond: Mapping[str, Any] | None, guidance_scale: float
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validate the conditioning and return (cond, uncond); uncond is None when guidance is off."""
    check_guidance_scale(guidance_scale)
    cond = dict(cond or {})
    if guidance_scale == 1.0:
        return cond, None
    if not cond:
        raise ValueError("guidance_scale != 1 needs a conditional model and cond= (e.g. {'class_labels': y})")
    if uncond is None:
        null_cond = getattr(denoiser, "null_cond", None)
        if null_cond is None:
            raise ValueError(
                "guidance_scale != 1: pass uncond= (this denoiser has no null_cond() to build the null condition)"
            )
        uncond = null_cond(cond)
    uncond = dict(uncond)
    if set(uncond) != set(cond):
        raise ValueError(f"uncond keys {sorted(uncond)} must match cond keys {sorted(cond)}")
    return cond, uncond


def batch_conds(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """cond and uncond concatenated along the batch so that both branches run as one denoiser call."""
    out = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            out[key] = torch.cat([value, other.to(value.device)])
        elif value is None and other is None:
            out[key] = None
        else:
            raise TypeError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors (or both None)")
    return out

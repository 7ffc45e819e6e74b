"""Fused per-step sampler update: CFG combine, x0 prediction, clipping, posterior / DDIM combination, noise.

One row of a StepTable (see fastdiff.samplers) holds the eight coefficients of step i; with m the model
output (eps, x0 or v, after classifier-free guidance):

    x0_hat = a * x + b * m          (clamped to [-clip, clip] when clip is given)
    eps    = p * x + q * m
    x_prev = c * x0_hat + d * eps + e * x + s * z

DDPM (either variance), DDIM with any eta and DDIM inversion differ only in the numbers.
"""

from __future__ import annotations

import torch

from fastdiff.kernels.backend import resolve_backend

TABLE_COLUMNS = ("a", "b", "p", "q", "c", "d", "e", "s")


def _check_inputs(x, eps, table, step, noise, eps_uncond, clip) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    for name, t in (("eps", eps), ("noise", noise), ("eps_uncond", eps_uncond)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != len(TABLE_COLUMNS):
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a (num_steps, {len(TABLE_COLUMNS)}) tensor, got {shape}")
    if table.device != x.device:
        raise ValueError(f"table is on {table.device} but x is on {x.device}")
    if table.dtype != torch.float32:
        raise ValueError(f"table must be float32, got {table.dtype}")
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"step must be an int or a 0-d integer tensor, got {step.dtype} of shape {tuple(step.shape)}")
        if step.device.type == "cpu" and not 0 <= int(step) < table.shape[0]:
            raise ValueError(f"step {int(step)} is out of range for a table of {table.shape[0]} steps")
    elif not isinstance(step, int) or not 0 <= step < table.shape[0]:
        raise ValueError(f"step must be an int in [0, {table.shape[0]}), got {step!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or a positive number, got {clip!r}")


def sampler_step_reference(
    x: torch.Tensor,
    eps: torch.Tensor,
    table: torch.Tensor,
    step: int | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    eps_uncond: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of `sampler_step`: the same update, computed in float32, returned in x's dtype."""
    a, b, p, q, c, d, e, s = table[step].unbind()
    xf = x.float()
    m = eps.float()
    if eps_uncond is not None:
        u = eps_uncond.float()
        m = u + guidance_scale * (m - u)
    x0 = a * xf + b * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c * x0 + d * (p * xf + q * m) + e * xf
    if noise is not None:
        out = out + s * noise.float()
    return out.to(x.dtype)


def sampler_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    table: torch.Tensor,
    step: int | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    eps_uncond: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    clip: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One sampler step x_t -> x_prev reading row `step` of `table` (float32, on x's device).

    `eps` is the model output (eps, x0 or v: the table's coefficients convert it); with `eps_uncond`,
    classifier-free guidance `u + w * (eps - u)` is applied first. `noise` is z of the step (None: no noise term).
    """
    _check_inputs(x, eps, table, step, noise, eps_uncond, clip)
    resolve_backend(backend, x.device)
    return sampler_step_reference(
        x, eps, table, step, noise, eps_uncond=eps_uncond, guidance_scale=guidance_scale, clip=clip
    )

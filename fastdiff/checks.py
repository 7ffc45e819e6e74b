"""Checks around a sampling run: the dtype and device of its inputs and the denoiser's weights up front, finite
values at the end; and the check of an integer argument.

A NaN or inf in a diffusion run never heals (every later step mixes it into the state), and written out it
becomes a black image that looks like a result. So every sampling loop records, on the device and without a host
sync, the first step after which the state held a non-finite value, and raises `NonFiniteError` naming that step
instead of returning the tensor.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastdiff.errors import NonFiniteError


def check_dtype(dtype: Any) -> torch.dtype:
    """`dtype=` of a sampling call: a floating-point torch.dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float16, torch.bfloat16, ...), "
            f"got {dtype!r}"
        )
    return dtype


def check_device(device: torch.device) -> torch.device:
    """A device this torch build can allocate on (ValueError saying which devices exist otherwise)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r}: this torch build has no usable CUDA GPU; use device='cpu' "
            "(or install a CUDA build of torch on a machine with a GPU)"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device={str(device)!r} cannot be used here: {err}") from None
    return device


def _own_model(denoiser: Any) -> torch.nn.Module | None:
    """The fastdiff model behind `denoiser` (also through torch.compile), or None for other denoisers.

    Only our models are checked: a foreign denoiser (a diffusers adapter, say) may cast its inputs itself.
    """
    from fastdiff.models import MLPDenoiser, UNet  # the models import the samplers, which import this module

    target = getattr(denoiser, "_orig_mod", denoiser)
    return target if isinstance(target, (UNet, MLPDenoiser)) else None


def first_weight(module: Any) -> torch.Tensor | None:
    """The first floating-point parameter of an nn.Module (its dtype and device are the model's), else None."""
    if not isinstance(module, torch.nn.Module):
        return None
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def check_denoiser_matches(denoiser: Any, device: torch.device, dtype: torch.dtype, what: str = "x") -> None:
    """The state `what` (on `device`, of `dtype`) must suit a fastdiff model's weights; say how to fix it if not."""
    param = first_weight(_own_model(denoiser))
    if param is None:
        return
    if param.dtype != dtype:
        have, want = (str(d).removeprefix("torch.") for d in (dtype, param.dtype))
        fix = f"x_T.to(torch.{want})" if what == "x_T" else f"dtype=torch.{want}"
        raise TypeError(
            f"{what} is {have} but the model's weights are {want}: pass {fix}, or convert the model with "
            f".to(torch.{have})"
        )
    if param.device != device and not (param.device.type == device.type and device.index is None):
        raise ValueError(
            f"{what} is on {device} but the model's weights are on {param.device}: pass "
            + (f"x_T.to({str(param.device)!r})" if what == "x_T" else f"device={str(param.device)!r}")
            + f", or move the model with .to({str(device)!r})"
        )


def check_denoiser_weights(denoiser: Any) -> None:
    """Once per sampling run, before its first step: a denoiser that holds its own copy of a module's weights (an
    exported graph bound to its `source`) raises `StaleWeightsError` if that module's weights changed since,
    including writes its per-call check cannot see (`param.data.copy_`). Such a denoiser defines
    `_fastdiff_check_weights()`: a private name, so that a model's own `check_weights` is never called by surprise."""
    check = getattr(denoiser, "_fastdiff_check_weights", None)
    if callable(check):
        check()


@contextlib.contextmanager
def denoiser_run(denoiser: Any) -> Iterator[Callable[[], None]]:
    """One sampling run of `denoiser`: `check_denoiser_weights` first, then, until the block ends, a denoiser that
    checks its source's fingerprint on every call (`_fastdiff_run()`, an exported graph bound to `source`) skips
    that check: between two of a loop's calls no user code runs but its callbacks, after which the loop calls the
    yielded `recheck` (the same check as at the start). For digits at batch 1 on onnxruntime the per-call check
    was 27 us of a 2 ms call."""
    check_denoiser_weights(denoiser)
    run = getattr(denoiser, "_fastdiff_run", None)
    if not callable(run):
        yield lambda: None
        return
    with run():
        yield lambda: check_denoiser_weights(denoiser)


class FiniteWatch:
    """The first step after which the state held NaN or inf, recorded on the device (no host sync per step).

    `update(i, x)` after step i; `check(x)` at the end raises `NonFiniteError` if any update saw a non-finite
    value (one host sync). `timesteps` (the model timestep of each step) makes the message name the timestep too.
    """

    def __init__(self, timesteps: torch.Tensor | None = None) -> None:
        self.timesteps = timesteps
        self._first: torch.Tensor | None = None

    def update(self, step: int, x: torch.Tensor) -> None:
        """Record step `step` as the first bad one if x is not finite and no earlier step was."""
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=x.device)
        bad = ~torch.isfinite(x).all()
        self._first.masked_fill_(bad & (self._first < 0), step)

    def check(self, x: torch.Tensor, what: str = "sampling") -> None:
        """Raise NonFiniteError naming the first bad step and the affected samples, if there was one."""
        if self._first is None:
            return
        step = int(self._first)
        if step < 0:
            return
        bad = (~torch.isfinite(x)).flatten(1).any(1) if x.dim() > 1 else ~torch.isfinite(x)
        rows = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
        at = f"step {step}"
        if self.timesteps is not None:
            at += f" (timestep {int(self.timesteps[step])})"
        raise NonFiniteError(
            f"{what} produced NaN or infinite values, first after {at}, in {len(rows)} of {x.shape[0]} samples "
            f"({shown}); nothing was returned. Usual causes: a guidance scale or eta far too large, "
            "a float16 overflow (try float32 or bfloat16), or NaN weights in the model",
            step=step,
        )


def integral(value: object) -> int | None:
    """`value` as an int if it is integral (an int, a numpy integer: `operator.index`, which numpy's bool refuses)
    and not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [minimum, maximum]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:.3g}, got {value!r}")
    return value

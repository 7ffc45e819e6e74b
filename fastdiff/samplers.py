"""DDPM and DDIM samplers compiled to StepTables, and the reference sampling loop that reads them.

A first-order sampler is, per step i, with m the model output (ARCHITECTURE.md, kernels/sampler_step.py):

    x0_hat = a_i * x + b_i * m            (clipped when the sampler clips)
    eps    = p_i * x + q_i * m
    x_prev = c_i * x0_hat + d_i * eps + e_i * x + s_i * z

(a, b, p, q) convert the model's prediction (epsilon, sample or v) to x0 and eps; (c, d, e, s) are the
DDPM posterior or the DDIM update. Rows are computed once in float64 and used in float32 on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.checks import FiniteWatch, check_denoiser_matches, check_device, check_dtype
from fastdiff.kernels.sampler_step import TABLE_COLUMNS, sampler_step
from fastdiff.schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_large")

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class StepTable:
    """One row of coefficients per step (float64, host) plus the model timestep of each step."""

    coeffs: torch.Tensor
    timesteps: torch.Tensor
    clip: float | None
    kind: str
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.coeffs.dtype != torch.float64 or self.coeffs.shape != (
            self.timesteps.numel(),
            len(TABLE_COLUMNS),
        ):
            raise ValueError(f"coeffs must be float64 of shape (num_steps, {len(TABLE_COLUMNS)})")

    def __len__(self) -> int:
        return self.timesteps.numel()

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The float32 coefficient table on `device` (copied once per device, then cached)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.coeffs.to(device=device, dtype=torch.float32)
        return self._on_device[device]

    def noisy_steps(self) -> list[int]:
        """Indices of the steps that draw noise (s != 0), in the order the loop draws it."""
        return torch.nonzero(self.coeffs[:, TABLE_COLUMNS.index("s")]).flatten().tolist()

    def column(self, name: str) -> torch.Tensor:
        """One coefficient column by name (a, b, p, q, c, d, e, s)."""
        return self.coeffs[:, TABLE_COLUMNS.index(name)]


def _prediction_coeffs(abar: np.ndarray, prediction_type: str) -> tuple[np.ndarray, ...]:
    """(a, b, p, q) with x0 = a x + b m and eps = p x + q m at cumulative alpha `abar`."""
    sa, sb = np.sqrt(abar), np.sqrt(1.0 - abar)
    one, zero = np.ones_like(abar), np.zeros_like(abar)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa, zero, one
    if prediction_type == "sample":
        return zero, one, 1.0 / sb, -sa / sb
    return sa, -sb, sb, sa  # v_prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


class Sampler:
    """Common part of the samplers: the schedule, the timesteps, the table and the prediction type."""

    table: StepTable
    prediction_type: str

    @property
    def timesteps(self) -> torch.Tensor:
        """The model timestep of each step, descending."""
        return self.table.timesteps

    @property
    def num_steps(self) -> int:
        """Number of sampling steps (denoiser calls)."""
        return len(self.table)

    def _clip(self, clip_sample: bool, clip_sample_range: float) -> float | None:
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range!r}")
        return float(clip_sample_range) if clip_sample else None


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), any number of steps.

    With fewer steps than the schedule, the betas are respaced as in improved DDPM (Nichol & Dhariwal 2021):
    beta'_i = 1 - abar(t_i) / abar(t_{i+1}). `variance` is `fixed_small` (posterior beta tilde) or `fixed_large`
    (beta). Numbers match diffusers' DDPMScheduler.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int | None = None,
        variance: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        *,
        spacing: str = "leading",
        steps_offset: int = 0,
        clip_sample_range: float = 1.0,
    ):
        _check_choice("variance", variance, VARIANCES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.schedule = schedule
        self.variance = variance
        self.prediction_type = prediction_type
        n = schedule.num_train_timesteps if num_steps is None else num_steps
        ts = schedule.timesteps(n, spacing, steps_offset)
        abar_all = schedule.alphas_cumprod.numpy()
        abar = abar_all[ts.numpy()]
        abar_prev = np.append(abar[1:], 1.0)
        beta = 1.0 - abar / abar_prev
        a, b, p, q = _prediction_coeffs(abar, prediction_type)
        c = np.sqrt(abar_prev) * beta / (1.0 - abar)
        e = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
        if variance == "fixed_small":
            var = np.maximum((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
        else:
            var = beta
        s = np.where(ts.numpy() > 0, np.sqrt(var), 0.0)
        d = np.zeros_like(abar)
        coeffs = torch.from_numpy(np.stack([a, b, p, q, c, d, e, s], axis=1))
        self.table = StepTable(coeffs, ts, self._clip(clip_sample, clip_sample_range), f"ddpm-{variance}")

    def __repr__(self) -> str:
        return f"DDPMSampler(num_steps={self.num_steps}, variance={self.variance!r}, prediction_type={self.prediction_type!r})"


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12) with stochasticity `eta` (0: deterministic, 1: DDPM-like).

    Numbers match diffusers' DDIMScheduler, including its previous timestep t - T // num_steps for every spacing
    and `set_alpha_to_one` for the final step.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        *,
        steps_offset: int = 0,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
    ):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.schedule = schedule
        self.eta = float(eta)
        self.prediction_type = prediction_type
        ts = schedule.timesteps(num_steps, spacing, steps_offset)
        abar_all = schedule.alphas_cumprod.numpy()
        final = 1.0 if set_alpha_to_one else abar_all[0]
        prev_t = ts.numpy() - schedule.num_train_timesteps // num_steps
        abar = abar_all[ts.numpy()]
        self._abar_prev = np.where(prev_t >= 0, abar_all[np.maximum(prev_t, 0)], final)
        a, b, p, q = _prediction_coeffs(abar, prediction_type)
        var = (1.0 - self._abar_prev) / (1.0 - abar) * (1.0 - abar / self._abar_prev)
        std = self.eta * np.sqrt(var)
        if not np.abs(std).max() <= np.finfo(np.float32).max:
            raise ValueError(
                f"eta={eta!r} is too large: the noise scale overflows float32 (eta is normally in [0, 1])"
            )
        c = np.sqrt(self._abar_prev)
        d = np.sqrt(np.maximum(1.0 - self._abar_prev - std**2, 0.0))
        e = np.zeros_like(abar)
        coeffs = torch.from_numpy(np.stack([a, b, p, q, c, d, e, std], axis=1))
        self.table = StepTable(coeffs, ts, self._clip(clip_sample, clip_sample_range), "ddim")

    def __repr__(self) -> str:
        return f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, prediction_type={self.prediction_type!r})"

    def inverse_table(self) -> StepTable:
        """The eta = 0 inversion table: each decode step run backwards, x0 -> x_T.

        Inversion step k goes from the level the decode's step n-1-k lands on to that step's level, calling the
        model at the higher level's timestep (the usual approximation eps(x_t) ~ eps(x_{t-1})).
        """
        abar_all = self.schedule.alphas_cumprod.numpy()
        ts = self.table.timesteps.flip(0)
        abar_from = self._abar_prev[::-1].copy()
        abar_to = abar_all[ts.numpy()]
        a, b, p, q = _prediction_coeffs(abar_from, self.prediction_type)
        zero = np.zeros_like(abar_to)
        coeffs = np.stack([a, b, p, q, np.sqrt(abar_to), np.sqrt(1.0 - abar_to), zero, zero], axis=1)
        return StepTable(torch.from_numpy(coeffs), ts, None, "ddim-inverse")


def sampler_table(sampler: Sampler) -> StepTable:
    """The StepTable of a fastdiff sampler (TypeError for anything else)."""
    if not isinstance(getattr(sampler, "table", None), StepTable):
        raise TypeError(f"sampler must be a DDPMSampler or DDIMSampler, got {type(sampler).__name__}")
    return sampler.table


def randn(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise; a list of generators draws sample j of the batch from generator j."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"generator list has {len(gens)} generators for a batch of {shape[0]}")
    return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in gens])


def infer_device(denoiser: Any, x_T: torch.Tensor | None, device: torch.device | str | None) -> torch.device:
    """Where sampling runs: x_T's device, else `device`, else the denoiser's parameters, else the CPU."""
    if x_T is not None:
        return x_T.device
    if device is not None:
        return torch.device(device)
    if isinstance(denoiser, torch.nn.Module):
        param = next(iter(denoiser.parameters()), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


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


def guidance_conds(
    denoiser: Any, cond: Mapping[str, Any] | None, uncond: Mapping[str, Any] | None, guidance_scale: float
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validate the conditioning and return (cond, uncond); uncond is None when guidance is off."""
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if abs(guidance_scale) > torch.finfo(torch.float32).max:
        raise ValueError(f"guidance_scale={guidance_scale!r} overflows float32")
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


def check_x(name: str, x: torch.Tensor, shape: Sequence[int] | None = None) -> None:
    """A user-given sample tensor: floating point, of `shape` if given, and finite."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A batch shape (batch, *sample_shape) of positive ints."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, *sample_shape) with positive sizes, got {shape}")
    return shape


def check_model_output(out: Any, x: torch.Tensor) -> None:
    """The denoiser must return a tensor shaped like its input."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the denoiser returned {got}, expected a tensor of shape {tuple(x.shape)}")


def callback_info(
    table: StepTable,
    coeffs: torch.Tensor,
    i: int,
    x: torch.Tensor,
    x_next: torch.Tensor,
    out: torch.Tensor,
    out_u: torch.Tensor | None,
    guidance_scale: float,
) -> dict[str, Any]:
    """What a per-step callback receives: step i, its timestep, x after the step, the x0 estimate, the model output."""
    m = out if out_u is None else out_u + guidance_scale * (out - out_u)
    x0 = coeffs[i, 0] * x + coeffs[i, 1] * m
    return {"i": i, "t": int(table.timesteps[i]), "x": x_next, "x0": x0, "model_output": m}


def run_table(
    denoiser: Callable[..., torch.Tensor],
    table: StepTable,
    x: torch.Tensor,
    *,
    start: int = 0,
    generator: Generator = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """The sampling loop, written once: steps `start..` of `table` applied to x (every public sampler uses it).

    Per step: one denoiser call (cond and uncond batched when guiding), then `sampler_step`; noise for a step
    with s != 0 is drawn from `generator` right before that step, so a seed fixes the result.
    `after_step(i, x)` may replace x (inpainting); `callback` receives {"i", "t", "x", "x0", "model_output"}.
    """
    cond, uncond = guidance_conds(denoiser, cond, uncond, guidance_scale)
    kwargs = batch_conds(cond, uncond) if uncond is not None else cond
    coeffs = table.on(x.device)
    ts = table.timesteps.to(x.device)
    s_col = table.column("s")
    batch = x.shape[0]
    watch = FiniteWatch(table.timesteps)
    for i in tqdm(range(start, len(table)), disable=not progress, desc="sampling", leave=False):
        t = ts[i].expand(batch)
        if uncond is None:
            out, out_u = denoiser(x, t, **kwargs), None
        else:
            out, out_u = denoiser(torch.cat([x, x]), torch.cat([t, t]), **kwargs).chunk(2)
        check_model_output(out, x)
        noise = randn(x.shape, generator, x.device, x.dtype) if s_col[i] != 0 else None
        x_next = sampler_step(
            x,
            out,
            coeffs,
            i,
            noise,
            eps_uncond=out_u,
            guidance_scale=guidance_scale,
            clip=table.clip,
            backend=backend,
        )
        if callback is not None:
            a, b = coeffs[i, 0], coeffs[i, 1]
            m = out if out_u is None else out_u + guidance_scale * (out - out_u)
            callback(
                {"i": i, "t": int(table.timesteps[i]), "x": x_next, "x0": a * x + b * m, "model_output": m}
            )
        x = x_next if after_step is None else after_step(i, x_next)
        watch.update(i, x)
    watch.check(x)
    return x


def sample(
    denoiser: Callable[..., torch.Tensor],
    sampler: Sampler,
    shape: Sequence[int],
    *,
    generator: Generator = None,
    x_T: torch.Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Generate a batch of `shape` with `sampler`, starting from x_T (drawn from `generator` if not given).

    `denoiser(x, t, **cond)` returns the model output; with `guidance_scale != 1`, classifier-free guidance
    runs cond and uncond (default: the denoiser's `null_cond(cond)`) as one batched call per step.
    Sampling runs in x_T's dtype when it is given, else in `dtype`. A run whose state becomes NaN or inf raises
    `fastdiff.errors.NonFiniteError` naming the first step after which it was seen.
    """
    table = sampler_table(sampler)
    shape = check_shape(shape)
    dev = check_device(infer_device(denoiser, x_T, device))
    check_dtype(dtype)
    if x_T is not None:
        check_x("x_T", x_T, shape)
        check_denoiser_matches(denoiser, dev, x_T.dtype, "x_T")
        x = x_T.clone()
    else:
        check_denoiser_matches(denoiser, dev, dtype)
        x = randn(shape, generator, dev, dtype)
    with torch.inference_mode():
        return run_table(
            denoiser,
            table,
            x,
            generator=generator,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
            callback=callback,
        )


def ddim_invert(
    denoiser: Callable[..., torch.Tensor],
    sampler: DDIMSampler,
    x0: torch.Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (eta = 0): encode x0 to an x_T that `sample(..., x_T=x_T)` with this sampler decodes to x0."""
    if not isinstance(sampler, DDIMSampler):
        raise TypeError(f"sampler must be a DDIMSampler, got {type(sampler).__name__}")
    if sampler.eta != 0:
        raise ValueError(f"ddim_invert needs a deterministic sampler (eta=0), got eta={sampler.eta}")
    check_x("x0", x0)
    with torch.inference_mode():
        return run_table(
            denoiser,
            sampler.inverse_table(),
            x0.clone(),
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
        )


def _start_step(table: StepTable, strength: float) -> int:
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    return len(table) - max(1, round(strength * len(table)))


def sdedit(
    denoiser: Callable[..., torch.Tensor],
    sampler: Sampler,
    x0: torch.Tensor,
    strength: float,
    *,
    generator: Generator = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise x0 to the level of the last `strength` fraction of steps, then denoise."""
    table = sampler_table(sampler)
    check_x("x0", x0)
    start = _start_step(table, strength)
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    x = sampler.schedule.q_sample(x0, int(table.timesteps[start]), noise)
    with torch.inference_mode():
        return run_table(
            denoiser,
            table,
            x,
            start=start,
            generator=generator,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
            callback=callback,
        )


def inpaint(
    denoiser: Callable[..., torch.Tensor],
    sampler: Sampler,
    x0: torch.Tensor,
    mask: torch.Tensor,
    *,
    generator: Generator = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Inpainting by replacement: `mask` is 1 where new content is generated, 0 where x0 is kept.

    After every step the known region is replaced by x0 noised to the level the step landed on (q_sample with
    fresh noise), and by x0 itself after the last step.
    """
    table = sampler_table(sampler)
    check_x("x0", x0)
    if not isinstance(mask, torch.Tensor):
        raise TypeError("mask must be a tensor")
    try:
        keep = 1.0 - torch.broadcast_to(mask.to(device=x0.device, dtype=x0.dtype), x0.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x0's {tuple(x0.shape)}"
        ) from None
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must contain only 0 (keep x0) and 1 (generate)")
    schedule = sampler.schedule

    def replace_known(i: int, x: torch.Tensor) -> torch.Tensor:
        if i + 1 < len(table):
            known = schedule.q_sample(
                x0, int(table.timesteps[i + 1]), randn(x0.shape, generator, x0.device, x0.dtype)
            )
        else:
            known = x0
        return keep * known + (1.0 - keep) * x

    x = randn(x0.shape, generator, x0.device, x0.dtype)
    with torch.inference_mode():
        return run_table(
            denoiser,
            table,
            x,
            generator=generator,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
            callback=callback,
            after_step=replace_known,
        )

"""The sampling loop, written once (`run_table`), and what is built on it: sample, ddim_invert, sdedit, inpaint.

Per row i of a StepTable: one denoiser call on k_in*x (cond and uncond batched when guiding), the model output
split into m and the variance channels when the table has learned variance, then `fastdiff.kernels.sampler_step`,
which computes x_prev and rotates the sampler state (history, xs) allocated here, zeroed, once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from fastdiff.checks import (
    FiniteWatch,
    check_denoiser_matches,
    check_device,
    check_dtype,
    denoiser_run,
)
from fastdiff.guidance import batch_conds, guidance_conds
from fastdiff.kernels.backend import memory_format
from fastdiff.kernels.sampler_step import sampler_step
from fastdiff.table import COLUMN, StepTable, sampler_table, table_row_kwargs

if TYPE_CHECKING:
    from fastdiff.samplers.base import Sampler

Generator = torch.Generator | Sequence[torch.Generator] | None


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


def check_model_output(out: Any, x: torch.Tensor, learned_variance: bool = False) -> None:
    """The denoiser must return a tensor shaped like its input, or with twice its channels (model output and
    variance); the latter only with learned variance when `learned_variance` is set."""
    two_c = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if x.dim() > 1 else None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if got is not None and (got == two_c or (got == tuple(x.shape) and not learned_variance)):
        return
    expected = f"{two_c} (model output and variance channels)" if learned_variance else f"{tuple(x.shape)}"
    raise ValueError(
        f"the denoiser returned {got or type(out).__name__}, expected a tensor of shape {expected}"
    )


def model_outputs(
    denoise: Callable[..., torch.Tensor],
    table: StepTable,
    x_in: torch.Tensor,
    t: torch.Tensor,
    kwargs: Mapping[str, Any],
    cfg: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One denoiser call on the model input (both guidance branches batched): (m, m_uncond, variance).

    A model with learned variance returns 2C channels: the first C are m, the rest the variance channels (taken
    from the conditional branch), which a table with learned variance reads and any other table ignores (so a
    `UNetConfig(learn_sigma=True)` model samples with DDIM too).
    """
    learned = table.learned_variance is not None
    if cfg:
        # one timestep for the batch stays a stride-0 view, so models embed it once (`timestep_rows`)
        t2 = t[:1].expand(2 * t.shape[0]) if t.shape[0] == 1 or t.stride(0) == 0 else torch.cat([t, t])
        out, out_u = denoise(torch.cat([x_in, x_in]), t2, **kwargs).chunk(2)
    else:
        out, out_u = denoise(x_in, t, **kwargs), None
    check_model_output(out, x_in, learned)
    channels = x_in.shape[1] if x_in.dim() > 1 else None
    if channels is None or out.shape[1] == channels:
        return out, out_u, None
    m, variance = out.split(channels, dim=1)
    return m, None if out_u is None else out_u[:, :channels], variance if learned else None


def callback_info(
    table: StepTable,
    coeffs: torch.Tensor,
    i: int,
    x: torch.Tensor,
    x_next: torch.Tensor,
    m: torch.Tensor,
    m_uncond: torch.Tensor | None,
    guidance_scale: float,
) -> dict[str, Any]:
    """What a per-step callback receives: row i, its timestep, x after the step, the x0 estimate (before clipping),
    the model output after guidance."""
    if m_uncond is not None:
        m = m_uncond + guidance_scale * (m - m_uncond)
    x0 = coeffs[i, COLUMN["a"]] * x + coeffs[i, COLUMN["b"]] * m
    return {"i": i, "t": table.timesteps[i].item(), "x": x_next, "x0": x0, "model_output": m}


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
    """The sampling loop, written once: rows `start..` of `table` applied to the state x (every public sampler
    uses it).

    Per row: one denoiser call on k_in*x (cond and uncond batched when guiding), then `sampler_step`, which also
    rotates the history and xs buffers (allocated here, zeroed). Noise for a row with s != 0 is drawn from
    `generator` right before that row, so a seed fixes the result. `after_step(i, x)` may replace x (inpainting);
    `callback` receives {"i", "t", "x", "x0", "model_output"}.
    """
    if start != 0 and table.multistep:
        raise ValueError(
            f"start={start}: a {table.kind} table reads history from earlier rows, start at row 0"
        )
    with denoiser_run(denoiser) as recheck:
        cond, uncond = guidance_conds(denoiser, cond, uncond, guidance_scale)
        kwargs = batch_conds(cond, uncond) if uncond is not None else cond
        coeffs = table.on(x.device)
        ts = table.timesteps.to(x.device)
        history, xs = table.new_state(x.shape, x.device, x.dtype, memory_format(x))
        noisy = set(table.noisy_steps())
        scales_input = table.scales_input
        batch = x.shape[0]
        watch = FiniteWatch(table.timesteps)
        for i in tqdm(range(start, len(table)), disable=not progress, desc="sampling", leave=False):
            t = ts[i].expand(batch)
            x_in = coeffs[i, COLUMN["k_in"]] * x if scales_input else x
            m, m_u, variance = model_outputs(denoiser, table, x_in, t, kwargs, uncond is not None)
            noise = randn(x.shape, generator, x.device, x.dtype) if i in noisy else None
            x_next = sampler_step(
                x,
                m,
                coeffs,
                i,
                noise,
                eps_uncond=m_u,
                guidance_scale=guidance_scale,
                history=history,
                xs=xs,
                variance=variance,
                backend=backend,
                **table_row_kwargs(table),
            )
            if callback is not None:
                callback(callback_info(table, coeffs, i, x, x_next, m, m_u, guidance_scale))
            x = x_next if after_step is None else after_step(i, x_next)
            if callback is not None or after_step is not None:
                recheck()  # user code ran: the per-call check this run skips
            watch.update(i, x)
        watch.check(x)
        return x


def initial_state(table: StepTable, x_T: torch.Tensor) -> torch.Tensor:
    """The loop's starting state from standard-normal x_T: init_sigma * x_T (diffusers' `init_noise_sigma`, which
    its pipelines apply to given latents too); a copy of x_T when init_sigma is 1."""
    return x_T.clone() if table.init_sigma == 1.0 else table.init_sigma * x_T


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
    """Generate a batch of `shape` with `sampler`, starting from x_T (drawn from `generator` if not given; the
    table's `init_sigma` scales it, given or drawn).

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
    else:
        check_denoiser_matches(denoiser, dev, dtype)
        x_T = randn(shape, generator, dev, dtype)
    with torch.inference_mode():
        return run_table(
            denoiser,
            table,
            initial_state(table, x_T),
            generator=generator,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
            callback=callback,
        )


def ddim_invert(
    denoiser: Callable[..., torch.Tensor],
    sampler: Sampler,
    x0: torch.Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (eta = 0): encode x0 to an x_T that `sample(..., x_T=x_T)` with this sampler decodes to x0."""
    if not callable(getattr(sampler, "inverse_table", None)):
        raise TypeError(f"sampler must be a DDIMSampler, got {type(sampler).__name__}")
    table = sampler.inverse_table()
    check_x("x0", x0)
    with torch.inference_mode():
        return run_table(
            denoiser,
            table,
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
    """SDEdit (Meng et al. 2022): noise x0 to the level of the last `strength` fraction of steps, then denoise.

    Needs a sampler whose rows read nothing carried from earlier rows (DDPM, DDIM): ValueError otherwise.
    """
    table = sampler_table(sampler)
    check_x("x0", x0)
    start = _start_step(table, strength)
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    x = sampler.noised(x0, start, noise)
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
    fresh noise), and by x0 itself after the last step. Needs a sampler whose rows read nothing carried from
    earlier rows (DDPM, DDIM): ValueError otherwise.
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
    sampler.check_noisable()

    def replace_known(i: int, x: torch.Tensor) -> torch.Tensor:
        if i + 1 < len(table):
            known = sampler.noised(x0, i + 1, randn(x0.shape, generator, x0.device, x0.dtype))
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

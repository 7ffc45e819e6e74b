"""Fused per-step sampler update: one row of a StepTable (fastdiff.table) applied to the sample.

The row math (TABLE_COLUMNS, `fastdiff.table.apply_row`): with m the model output after classifier-free guidance,

    x0 = a*x + b*m (clipped or dynamically thresholded)      eps = p*x + q*m
    xc = xc_x*x + xc_s*xs + xc_0*x0 + xc_1*h1 + xc_2*h2 + xc_3*h3          (x when there is no xs)
    x_prev = c*x0 + d*eps + e*xc + f1*h1 + f2*h2 + f3*h3 + s*sigma_v*z

then the history rotates (h3 <- h2 <- h1 <- x0 or eps) and xs <- xc. `sampler_step_reference` is that reference.

One Triton launch per step does all of it: it reads every input element once (x, m, the unconditional m, z, the
variance channels, each history slot, xs), writes x_prev once and updates the history and xs in place (float32
math whatever the storage dtype). Columns of buffers a call does not pass are not read (constexpr switches), so a
DDIM row costs what it cost with the 8-column table. It loads the step index and then the table row from device
memory, and the guidance scale too when it is a tensor, so a captured CUDA graph can replay the same launch every
step with a device-side counter and no host sync. The variance channels of a 2C model output are read in place
(a per-sample batch stride), not copied.

Dynamic thresholding is the one part outside the launch: its per-sample scale s = clamp(quantile(|x0|, ratio), 1,
max) needs every element of a sample before any can be clamped, so the wrapper computes s with a small torch
reduction (x0 from the row, then `torch.quantile`) and the kernel reads it per sample.
"""

from __future__ import annotations

import torch

from fastdiff.kernels.backend import check_backend, decomposing, eager_call, memory_format, resolve_backend
from fastdiff.table import COLUMN, HISTORY_KINDS, LEARNED_VARIANCES, TABLE_COLUMNS, apply_row, threshold_scale


def _check_inputs(x, eps, table, step, noise, eps_uncond, clip, guidance_scale=1.0, out=None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    for name, t in (("eps", eps), ("noise", noise), ("eps_uncond", eps_uncond), ("out", out)):
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
            raise ValueError(
                f"step must be an int or a 0-d integer tensor, got {step.dtype} of shape {tuple(step.shape)}"
            )
        if step.device not in (x.device, torch.device("cpu")):
            raise ValueError(f"step is on {step.device} but x is on {x.device}")
        # Reading a host tensor's value is free, a device tensor's would sync (the kernel guards those itself);
        # under torch.compile the value is unknown at trace time.
        if (
            step.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not 0 <= int(step) < table.shape[0]
        ):
            raise ValueError(f"step {int(step)} is out of range for a table of {table.shape[0]} steps")
    elif not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < table.shape[0]:
        raise ValueError(f"step must be an int in [0, {table.shape[0]}), got {step!r}")
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.dim() != 0 or not guidance_scale.is_floating_point():
            raise ValueError(
                "guidance_scale must be a number or a 0-d floating-point tensor, "
                f"got {guidance_scale.dtype} of shape {tuple(guidance_scale.shape)}"
            )
        if guidance_scale.device not in (x.device, torch.device("cpu")):
            raise ValueError(f"guidance_scale is on {guidance_scale.device} but x is on {x.device}")
    elif not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
        raise TypeError(
            f"guidance_scale must be a number or a 0-d tensor, got {type(guidance_scale).__name__}"
        )
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or a positive number, got {clip!r}")


def _check_state(x, history, history_kind, xs, variance, learned_variance, threshold, clip) -> None:
    """The v2 buffers: history (slots, *x.shape), xs and the variance channels like x."""
    if history is not None:
        if not isinstance(history, torch.Tensor):
            raise TypeError(f"history must be a tensor, got {type(history).__name__}")
        if (
            history.dim() != x.dim() + 1
            or tuple(history.shape[1:]) != tuple(x.shape)
            or not 1 <= len(history) <= 3
        ):
            raise ValueError(
                f"history must have shape (slots in 1..3, *x.shape) = (k, {', '.join(map(str, x.shape))}), "
                f"got {tuple(history.shape)}"
            )
        if history_kind not in HISTORY_KINDS:
            raise ValueError(
                f"history_kind must be one of {HISTORY_KINDS} with history=, got {history_kind!r}"
            )
    for name, t in (("history", history), ("xs", xs), ("variance", variance)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if name != "history" and t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    if variance is not None and learned_variance not in LEARNED_VARIANCES:
        raise ValueError(
            f"learned_variance must be one of {LEARNED_VARIANCES} with variance=, got {learned_variance!r}"
        )
    if threshold is not None:
        if clip is not None:
            raise ValueError("pass clip= or threshold=, not both")
        ratio, top = threshold
        if not 0 <= ratio <= 1 or not top > 0:
            raise ValueError(f"threshold must be (ratio in [0, 1], max > 0), got {threshold!r}")


def _row(table: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    # A tensor step is gathered, not turned into a Python number: no host sync, and traceable by torch.compile.
    return table[step] if isinstance(step, int) else table.index_select(0, step.reshape(1).long())[0]


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
    threshold: tuple[float, float] | None = None,
    scale: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    history_kind: str | None = None,
    xs: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    learned_variance: str | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of `sampler_step` (`fastdiff.table.apply_row` on row `step`): returns x_prev in x's
    dtype and, like the kernel, rotates `history` and writes `xs` in place."""
    out, new_history, new_xs = apply_row(
        _row(table, step),
        x,
        eps,
        m_uncond=eps_uncond,
        guidance_scale=guidance_scale,
        noise=noise,
        variance=variance,
        learned_variance=learned_variance,
        history=history,
        history_kind=history_kind,
        xs=xs,
        clip=clip,
        threshold=threshold,
        scale=scale,
    )
    if history is not None:
        history.copy_(new_history)
    if xs is not None:
        xs.copy_(new_xs)
    return out


def _dense_state(t: torch.Tensor | None, fmt: torch.memory_format, slots: bool) -> torch.Tensor | None:
    """`t` when the kernel can update it in place (dense in `fmt`; history: each slot dense, slots one after the
    other), else a dense copy in that layout, which the caller copies back after the launch."""
    if t is None:
        return None
    sample = t[0] if slots else t
    if sample.is_contiguous(memory_format=fmt) and (not slots or t.stride(0) == sample.numel()):
        return t
    shape = (t.shape[0] * t.shape[1], *t.shape[2:]) if slots else tuple(t.shape)
    work = torch.empty(shape, device=t.device, dtype=t.dtype, memory_format=fmt)
    return work.view(t.shape).copy_(t)


def _launch_with_state(
    out,
    x,
    eps,
    table,
    step,
    step_tensor,
    noise,
    eps_uncond,
    guidance_scale,
    guidance_tensor,
    clip,
    history,
    xs,
    variance,
    scale,
    history_kind,
    learned_variance,
) -> None:
    """The launch, with the state buffers brought to out's layout when they are not in it (and copied back)."""
    from fastdiff.kernels.sampler_step_triton import sampler_step_triton  # Triton loads on first use

    fmt = memory_format(out)
    h_work, xs_work = _dense_state(history, fmt, True), _dense_state(xs, fmt, False)
    sampler_step_triton(
        out,
        x,
        eps,
        table,
        step,
        step_tensor,
        noise,
        eps_uncond,
        guidance_scale,
        guidance_tensor,
        clip,
        h_work,
        xs_work,
        variance,
        scale,
        history_kind,
        learned_variance,
    )
    for state, work in ((history, h_work), (xs, xs_work)):
        if work is not state:
            state.copy_(work)


def _reference_from_op(
    x,
    eps,
    table,
    step,
    step_tensor,
    noise,
    eps_uncond,
    guidance_scale,
    guidance_tensor,
    clip,
    history,
    xs,
    variance,
    scale,
    history_kind,
    learned_variance,
):
    return sampler_step_reference(
        x,
        eps,
        table,
        step if step_tensor is None else step_tensor,
        noise,
        eps_uncond=eps_uncond,
        guidance_scale=guidance_scale if guidance_tensor is None else guidance_tensor,
        clip=clip,
        scale=scale,
        history=history,
        history_kind=history_kind or None,
        xs=xs,
        variance=variance,
        learned_variance=learned_variance or None,
    )


# The custom ops take the step and the guidance scale twice, as a host number and as an optional device tensor,
# because a schema argument has one type; the public function splits them. The v2 buffers come last, with
# defaults, so that the v1 call (eleven arguments) keeps its meaning. `scale` is dynamic thresholding's per-sample
# scale, computed by a torch reduction before the op. One argument list serves both ops: `sampler_step` returns a
# new tensor, `sampler_step_out` writes into `out` (an op's output cannot alias an input).
_OP_ARGS = (
    "Tensor x, Tensor eps, Tensor table, SymInt step, Tensor? step_tensor, Tensor? noise, Tensor? eps_uncond, "
    "float guidance_scale, Tensor? guidance_tensor, float? clip, str backend, Tensor(h!)? history=None, "
    'Tensor(s!)? xs=None, Tensor? variance=None, Tensor? scale=None, str history_kind="", str learned_variance=""'
)


def _run_op(
    out: torch.Tensor | None,
    x: torch.Tensor,
    eps: torch.Tensor,
    table: torch.Tensor,
    step: int,
    step_tensor: torch.Tensor | None,
    noise: torch.Tensor | None,
    eps_uncond: torch.Tensor | None,
    guidance_scale: float,
    guidance_tensor: torch.Tensor | None,
    clip: float | None,
    backend: str,
    history: torch.Tensor | None = None,
    xs: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    history_kind: str = "",
    learned_variance: str = "",
) -> torch.Tensor:
    """Both ops' body: the step written into `out`, or into a new tensor in x's layout when `out` is None."""
    args = (x, eps, table, step, step_tensor, noise, eps_uncond, guidance_scale, guidance_tensor, clip)
    state = (history, xs, variance, scale, history_kind, learned_variance)
    if resolve_backend(backend, x.device) == "triton":
        fmt = memory_format(x if out is None else out)
        dense = out is not None and out.is_contiguous(memory_format=fmt)
        target = out if dense else torch.empty_like(x if out is None else out, memory_format=fmt)
        _launch_with_state(target, *args, *state)
        if out is None or dense:
            return target
        return out.copy_(target)
    ref = _reference_from_op(*args, *state)
    return ref.contiguous(memory_format=memory_format(x)) if out is None else out.copy_(ref)


@torch.library.custom_op(
    "fastdiff::sampler_step", mutates_args=("history", "xs"), schema=f"({_OP_ARGS}) -> Tensor"
)
def _sampler_step_op(*args):
    return _run_op(None, *args)


@_sampler_step_op.register_fake
def _(x, *rest):
    return torch.empty_like(x, memory_format=memory_format(x))


@torch.library.custom_op(
    "fastdiff::sampler_step_out",
    mutates_args=("out", "history", "xs"),
    schema=f"(Tensor(o!) out, {_OP_ARGS}) -> ()",
)
def _sampler_step_out_op(out, *args):
    _run_op(out, *args)


@_sampler_step_out_op.register_fake
def _(out, *rest):
    return None


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
    threshold: tuple[float, float] | None = None,
    history: torch.Tensor | None = None,
    history_kind: str | None = None,
    xs: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    learned_variance: str | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One sampler step x_t -> x_prev reading row `step` of `table` (float32, TABLE_COLUMNS, on x's device).

    `eps` is the model output m (eps, x0, v or flow velocity: the row converts it); with `eps_uncond`,
    classifier-free guidance `u + w * (eps - u)` is applied first (`guidance_scale` is ignored without it).
    `noise` is z of the step (None: no noise term). `clip` clamps x0; `threshold` = (ratio, max) thresholds it
    dynamically per sample (diffusers' `_threshold_sample`; its per-sample quantile is a torch reduction run before
    the fused update). `history` (slots, *x.shape), newest first, holding `history_kind` ("x0" or "eps"), is
    rotated in place; `xs` (the corrector's state) is overwritten with xc; `variance` is the model's variance
    channels (`learned_variance` "learned" or "learned_range"). Columns of buffers not given are not read.
    `step` and `guidance_scale` may be 0-d tensors on x's device, read by the kernel without a host sync; a
    device-side step outside the table makes the Triton result all NaN.
    Returns a new tensor in x's layout, or writes into `out` (which may be `x` itself) and returns it.
    """
    _check_inputs(x, eps, table, step, noise, eps_uncond, clip, guidance_scale, out)
    _check_state(x, history, history_kind, xs, variance, learned_variance, threshold, clip)
    if history is None:
        history_kind = None
    if variance is None:
        learned_variance = None
    scale = None
    if threshold is not None:
        # Dynamic thresholding needs each sample's quantile of |x0| before any x0 can be clamped: a small torch
        # reduction here, the rest of the update stays one launch.
        m = eps if eps_uncond is None else eps_uncond + guidance_scale * (eps - eps_uncond)
        row = _row(table, step)
        x0 = row[COLUMN["a"]] * x.float() + row[COLUMN["b"]] * m.float()
        scale = threshold_scale(x0, *threshold)
    if decomposing():
        check_backend(backend)
        ref = sampler_step_reference(
            x,
            eps,
            table,
            step,
            noise,
            eps_uncond=eps_uncond,
            guidance_scale=guidance_scale,
            clip=clip,
            scale=scale,
            history=history,
            history_kind=history_kind,
            xs=xs,
            variance=variance,
            learned_variance=learned_variance,
        )
        return ref if out is None else out.copy_(ref)
    resolve_backend(backend, x.device)
    if isinstance(step, torch.Tensor):
        # A host-side step for a device tensor is read here (free); a kernel cannot dereference host memory.
        step_index, step_tensor = (int(step), None) if step.device != x.device else (0, step)
    else:
        step_index, step_tensor = step, None
    if isinstance(guidance_scale, torch.Tensor):
        w, w_tensor = (
            (float(guidance_scale), None) if guidance_scale.device != x.device else (1.0, guidance_scale)
        )
    else:
        w, w_tensor = float(guidance_scale), None
    clip = None if clip is None else float(clip)
    if x.numel() == 0:
        return torch.empty_like(x) if out is None else out
    args = (x, eps, table, step_index, step_tensor, noise, eps_uncond, w, w_tensor, clip, backend)
    v2 = (history, xs, variance, scale, history_kind or "", learned_variance or "")
    if eager_call(x, eps, table, step_tensor, noise, eps_uncond, w_tensor, out, history, xs, variance, scale):
        return _run_op(out, *args, *v2)
    if out is None:
        return _sampler_step_op(*args, *v2)
    _sampler_step_out_op(out, *args, *v2)
    return out

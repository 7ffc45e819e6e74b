"""What every sampler has: a schedule, a StepTable, its timesteps and the model's prediction type."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastdiff.checks import integral
from fastdiff.schedule import NoiseSchedule
from fastdiff.table import StepTable

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def prediction_coeffs(abar: np.ndarray, prediction_type: str) -> tuple[np.ndarray, ...]:
    """(a, b, p, q) with x0 = a x + b m and eps = p x + q m at cumulative alpha `abar` (the state is alpha-space x)."""
    if prediction_type == "epsilon" and (abar == 0).any():
        raise ValueError(
            "prediction_type='epsilon' cannot reach the zero-SNR timestep of a rescale_betas_zero_snr schedule "
            "(x0 = x / sqrt(alphas_cumprod) = x / 0; diffusers returns NaN there): use v_prediction, as the "
            "zero-SNR paper does, or timesteps that skip the last one"
        )
    sa, sb = np.sqrt(abar), np.sqrt(1.0 - abar)
    one, zero = np.ones_like(abar), np.zeros_like(abar)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa, zero, one
    if prediction_type == "sample":
        return zero, one, 1.0 / sb, -sa / sb
    return sa, -sb, sb, sa  # v_prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def clip_value(clip_sample: bool, clip_sample_range: float) -> float | None:
    """The table's `clip` for diffusers' (clip_sample, clip_sample_range)."""
    if clip_sample and not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range!r}")
    return float(clip_sample_range) if clip_sample else None


def threshold_value(
    thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float
) -> tuple[float, float] | None:
    """The table's `threshold` for diffusers' (thresholding, dynamic_thresholding_ratio, sample_max_value)."""
    if not thresholding:
        return None
    if not 0 < dynamic_thresholding_ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
    if not sample_max_value > 0:
        raise ValueError(f"sample_max_value must be positive, got {sample_max_value!r}")
    return float(dynamic_thresholding_ratio), float(sample_max_value)


def solver_num_steps(
    schedule: NoiseSchedule, num_steps: int | None, given: Sequence | None, given_name: str, begin_index: int
) -> int:
    """A multistep solver's step count: `num_steps`, or the length of the given timesteps / sigmas (both, if
    given, must agree), in [1, num_train_timesteps]; `begin_index` (where an img2img loop starts) must lie in it."""
    if given is not None:
        if num_steps is not None and num_steps != len(given):
            raise ValueError(f"pass num_steps or {given_name} (or both, agreeing), not different lengths")
        num_steps = len(given)
    T = schedule.num_train_timesteps
    steps = integral(num_steps)
    if steps is None or not 1 <= steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    begin = integral(begin_index)
    if begin is None or not 0 <= begin < steps:
        raise ValueError(f"begin_index must be an int in [0, {steps}), got {begin_index!r}")
    return steps


def sampler_timesteps(
    schedule: NoiseSchedule,
    num_steps: int | None,
    spacing: str,
    steps_offset: int,
    timesteps: Sequence[int] | torch.Tensor | None,
) -> torch.Tensor:
    """The timesteps of a discrete sampler: `num_steps` spaced by `spacing`, or the given strictly descending
    `timesteps` (diffusers' `set_timesteps(timesteps=[...])`; then `num_steps` must be None or their count)."""
    if timesteps is None:
        return schedule.timesteps(
            schedule.num_train_timesteps if num_steps is None else num_steps, spacing, steps_offset
        )
    ts = torch.as_tensor(timesteps)
    T = schedule.num_train_timesteps
    if ts.dim() != 1 or ts.numel() < 1 or ts.is_floating_point() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps must be a non-empty 1-d sequence of ints, got {timesteps!r}")
    ts = ts.long().cpu()
    if (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timesteps must lie in [0, {T}), got {ts.tolist()}")
    if num_steps is not None and num_steps != ts.numel():
        raise ValueError(f"num_steps={num_steps!r} does not match the {ts.numel()} timesteps given")
    return ts


class Sampler:
    """Common part of the samplers: the schedule, the timesteps, the table and the prediction type.

    A subclass sets `schedule`, `prediction_type` and `table` in its constructor.
    """

    schedule: NoiseSchedule
    table: StepTable
    prediction_type: str

    @property
    def timesteps(self) -> torch.Tensor:
        """The model timestep of each row, in sampling order."""
        return self.table.timesteps

    @property
    def num_steps(self) -> int:
        """Number of sampling steps (denoiser calls)."""
        return len(self.table)

    def inverse_table(self) -> StepTable:
        """The table running this sampler backwards (x0 -> x_T); only deterministic DDIM has one."""
        raise TypeError(f"inversion needs a DDIMSampler, got {type(self).__name__}")

    def noised(self, x0: torch.Tensor, row: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 brought to the state row `row` starts from (SDEdit, inpainting): q_sample at its timestep.

        Only for tables whose state is the alpha-space x of the schedule and whose rows read nothing carried from
        earlier rows; ValueError otherwise.
        """
        self.check_noisable()
        return self.schedule.q_sample(x0, int(self.table.timesteps[row]), noise)

    def check_noisable(self) -> None:
        """ValueError unless `noised` applies: the state is the schedule's x_t and no row reads earlier rows."""
        table = self.table
        if table.multistep or table.scales_input or table.init_sigma != 1.0:
            raise ValueError(
                f"{type(self).__name__} ({table.kind}) cannot start from a noised image: its rows read history "
                "or its state is not the schedule's x_t; use DDIM or DDPM for SDEdit and inpainting"
            )

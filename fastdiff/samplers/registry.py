"""The sampler registry: one name per sampler (CLI, distributed sampling, benchmarks) and one builder per diffusers
scheduler class (`fastdiff.from_diffusers_scheduler`, the drop-in schedulers). Each sampler family registers
itself from its own module; `fastdiff.samplers` imports them all."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastdiff.errors import OptionError
from fastdiff.samplers.base import Sampler
from fastdiff.schedule import NoiseSchedule


@dataclass(frozen=True)
class SamplerEntry:
    """A registered sampler: its class and the options its name implies (e.g. dpmpp-2m: solver_order=2)."""

    name: str
    cls: type[Sampler]
    defaults: dict[str, Any] = field(default_factory=dict)

    def accepts(self, option: str) -> bool:
        """Whether the sampler's constructor takes keyword `option`."""
        return option in inspect.signature(self.cls.__init__).parameters

    def build(self, schedule: NoiseSchedule, num_steps: int, **options: Any) -> Sampler:
        """The sampler at `num_steps` steps; `options` override the registered defaults."""
        unknown = sorted(o for o in options if not self.accepts(o))
        if unknown:
            raise OptionError(f"sampler {self.name!r} takes no option(s) {unknown}", option=unknown[0])
        return self.cls(schedule, num_steps, **{**self.defaults, **options})


SAMPLERS: dict[str, SamplerEntry] = {}
# Options whose value here is what a sampler without the option does (no added noise; an epsilon model).
NEUTRAL_OPTIONS: dict[str, Any] = {"eta": 0.0, "prediction_type": "epsilon"}
DIFFUSERS_BUILDERS: dict[str, Callable[..., Sampler]] = {}


def register(name: str, cls: type[Sampler], **defaults: Any) -> SamplerEntry:
    """Register `cls` (a Sampler taking (schedule, num_steps, **options)) under `name` with default options."""
    if name in SAMPLERS:
        raise ValueError(f"sampler name {name!r} is already registered")
    entry = SamplerEntry(name, cls, dict(defaults))
    SAMPLERS[name] = entry
    return entry


def register_diffusers(name: str, fn: Callable[..., Sampler]) -> None:
    """Register `fn(scheduler_or_config, num_steps, **step_kwargs) -> Sampler` for diffusers scheduler class `name`."""
    if name in DIFFUSERS_BUILDERS:
        raise ValueError(f"a builder for {name!r} is already registered")
    DIFFUSERS_BUILDERS[name] = fn


def build_sampler(name: str, schedule: NoiseSchedule, num_steps: int, **options: Any) -> Sampler:
    """The registered sampler `name` at `num_steps` steps on `schedule`, with its registered defaults (DDPM clips
    x0 to [-1, 1] as in the paper, DDIM does not) overridden by `options`.

    ValueError for an unknown name; `OptionError` (a ValueError naming the option) for more steps than the schedule
    has or an option the sampler does not take.
    An option at its neutral value (`NEUTRAL_OPTIONS`: eta=0, prediction_type="epsilon") is what a sampler without
    it does anyway, so it is dropped instead: callers such as the CLI pass them for every sampler.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    if num_steps > schedule.num_train_timesteps:
        raise OptionError(
            f"steps {num_steps} is larger than the model's schedule ({schedule.num_train_timesteps} steps)",
            option="num_steps",
        )
    entry = SAMPLERS[name]
    unknown = object()
    options = {
        key: value
        for key, value in options.items()
        if entry.accepts(key) or NEUTRAL_OPTIONS.get(key, unknown) != value
    }
    return entry.build(schedule, num_steps, **options)

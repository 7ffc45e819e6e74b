"""The sampler registry: one name per sampler (CLI, distributed sampling, benchmarks) and one builder per diffusers
scheduler class (`fastdiff.from_diffusers_scheduler`, the drop-in schedulers). Each sampler family registers
itself from its own module; `fastdiff.samplers` imports them all."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
            raise ValueError(f"sampler {self.name!r} takes no option(s) {unknown}")
        return self.cls(schedule, num_steps, **{**self.defaults, **options})


SAMPLERS: dict[str, SamplerEntry] = {}
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
    """The registered sampler `name` at `num_steps` steps on `schedule` (ValueError for an unknown name)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name].build(schedule, num_steps, **options)

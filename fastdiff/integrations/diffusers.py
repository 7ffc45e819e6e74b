"""Adapters between fastdiff and diffusers. diffusers itself is imported only inside the functions that need it."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from fastdiff.errors import FastdiffError, missing_extra
from fastdiff.kernels.sampler_step import sampler_step
from fastdiff.samplers import DDIMSampler, DDPMSampler, Sampler, StepTable
from fastdiff.schedule import NoiseSchedule


def _sampler_kwargs(config: Any) -> dict[str, Any]:
    if config.get("thresholding", False):
        raise ValueError(
            "schedulers with thresholding=True are not supported (dynamic thresholding is not a table)"
        )
    return {
        "prediction_type": config.get("prediction_type", "epsilon"),
        "clip_sample": bool(config.get("clip_sample", True)),
        "clip_sample_range": float(config.get("clip_sample_range", 1.0)),
        "spacing": config.get("timestep_spacing", "leading"),
        "steps_offset": int(config.get("steps_offset", 0)),
    }


def from_diffusers_scheduler(scheduler: Any, num_steps: int, *, eta: float = 0.0) -> Sampler:
    """The fastdiff sampler with the numbers of a diffusers DDPMScheduler or DDIMScheduler at `num_steps` steps.

    `eta` is DDIM's stochasticity (diffusers passes it to `step()`, so it is not part of the scheduler's config).
    """
    # Subclasses count (FastDDIMScheduler / FastDDPMScheduler are DDIMScheduler / DDPMScheduler).
    bases = {cls.__name__ for cls in type(scheduler).__mro__} & {"DDPMScheduler", "DDIMScheduler"}
    config = getattr(scheduler, "config", None)
    if config is None or len(bases) != 1:
        raise TypeError(
            f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}"
        )
    (name,) = bases
    schedule = NoiseSchedule.from_diffusers(scheduler)
    kwargs = _sampler_kwargs(config)
    if name == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type {variance!r} is not supported; use fixed_small or fixed_large")
        return DDPMSampler(schedule, num_steps, variance=variance, **kwargs)
    return DDIMSampler(
        schedule, num_steps, eta=eta, set_alpha_to_one=bool(config.get("set_alpha_to_one", True)), **kwargs
    )


class _TableScheduler:
    """What FastDDIMScheduler and FastDDPMScheduler add to their diffusers base: a StepTable per eta for the
    current timesteps, and `sampler_step` in place of diffusers' per-step arithmetic."""

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        if getattr(self, "custom_timesteps", False):
            raise ValueError(
                f"{type(self).__name__} takes num_inference_steps, not custom timesteps; use diffusers' scheduler"
            )
        self._tables: dict[float, StepTable] = {}
        self._table(0.0)  # an unsupported config or a timestep mismatch fails here, not at the first step

    def _table(self, eta: float) -> StepTable:
        tables = self.__dict__.setdefault("_tables", {})
        if eta not in tables:
            table = from_diffusers_scheduler(self, self.num_inference_steps, eta=eta).table
            if not torch.equal(table.timesteps, self.timesteps.cpu()):
                raise FastdiffError(
                    f"{type(self).__name__}: the StepTable's timesteps differ from diffusers' "
                    f"({table.timesteps.tolist()} vs {self.timesteps.tolist()})"
                )
            if not tables:
                # The timesteps tensor the table was checked against, and each timestep's row.
                self._checked = self.timesteps
                self._rows = {t: i for i, t in enumerate(table.timesteps.tolist())}
            tables[eta] = table
        return tables[eta]

    def _row(self, timestep: int | torch.Tensor) -> int | None:
        """The table row of `timestep`, or None when it is not one of the table's timesteps."""
        ts = self.__dict__.get("_checked")
        if ts is None:
            return None
        # Pipelines iterate over `scheduler.timesteps`: a 0-d view into it gives its row from its storage offset,
        # with no device sync (reading a CUDA timestep's value would be one per step).
        if (
            isinstance(timestep, torch.Tensor)
            and timestep.dim() == 0
            and timestep.device == ts.device
            and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
        ):
            row = (timestep.storage_offset() - ts.storage_offset()) // ts.stride(0)
            if 0 <= row < ts.numel():
                return row
        return self._rows.get(int(timestep))

    def _table_step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        row: int,
        eta: float,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prev_sample, pred_original_sample) of step `row`, as the fused kernel computes them."""
        table = self._table(eta)
        model_output = model_output.to(sample.dtype)
        prev = sampler_step(
            sample,
            model_output,
            table.on(sample.device),
            row,
            None if noise is None else noise.to(sample.dtype),
            clip=table.clip,
        )
        a, b = (float(v) for v in table.coeffs[row, :2])
        x0 = a * sample + b * model_output
        if table.clip is not None:
            x0 = x0.clamp(-table.clip, table.clip)
        return prev, x0


@functools.cache
def _fast_schedulers() -> dict[str, type]:
    """Build FastDDIMScheduler and FastDDPMScheduler on first use (they subclass diffusers' schedulers)."""
    try:
        import diffusers
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor
    except ImportError:
        raise missing_extra("diffusers", "diffusers") from None

    class FastDDIMScheduler(_TableScheduler, diffusers.DDIMScheduler):
        """diffusers' DDIMScheduler (same config, same numbers, same noise draws) stepping with the fused
        `fastdiff.kernels.sampler_step` on a precomputed StepTable. `step()` with `use_clipped_model_output=True`
        on a clipping config, or at a timestep outside `timesteps`, runs diffusers' own step."""

        def step(
            self,
            model_output: torch.Tensor,
            timestep: int | torch.Tensor,
            sample: torch.Tensor,
            eta: float = 0.0,
            use_clipped_model_output: bool = False,
            generator: torch.Generator | None = None,
            variance_noise: torch.Tensor | None = None,
            return_dict: bool = True,
        ) -> Any:
            row = None if self.num_inference_steps is None else self._row(timestep)
            if row is None or (use_clipped_model_output and self.config.clip_sample):
                return super().step(
                    model_output,
                    timestep,
                    sample,
                    eta,
                    use_clipped_model_output,
                    generator,
                    variance_noise,
                    return_dict,
                )
            noise = None
            if eta > 0:
                if variance_noise is not None and generator is not None:
                    raise ValueError(
                        "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                        " `variance_noise` stays `None`."
                    )
                noise = variance_noise
                if noise is None:  # drawn exactly as diffusers draws it, so a seed gives the same images
                    noise = randn_tensor(
                        model_output.shape,
                        generator=generator,
                        device=model_output.device,
                        dtype=model_output.dtype,
                    )
            prev, x0 = self._table_step(model_output, sample, row, float(eta), noise)
            if not return_dict:
                return prev, x0
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    class FastDDPMScheduler(_TableScheduler, diffusers.DDPMScheduler):
        """diffusers' DDPMScheduler (fixed_small / fixed_large variance; same config, same numbers, same noise
        draws) stepping with the fused `fastdiff.kernels.sampler_step` on a precomputed StepTable. A timestep
        outside `timesteps` runs diffusers' own step."""

        def step(
            self,
            model_output: torch.Tensor,
            timestep: int | torch.Tensor,
            sample: torch.Tensor,
            generator: torch.Generator | None = None,
            return_dict: bool = True,
        ) -> Any:
            self._table(0.0)  # before any set_timesteps, diffusers steps through all training timesteps
            row = self._row(timestep)
            if row is None:
                return super().step(model_output, timestep, sample, generator, return_dict)
            noise = None
            if self._tables[0.0].timesteps[row] > 0:  # diffusers draws noise for every t > 0
                noise = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            prev, x0 = self._table_step(model_output, sample, row, 0.0, noise)
            if not return_dict:
                return prev, x0
            return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    classes = {"FastDDIMScheduler": FastDDIMScheduler, "FastDDPMScheduler": FastDDPMScheduler}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name  # importable by name (pickle, diffusers' save/load)
    return classes


def __getattr__(name: str) -> Any:
    # The scheduler classes subclass diffusers' and are built on first access, so importing this module does not
    # import diffusers.
    if name in ("FastDDIMScheduler", "FastDDPMScheduler"):
        return _fast_schedulers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fast_scheduler(scheduler: Any) -> Any:
    """(the Fast counterpart of a diffusers DDIMScheduler / DDPMScheduler, same config, None) or (None, why not)."""
    classes = _fast_schedulers()
    if isinstance(scheduler, tuple(classes.values())):
        return scheduler, None
    fast = {"DDIMScheduler": classes["FastDDIMScheduler"], "DDPMScheduler": classes["FastDDPMScheduler"]}.get(
        type(scheduler).__name__
    )
    if fast is None or type(scheduler).__module__.split(".")[0] != "diffusers":
        return (
            None,
            f"{type(scheduler).__name__} has no fastdiff counterpart (DDIMScheduler and DDPMScheduler do)",
        )
    try:
        from_diffusers_scheduler(scheduler, 1)
    except ValueError as err:
        return None, str(err)
    return fast.from_config(scheduler.config), None


def accelerate_pipeline(
    pipe: Any, *, dtype: torch.dtype | None = None, kernels: str = "auto", cuda_graphs: bool | str = "auto"
) -> Any:
    """Accelerate a diffusers pipeline in place and return it: `pipe.unet` through `fastdiff.accelerate()`
    (`kernels` as there), and a DDIMScheduler / DDPMScheduler swapped for FastDDIMScheduler / FastDDPMScheduler
    (other schedulers are kept, with a warning). Same seed, same images, up to floating-point rounding.

    `dtype` casts the whole pipeline (`pipe.to(dtype=...)`) so the U-Net's inputs match it. `cuda_graphs` ("auto",
    True, False) concerns CUDA only and is a no-op on CPU; capturing the U-Net call of a diffusers pipeline in a
    CUDA graph is not implemented: "auto" runs without graphs and True on CUDA raises NotImplementedError (for
    graph-captured sampling, use `fastdiff.SamplingEngine` with `fastdiff.as_denoiser(pipe.unet)`).
    """
    from fastdiff.accelerate import DTYPES, accelerate

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module) or getattr(pipe, "scheduler", None) is None:
        raise TypeError(
            f"pipe must be a diffusers pipeline with a unet and a scheduler, got {type(pipe).__name__}"
        )
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {DTYPES}, got {dtype!r}")
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if cuda_graphs is True and on_cuda:
        raise NotImplementedError(
            "cuda_graphs=True: CUDA-graph capture of a diffusers pipeline's U-Net call is not implemented; use "
            "cuda_graphs='auto' (no graphs), or fastdiff.SamplingEngine(fastdiff.as_denoiser(pipe.unet), ...)"
        )
    scheduler, why = _fast_scheduler(pipe.scheduler)
    if dtype is not None:
        pipe.to(dtype=dtype)
    accelerate(unet, kernels=kernels, inplace=True)
    if scheduler is None:
        warnings.warn(f"accelerate_pipeline kept {type(pipe.scheduler).__name__}: {why}", stacklevel=2)
    else:
        pipe.scheduler = scheduler
    return pipe

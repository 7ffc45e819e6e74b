"""Adapters between fastdiff and diffusers. diffusers itself is imported only inside the functions that need it."""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdiff.engine import _CaptureError, _copy_leaves, _CudaGraphRunner, _leaf_key
from fastdiff.errors import FastdiffError, missing_extra
from fastdiff.kernels.sampler_step import sampler_step
from fastdiff.samplers import DIFFUSERS_BUILDERS, Sampler, StepTable
from fastdiff.table import COLUMN
from fastdiff.weights import WeightsWatch


def from_diffusers_scheduler(scheduler: Any, num_steps: int, **step_kwargs: Any) -> Sampler:
    """The fastdiff sampler with the numbers of a diffusers scheduler at `num_steps` steps.

    Dispatches on the first class in `type(scheduler).__mro__` with a builder in
    `fastdiff.samplers.DIFFUSERS_BUILDERS` (so `Fast<Name>` drop-ins count as `<Name>`). `step_kwargs` are what
    diffusers passes to `step()` rather than keeps in the config (DDIM's `eta`).
    """
    config = getattr(scheduler, "config", None)
    name = next((cls.__name__ for cls in type(scheduler).__mro__ if cls.__name__ in DIFFUSERS_BUILDERS), None)
    if config is None or name is None:
        raise TypeError(
            f"scheduler must be a diffusers scheduler of one of {sorted(DIFFUSERS_BUILDERS)}, "
            f"got {type(scheduler).__name__}"
        )
    return DIFFUSERS_BUILDERS[name](scheduler, num_steps, **step_kwargs)


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
        a, b = (float(table.coeffs[row, COLUMN[name]]) for name in ("a", "b"))
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


class GraphedForward:
    """The forward of a diffusers U-Net, replayed from CUDA graphs: one per input signature, LRU-bounded.

    A diffusers pipeline calls `unet(sample, t, encoder_hidden_states=..., return_dict=False)` once per step with
    new tensors of the same shapes; each call here copies them into static buffers and replays the graph captured
    for their signature (shapes, dtypes and devices of the tensors, values of the other arguments) and the layout
    of the U-Net's weights (`fastdiff.weights`, checked on every call: weights written in place are read by the
    graph as they are; moved, cast or replaced weights, or LoRA adapters loaded, rescaled, fused or unloaded,
    capture anew). The result is a fresh tensor. Calls
    the graph cannot serve run the original forward: tensors off CUDA, autograd on, unhashable arguments, or any
    call after a capture failed (one warning).
    """

    # The capture backend and the device it captures on; tests substitute a CPU fake.
    _graph_runner: ClassVar[type] = _CudaGraphRunner
    _graph_device: ClassVar[str] = "cuda"
    _fastdiff_wraps: ClassVar[str] = "unet"  # fastdiff.update_weights(replayer, ...) writes the U-Net's

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 8) -> None:
        self.unet = unet
        self._weights = WeightsWatch(unet)
        self.original = unet.forward
        self.max_graphs = max_graphs
        self.captures = 0
        self.replays = 0
        self.failed = False
        self._cache: OrderedDict[tuple, tuple[list[Any], Any]] = OrderedDict()

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphedForward:
        # A copy of the U-Net (accelerate() copies, for one) captures its own graphs: graphs cannot be copied, and
        # the originals replay the original's memory.
        return GraphedForward(copy.deepcopy(self.unet, memo), self.max_graphs)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        runner = self._runner_for(sample, timestep, args, kwargs)
        if runner is None:
            return self.original(sample, timestep, *args, return_dict=return_dict, **kwargs)
        output = runner.replay()
        self.replays += 1
        fresh = output.sample.clone()
        return type(output)(sample=fresh) if return_dict else (fresh,)

    def _runner_for(self, sample: Any, timestep: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The graph runner of these inputs, with them copied into its static buffers (captured on a miss); None
        when no graph can serve the call."""
        if (
            self.failed
            or not isinstance(sample, torch.Tensor)
            or sample.device.type != self._graph_device
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self.unet.parameters()))
        ):
            return None
        leaves, spec = tree_flatten((sample, torch.as_tensor(timestep, device=sample.device), args, kwargs))
        try:
            key = (spec, tuple(_leaf_key("argument", leaf) for leaf in leaves), self._weights.state().layout)
        except TypeError:  # an unhashable argument
            return None
        entry = self._cache.get(key)
        if entry is None:
            entry = self._capture(leaves, spec)
            if entry is None:
                return None
            self._cache[key] = entry
            if len(self._cache) > self.max_graphs:
                self._cache.popitem(last=False)
            return entry[1]
        self._cache.move_to_end(key)
        _copy_leaves(entry[0], leaves)
        return entry[1]

    def _capture(self, leaves: list[Any], spec: Any) -> tuple[list[Any], Any] | None:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def call() -> Any:
            sample, timestep, args, kwargs = tree_unflatten(static, spec)
            return self.original(sample, timestep, *args, return_dict=True, **kwargs)

        try:
            runner = self._graph_runner(call, call, lambda: None)
        except _CaptureError as err:
            self.failed = True
            warnings.warn(
                f"the U-Net could not be captured as a CUDA graph ({err}); running it eagerly from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        self.captures += 1
        return static, runner


def graph_unet(unet: torch.nn.Module, *, max_graphs: int = 8) -> GraphedForward:
    """Make `unet` (a diffusers U-Net) replay its forward from CUDA graphs, in place; returns the replayer (its
    `captures` / `replays` counters). `del unet.forward` restores the original. See `GraphedForward`."""
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
    current = unet.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(unet, max_graphs)
    unet.forward = graphed
    return graphed


def accelerate_pipeline(
    pipe: Any, *, dtype: torch.dtype | None = None, kernels: str = "auto", cuda_graphs: bool | str = "auto"
) -> Any:
    """Accelerate a diffusers pipeline in place and return it: `pipe.unet` through `fastdiff.accelerate()`
    (`kernels` as there), and a DDIMScheduler / DDPMScheduler swapped for FastDDIMScheduler / FastDDPMScheduler
    (other schedulers are kept, with a warning). Same seed, same images, up to floating-point rounding.

    `dtype` casts the whole pipeline (`pipe.to(dtype=...)`) so the U-Net's inputs match it. `cuda_graphs`: "auto"
    or True replay the U-Net's forward from CUDA graphs (`graph_unet`) when the U-Net is on a CUDA device; on
    other devices "auto" runs without graphs and True raises ValueError; False never captures. The pipeline's
    own loop (scheduler step, CFG arithmetic) still runs per step in Python; for a loop with no per-step host
    work, use `fastdiff.SamplingEngine(fastdiff.as_denoiser(pipe.unet), sampler)`.
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
    on_graph_device = next(unet.parameters()).device.type == GraphedForward._graph_device
    if cuda_graphs is True and not on_graph_device:
        raise ValueError(
            f"cuda_graphs=True needs pipe.unet on a {GraphedForward._graph_device} device, it is on "
            f"{next(unet.parameters()).device}"
        )
    scheduler, why = _fast_scheduler(pipe.scheduler)
    # Graphs captured by an earlier call replay the modules accelerate() is about to replace.
    unet.__dict__.pop("forward", None)
    if dtype is not None:
        pipe.to(dtype=dtype)
    accelerate(unet, kernels=kernels, inplace=True)
    if cuda_graphs is not False and on_graph_device:
        graph_unet(unet)
    if scheduler is None:
        warnings.warn(f"accelerate_pipeline kept {type(pipe.scheduler).__name__}: {why}", stacklevel=2)
    else:
        pipe.scheduler = scheduler
    return pipe

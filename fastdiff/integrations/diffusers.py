"""Adapters between fastdiff and diffusers. diffusers itself is imported only inside the functions that need it."""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdiff.engine.graphs import CaptureError, CudaGraphRunner, GraphCache, copy_leaves, leaf_key
from fastdiff.engine.weights import WeightsWatch
from fastdiff.errors import FastdiffError, missing_extra
from fastdiff.kernels.sampler_step import sampler_step
from fastdiff.samplers import DIFFUSERS_BUILDERS, Sampler, StepTable
from fastdiff.table import COLUMN, TABLE_COLUMNS, apply_row


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


# ---- drop-in schedulers -------------------------------------------------------------------------------------------


def _noisy_row(sampler: Sampler, row: int, step_kwargs: Mapping[str, Any]) -> bool:
    return bool(sampler.table.column("s")[row] != 0)


def _pred_original(
    sampler: Sampler, row: int, x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """(x0,) of the row, clipped or thresholded as the table says (diffusers' `pred_original_sample`)."""
    return (_x0(sampler.table, row, x, m),)


def _x0(table: StepTable, row: int, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # The row reduced to x_prev = x0 runs through the reference row math, so clipping and thresholding are the
    # table's own.
    only_x0 = torch.zeros(len(TABLE_COLUMNS), dtype=torch.float64)
    for name in ("a", "b"):
        only_x0[COLUMN[name]] = table.coeffs[row, COLUMN[name]]
    only_x0[COLUMN["c"]] = 1.0
    return apply_row(only_x0, x, m, clip=table.clip, threshold=table.threshold)[0]


def _euler_outputs(
    sampler: Any, row: int, x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Euler's pred_original_sample is read off the churned x: the churn noise's share a * churn * z is added."""
    x0 = _x0(sampler.table, row, x, m)
    if noise is not None:
        x0 = x0 + float(sampler.table.column("a")[row] * sampler.churn[row]) * noise.to(x0.dtype)
    return (x0,)


def _lcm_outputs(
    sampler: Any, row: int, x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """LCM's `denoised`, the consistency function c_out * x0 + c_skip * x (what its pipelines decode)."""
    x0 = _x0(sampler.table, row, x, m)
    return (float(sampler.c_out[row]) * x0 + float(sampler.c_skip[row]) * x.to(x0.dtype),)


def _no_outputs(*args: Any) -> tuple[torch.Tensor, ...]:
    return ()


class DropIn(NamedTuple):
    """One `Fast<name>` drop-in scheduler: the diffusers class it subclasses, and what its `step()` does beyond the
    table's rows (every number of the update itself comes from the table)."""

    name: str
    # step() arguments that change the table (DDIM's eta, Euler's churn): one table per combination
    table_kwargs: tuple[str, ...] = ()
    # whether diffusers draws noise at this row (it sometimes draws noise it then multiplies by 0): drawing exactly
    # when it does keeps the generator's stream, so a seed gives the same images
    draws_noise: Callable[[Any, int, Mapping[str, Any]], bool] = _noisy_row
    # the dtype diffusers draws that noise in (None: the model output's)
    noise_dtype: torch.dtype | None = None
    # the fields of diffusers' output after prev_sample (pred_original_sample, denoised), from (sampler, row, x, m, z)
    outputs: Callable[..., tuple[torch.Tensor, ...]] = _pred_original
    # True: prev_sample has the model output's dtype (diffusers casts it); False: the promoted dtype of both
    model_dtype_output: bool = True
    # set_timesteps arguments a config check passes (FlowMatch's dynamic shift needs a mu)
    probe: Mapping[str, Any] = {}


DROP_INS: list[DropIn] = [
    DropIn(
        "DDIMScheduler",
        table_kwargs=("eta",),
        draws_noise=lambda sampler, row, kw: kw["eta"] > 0,
        model_dtype_output=False,
    ),
    DropIn(
        "DDPMScheduler",
        draws_noise=lambda sampler, row, kw: bool(sampler.table.timesteps[row] > 0),
        model_dtype_output=False,
    ),
    DropIn(
        "EulerDiscreteScheduler",
        table_kwargs=("s_churn", "s_tmin", "s_tmax", "s_noise"),
        draws_noise=lambda sampler, row, kw: bool(sampler.churn[row] > 0),
        outputs=_euler_outputs,
    ),
    DropIn("EulerAncestralDiscreteScheduler", draws_noise=lambda sampler, row, kw: True),
    DropIn("LCMScheduler", outputs=_lcm_outputs, model_dtype_output=False),
    DropIn(
        "FlowMatchEulerDiscreteScheduler",
        draws_noise=lambda sampler, row, kw: sampler.stochastic,
        noise_dtype=torch.float32,
        outputs=_no_outputs,
        probe={"mu": 1.0},
    ),
    DropIn(
        "DPMSolverMultistepScheduler",
        draws_noise=lambda sampler, row, kw: sampler.stochastic,  # the SDE variants draw at every step
        noise_dtype=torch.float32,
        outputs=_no_outputs,
    ),
    DropIn(
        "UniPCMultistepScheduler",
        outputs=_no_outputs,
        model_dtype_output=False,
        probe={"mu": 1.0},  # (used only by configs with use_dynamic_shifting)
    ),
]


class _TableScheduler:
    """The table-stepping mixin of every `Fast<Name>` drop-in (placed before the diffusers class in the MRO).

    `set_timesteps` runs diffusers' own (timesteps, sigmas, validation) and builds the fastdiff sampler of the same
    schedule with `from_diffusers_scheduler` (a config or argument the table cannot express raises ValueError
    there); `step` applies the row with `fastdiff.kernels.sampler_step`, keeping the history / xs buffers of
    multistep samplers as scheduler state. diffusers' own `step()` never runs.
    """

    _drop_in: ClassVar[DropIn]
    _diffusers_step: ClassVar[inspect.Signature]
    _diffusers_set_timesteps: ClassVar[inspect.Signature]
    _output_class: ClassVar[Callable[..., Any]]
    _randn: ClassVar[Callable[..., torch.Tensor]]

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        bound = self._diffusers_set_timesteps.bind(self, *args, **kwargs)
        self._schedule_kwargs = {
            name: value
            for name, value in bound.arguments.items()
            if name not in ("self", "num_inference_steps", "device") and value is not None
        }
        self._reset()
        self._sampler(self._default_step_kwargs())  # an unsupported config fails here, not at the first step

    def _reset(self) -> None:
        self._samplers: dict[tuple, Sampler] = {}  # by (begin_index, step() arguments)
        self._rows: dict[float, int] = {}
        self._state: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self._run_begin = 0

    def _default_step_kwargs(self) -> dict[str, Any]:
        params = self._diffusers_step.parameters
        return {name: params[name].default for name in self._drop_in.table_kwargs}

    def _sampler(self, step_kwargs: Mapping[str, Any]) -> Sampler:
        """The fastdiff sampler of the current schedule, begin index (img2img) and these step() arguments, built
        once and cached. A builder that takes `begin_index` gets diffusers' (multistep tables restart their
        warm-up there)."""
        if (
            "_samplers" not in self.__dict__
        ):  # stepping before set_timesteps (DDPM steps through every timestep)
            self._schedule_kwargs = {}
            self._reset()
        name = next(c.__name__ for c in type(self).__mro__ if c.__name__ in DIFFUSERS_BUILDERS)
        accepted = inspect.signature(DIFFUSERS_BUILDERS[name]).parameters
        unsupported = sorted(k for k in self._schedule_kwargs if k not in accepted)
        if unsupported:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: fastdiff's {name} table takes no custom "
                + " / ".join(unsupported)
            )
        kwargs = {**self._schedule_kwargs, **step_kwargs}
        # where this run began: diffusers' begin_index, else the row its first step() found for its timestep
        # (an img2img loop over timesteps[t_start:] without set_begin_index)
        begin = getattr(self, "begin_index", None)
        begin = self.__dict__.get("_run_begin") if begin is None else begin
        if "begin_index" in accepted and begin:
            kwargs["begin_index"] = begin
        # the set_timesteps arguments are the same for every cached sampler (set_timesteps clears the cache)
        key = (kwargs.get("begin_index"), *sorted(step_kwargs.items()))
        sampler = self._samplers.get(key)
        if sampler is None:
            try:
                sampler = from_diffusers_scheduler(self, self.num_inference_steps, **kwargs)
            except ValueError as err:
                if self.num_inference_steps is None and self._config_supported():
                    raise ValueError(
                        f"{type(self).__name__}: run 'set_timesteps' before 'step' ({err})"
                    ) from None
                raise
            self._check_timesteps(sampler.table)
            self._samplers[key] = sampler
        return sampler

    def _config_supported(self) -> bool:
        try:
            from_diffusers_scheduler(self, 1, **self._drop_in.probe)
        except ValueError:
            return False
        return True

    def _check_timesteps(self, table: StepTable) -> None:
        ours, theirs = table.timesteps, self.timesteps.detach().cpu()
        if table.timesteps.is_floating_point() or theirs.is_floating_point():
            # diffusers computes fractional timesteps in float32
            same = ours.shape == theirs.shape and torch.allclose(
                ours.double(), theirs.double(), rtol=1e-5, atol=1e-3
            )
        else:
            same = torch.equal(ours, theirs)
        if not same:
            raise FastdiffError(
                f"{type(self).__name__}: the StepTable's timesteps differ from diffusers' "
                f"({ours.tolist()} vs {theirs.tolist()})"
            )
        if not self._rows:
            self._rows = {t: i for i, t in enumerate(theirs.tolist())}

    def _row(self, timestep: Any) -> int:
        """The table row of this step: diffusers' own step counter where the scheduler has one, else the row of
        the timestep's value (DDIM, DDPM)."""
        if hasattr(self, "_init_step_index"):
            if self.step_index is None:
                self._init_step_index(timestep)
            return self.step_index
        ts = self.timesteps
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
        value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        if value not in self._rows:
            raise ValueError(
                f"{type(self).__name__}.step: timestep {value} is not one of this scheduler's timesteps "
                "(fastdiff steps only through the rows of its table)"
            )
        return self._rows[value]

    def _history(
        self, table: StepTable, sample: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sampler state buffers (history, xs) of this sampling run, zeroed when a run starts."""
        state = self._state
        if state is None or any(
            t is not None
            and (
                t.shape[-sample.dim() :] != sample.shape
                or t.dtype != sample.dtype
                or t.device != sample.device
            )
            for t in state
        ):
            state = self._state = table.new_state(sample.shape, sample.device, sample.dtype)
        return state

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        spec = self._drop_in
        params = self._diffusers_step.parameters
        arguments = self._diffusers_step.bind(self, model_output, timestep, sample, *args, **kwargs).arguments
        handled = {"self", "model_output", "timestep", "sample", "generator", "return_dict", "variance_noise"}
        for name, value in arguments.items():
            default = params[name].default
            if (
                name not in handled
                and name not in spec.table_kwargs
                and value is not None
                and value is not default
                and value != default
            ):
                raise ValueError(
                    f"{type(self).__name__}.step: {name}={value!r} is not supported by fastdiff's table"
                )
        step_kwargs = {name: arguments.get(name, params[name].default) for name in spec.table_kwargs}
        sampler = self._sampler(step_kwargs)
        row = self._row(timestep)
        if self._state is None and row != self._run_begin:  # a run's first step, not at row 0
            self._run_begin = row
            sampler = self._sampler(step_kwargs)
        table = sampler.table
        if not 0 <= row < len(table):
            raise ValueError(f"{type(self).__name__}.step: step {row} is past the last of {len(table)} steps")
        generator, noise = arguments.get("generator"), arguments.get("variance_noise")
        if noise is not None and generator is not None:
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                " `variance_noise` stays `None`."
            )
        if noise is None and spec.draws_noise(sampler, row, step_kwargs):
            noise = self._randn(
                sample.shape,  # the model output's, without learned-variance channels
                generator=generator,
                device=model_output.device,
                dtype=spec.noise_dtype or model_output.dtype,
            )
        m, variance = model_output, None
        if table.learned_variance is not None:
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(
                    f"{type(self).__name__}.step: a learned-variance model returns {2 * sample.shape[1]} channels "
                    f"(prediction and variance), got {model_output.shape[1]}"
                )
            m, variance = model_output.split(sample.shape[1], dim=1)
            variance = variance.to(sample.dtype)
        m = m.to(sample.dtype)
        history, xs = self._history(table, sample)
        prev = sampler_step(
            sample,
            m,
            table.on(sample.device),
            row,
            None if noise is None or table.column("s")[row] == 0 else noise.to(sample.dtype),
            clip=table.clip,
            threshold=table.threshold,
            history=history,
            history_kind=table.history,
            xs=xs,
            variance=variance,
            learned_variance=table.learned_variance,
        )
        extras = spec.outputs(sampler, row, sample, m, noise)
        out_dtype = (
            model_output.dtype
            if spec.model_dtype_output
            else torch.promote_types(sample.dtype, model_output.dtype)
        )
        prev = prev.to(out_dtype)
        if hasattr(self, "_init_step_index"):
            self._step_index += 1
        if not arguments.get("return_dict", True):
            return (prev, *extras)
        return self._output_class(prev, *extras)


def _output_class(base: type) -> type:
    """diffusers' output dataclass of `base.step` (`<Name>Output` beside the class, else SchedulerOutput)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    return getattr(sys.modules[base.__module__], f"{base.__name__}Output", SchedulerOutput)


def _make_drop_in(spec: DropIn, base: type) -> type:
    from diffusers.utils.torch_utils import randn_tensor

    step = inspect.signature(base.step)
    set_timesteps = inspect.signature(base.set_timesteps)

    # Pipelines inspect step() and set_timesteps() for the arguments they may pass (eta, generator, timesteps,
    # sigmas, mu): the drop-in's show diffusers' own signatures.
    def step_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _TableScheduler.step(self, *args, **kwargs)

    def set_timesteps_method(self: Any, *args: Any, **kwargs: Any) -> None:
        _TableScheduler.set_timesteps(self, *args, **kwargs)

    step_method.__signature__ = step
    set_timesteps_method.__signature__ = set_timesteps
    name = f"Fast{spec.name}"
    step_method.__qualname__, set_timesteps_method.__qualname__ = f"{name}.step", f"{name}.set_timesteps"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,  # importable by name: pickle, diffusers' save_pretrained / from_pretrained
        "__doc__": (
            f"diffusers' {spec.name} (same config, timesteps, scale_model_input, init_noise_sigma, order and noise "
            "draws) stepping with fastdiff's table: each step is one fused `fastdiff.kernels.sampler_step` on the "
            f"StepTable that `fastdiff.from_diffusers_scheduler` builds in set_timesteps. A configuration the table "
            "cannot express raises ValueError in set_timesteps; diffusers' own step() never runs."
        ),
        "_drop_in": spec,
        # diffusers resolves compatible classes by name in its own namespace: the drop-in is compatible with
        # what its base is compatible with, and with its base
        "_compatibles": [*base._compatibles, base.__name__],
        "_diffusers_step": step,
        "_diffusers_set_timesteps": set_timesteps,
        "_output_class": staticmethod(_output_class(base)),
        "_randn": staticmethod(randn_tensor),
        "step": step_method,
        "set_timesteps": set_timesteps_method,
    }
    return type(name, (_TableScheduler, base), namespace)


@functools.cache
def _fast_schedulers() -> dict[str, type]:
    """Build the `Fast<Name>` classes of DROP_INS on first use (they subclass diffusers' schedulers)."""
    try:
        import diffusers
    except ImportError:
        raise missing_extra("diffusers", "diffusers") from None
    return {f"Fast{spec.name}": _make_drop_in(spec, getattr(diffusers, spec.name)) for spec in DROP_INS}


def __getattr__(name: str) -> Any:
    # The scheduler classes subclass diffusers' and are built on first access, so importing this module does not
    # import diffusers.
    if name in {f"Fast{spec.name}" for spec in DROP_INS}:
        return _fast_schedulers()[name]
    if name == "SchedulerMixin":
        # diffusers' pipeline loader looks up the loadable base classes in the module a component's class comes
        # from: with this, a pipeline saved with a Fast scheduler loads back with DiffusionPipeline.from_pretrained.
        import diffusers

        return diffusers.SchedulerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fast_scheduler(scheduler: Any) -> Any:
    """(the drop-in counterpart of a diffusers scheduler, same config, None) or (None, why not)."""
    classes = _fast_schedulers()
    if isinstance(scheduler, tuple(classes.values())):
        return scheduler, None
    name = type(scheduler).__name__
    fast = classes.get(f"Fast{name}")
    if fast is None or type(scheduler).__module__.split(".")[0] != "diffusers":
        covered = ", ".join(spec.name for spec in DROP_INS)
        return None, f"{name} has no fastdiff counterpart (these do: {covered})"
    try:
        from_diffusers_scheduler(scheduler, 1, **fast._drop_in.probe)
    except ValueError as err:
        return None, str(err)
    return fast.from_config(scheduler.config), None


class GraphedForward:
    """The forward of a diffusers U-Net, replayed from CUDA graphs: one per input signature, LRU-bounded.

    A diffusers pipeline calls `unet(sample, t, encoder_hidden_states=..., return_dict=False)` once per step with
    new tensors of the same shapes; each call here copies them into static buffers and replays the graph captured
    for their signature (shapes, dtypes and devices of the tensors, values of the other arguments) and the layout
    of the U-Net's weights (`fastdiff.engine.weights`, checked on every call: weights written in place are read by the
    graph as they are; moved, cast or replaced weights, or LoRA adapters loaded, rescaled, fused or unloaded,
    capture anew). The result is a fresh tensor. Calls
    the graph cannot serve run the original forward: tensors off CUDA, autograd on, unhashable arguments, or any
    call after a capture failed (one warning).
    """

    # The capture backend and the device it captures on; tests substitute a CPU fake.
    _graph_runner: ClassVar[type] = CudaGraphRunner
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
        self._cache: GraphCache[tuple[list[Any], Any]] = GraphCache()

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
            key = (spec, tuple(leaf_key("argument", leaf) for leaf in leaves), self._weights.state().layout)
        except TypeError:  # an unhashable argument
            return None
        entry = self._cache.get(key)
        if entry is None:
            entry = self._capture(leaves, spec)
            if entry is None:
                return None
            self._cache.put(key, entry, self.max_graphs)
            return entry[1]
        copy_leaves(entry[0], leaves)
        return entry[1]

    def _capture(self, leaves: list[Any], spec: Any) -> tuple[list[Any], Any] | None:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def call() -> Any:
            sample, timestep, args, kwargs = tree_unflatten(static, spec)
            return self.original(sample, timestep, *args, return_dict=True, **kwargs)

        try:
            runner = self._graph_runner(call, call, lambda: None)
        except CaptureError as err:
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
    (`kernels` as there), and its scheduler swapped for the matching `Fast<Name>` drop-in of `DROP_INS` (same
    config; a scheduler with no drop-in, or a config the table cannot express, is kept, with a one-line warning).
    Same seed, same images, up to floating-point rounding.

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

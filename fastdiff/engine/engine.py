"""SamplingEngine: `fastdiff.sample` with static buffers, CUDA-graph replay and a graph cache (gpt-fast style).

Per call key (mode, device, dtype, batch and sample shape, CFG on/off, conditioning structure and shapes, and the
layout of the denoiser's weights: see `fastdiff.engine.weights`) the engine allocates once: the sample buffer `x` (updated in place
by `fastdiff.kernels.sampler_step(..., out=x)`), the conditioning, the guidance scale (a 0-d device tensor, so changing it needs no new graph), a device-side step counter
and a noise buffer (rows of pre-drawn noise plus a zero row, and the row each step reads), and for multistep tables
the sampler state (history slots and UniPC's xs, zeroed at the start of every call, updated in place by the step). One step reads everything
it needs from device memory through the counter: the timestep (gathered from the timesteps on the device), the table
row (read by the kernel) and the noise row; it then increments the counter. On CUDA that step is captured as a graph
and replayed once per step (`graph_mode="step"`), or the whole loop is captured as one graph and replayed once
(`graph_mode="loop"`): no host sync and no per-step Python beyond the replay.

Noise is drawn from the caller's generator in exactly the order `fastdiff.sample` draws it (x_T first when not given,
then one draw per noisy step), so the engine returns the same samples: bitwise on CPU without `compile` (the same
ops run in the same order on the same values), within kernel tolerance on CUDA (the Triton step kernel replaces the
PyTorch reference there). Noise is pre-drawn into the buffer in chunks of at most `NOISE_BUFFER_BYTES`; with more noise
than that, `graph_mode="loop"` falls back to step graphs (the buffer is refilled between chunks on the host).

Off CUDA, `compile=True` compiles one step (`graph_mode="step"`) or the whole loop as one `torch.while_loop`
(`graph_mode="loop"`): all steps in one call of inductor's C++ code (`fastdiff.engine.cpu_loop`). The default,
`graph_mode="auto"`, times the first compiled steps and switches to the loop when they are quick.

The capture itself sits behind the runner interface of `fastdiff.engine.graphs` (`CudaGraphRunner`, `EagerRunner`),
so the cache, buffers and fallback logic run, and are tested, on CPU.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from fastdiff.checks import (
    FiniteWatch,
    check_denoiser_matches,
    check_device,
    check_dtype,
    denoiser_run,
)
from fastdiff.engine import cpu_loop
from fastdiff.engine.graphs import (
    CaptureError,
    CudaGraphRunner,
    EagerRunner,
    GraphCache,
    copy_leaves,
    leaf_key,
)
from fastdiff.engine.planner import SELF_RUN, Plan, PlannedSampler, resolve_backend
from fastdiff.engine.weights import WeightsWatch
from fastdiff.errors import StaleWeightsError
from fastdiff.guidance import batch_conds, guidance_conds
from fastdiff.kernels.sampler_step import sampler_step
from fastdiff.loop import (
    Generator,
    callback_info,
    check_shape,
    check_x,
    infer_device,
    initial_state,
    model_outputs,
    randn,
)
from fastdiff.samplers.base import Sampler
from fastdiff.table import COLUMN, apply_row, sampler_table, table_row_kwargs

GRAPH_MODES = ("auto", "step", "loop")
# Largest pre-drawn noise buffer per cache entry; beyond it the noise is drawn in chunks between step replays.
NOISE_BUFFER_BYTES = 1 << 30


@dataclass
class EngineStats:
    """Counters of one engine: cache behaviour, graph captures and the time they took."""

    captures: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    eager_fallbacks: int = 0
    capture_seconds: float = 0.0
    # Calls that found the denoiser's weights written in place since the entry's last call: the graph reads the
    # new values, nothing was captured again.
    weight_refreshes: int = 0


@dataclass
class _Entry:
    """The static buffers of one cache key, and the runner replaying the step over them."""

    mode: str
    x: torch.Tensor
    kwargs: dict[str, Any]
    leaves: list[Any]
    guidance: torch.Tensor | None
    noise: torch.Tensor | None
    noise_row: torch.Tensor | None
    rows: int
    counter: torch.Tensor
    # The sampler state of multistep tables (None where the table has none), zeroed at the start of each call.
    history: torch.Tensor | None
    xs: torch.Tensor | None
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    denoise: Callable[..., torch.Tensor]
    backend: str
    graphs: bool
    key: tuple = ()
    runner: Any = field(default=None, repr=False)
    # CPU compile: the whole (remaining) loop as one compiled while_loop, and whether it has run once.
    compiled_loop: Callable[[], None] | None = field(default=None, repr=False)
    loop_verified: bool = False
    # The version counters of the denoiser's weights at the entry's last call (fastdiff.engine.weights.WeightsState).
    versions: tuple | None = None


class _OwnLoop:
    """An engine's own loop as a runner (`sample`), for the keys its planner sends to eager."""

    def __init__(self, engine: SamplingEngine) -> None:
        self.sample = engine._sample_here


class SamplingEngine:
    """`fastdiff.sample` for one denoiser and sampler, with static buffers and (on CUDA) graph replay.

    - `backend`: "auto" (default) plans each call key (shape, dtype, device, conditioning) on its first call with
      `fastdiff.engine.planner`: the fastest backend verified against eager that pays for its build, remembered in
      the on-disk cache (see README "Choosing a backend"); keys planned to eager run on this engine's own loop.
      "eager", "compile" and "cuda-graphs" run this engine as told (`compile=True` means "compile",
      `cuda_graphs=True` "cuda-graphs", `cuda_graphs=False` "eager"); "onnxruntime", "openvino", "tensorrt" and
      "aoti" run the model exported into the cache, in the engine's loop. `plan(shape, ..., calls=N)` plans a key
      ahead of `sample` for N expected calls and says why (`Plan.line()`); `planner`: the `Planner` to use.
    - `cuda_graphs`: "auto" captures on CUDA and runs eagerly elsewhere; True requires CUDA (ValueError otherwise);
      False never captures. A denoiser that cannot be captured falls back to eager execution with one warning per
      engine. The denoiser must be a pure function of its tensor inputs: a graph replays the kernels it launched
      during capture, not its Python.
    - `graph_mode`: "step" captures (or compiles) one step and replays it num_steps times; "loop" captures all
      steps as one CUDA graph replayed once (no per-step launch overhead, but num_steps times the capture time and
      graph size), or off CUDA with `compile=True` compiles them as one `torch.while_loop`. "loop" needs all the
      call's noise pre-drawn: with more than `NOISE_BUFFER_BYTES` of it, it falls back to "step" with a warning.
      "auto" (default) is "step" for CUDA graphs; for the CPU compile it times the first compiled steps and runs
      the rest as the loop when a step takes under `cpu_loop.LOOP_BELOW_SECONDS`. Which is faster with CUDA graphs
      depends on the model and step count: benchmark both (`SamplingEngine(..., cuda_graphs=True, graph_mode=...)`).
      Ignored when nothing is captured or compiled.
    - `compile`: on CUDA, wraps the denoiser with `torch.compile(dynamic=False)`, mode "max-autotune-no-cudagraphs"
      when the engine captures graphs itself, else "reduce-overhead"; off CUDA, compiles one step (denoiser, CFG,
      sampler update, step counter) or the whole loop (see `graph_mode`) with the inductor default mode and
      its C++ wrapper, traced inside `fastdiff.kernels.backend.decomposed()` so that inductor fuses our ops'
      reference twins (no global config is changed). A loop that cannot be compiled as a `while_loop` (a denoiser
      with data-dependent Python, say) falls back to compiling one step, with one warning per engine. Each new
      shape compiles again (seconds to minutes on a small CPU); each compiled entry has a code object of its own,
      so torch.compile's recompile limit (8 by default) never leaves one uncompiled.
    - `max_graphs`: size of the LRU cache of keys (static buffers + graph); the least recently used is freed.

    `callback` receives the same dict as with `fastdiff.sample` ({"i", "t", "x", "x0", "model_output"}, fresh
    tensors); it runs after each step's replay, so with a loop graph the call uses step graphs instead, and reading
    the tensors syncs the host with the device every step. `progress` shows a bar over the step replays (with
    graphs it tracks launches, which run ahead of the device; with a loop graph it completes in one jump).
    """

    # The capture backend and the device type it captures on; tests substitute a CPU fake.
    _graph_runner: ClassVar[type] = CudaGraphRunner
    _graph_device: ClassVar[str] = "cuda"
    _fastdiff_wraps: ClassVar[str] = "denoiser"  # fastdiff.update_weights(engine, ...) writes the denoiser's

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        sampler: Sampler,
        *,
        backend: str = "auto",
        cuda_graphs: bool | str = "auto",
        compile: bool = False,
        max_graphs: int = 8,
        graph_mode: str = "auto",
        planner: Any = None,
    ) -> None:
        if not callable(denoiser):
            raise TypeError(
                f"denoiser must be callable as denoiser(x, t, **cond), got {type(denoiser).__name__}"
            )
        self.table = sampler_table(sampler)
        if cuda_graphs not in (True, False, "auto") or not isinstance(cuda_graphs, (bool, str)):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {compile!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        if graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
        backend, cuda_graphs, compile = resolve_backend(backend, cuda_graphs, compile)
        if cuda_graphs is True:
            if self._graph_device == "cuda" and not torch.cuda.is_available():
                raise ValueError("cuda_graphs=True needs a CUDA device, and none is available")
            param = next(iter(denoiser.parameters()), None) if isinstance(denoiser, torch.nn.Module) else None
            if param is not None and param.device.type != self._graph_device:
                raise ValueError(
                    f"cuda_graphs=True needs the denoiser on a {self._graph_device} device, its parameters are "
                    f"on {param.device}"
                )
        self.denoiser = denoiser
        self._weights = WeightsWatch(denoiser) if isinstance(denoiser, torch.nn.Module) else None
        self.sampler = sampler
        self.backend = backend
        # Planned backends: keys planned to eager run here, on the plain loop; the others on the planner's runners.
        self._planned = None
        if backend not in SELF_RUN:
            cuda_graphs = False
            self._planned = PlannedSampler(
                denoiser, sampler, backend=backend, planner=planner, eager=_OwnLoop(self)
            )
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.max_graphs = max_graphs
        self.graph_mode = graph_mode
        self.stats = EngineStats()
        self._cache: GraphCache[_Entry] = GraphCache(on_evict=self._evicted)
        self._compiled: dict[tuple[str, bool], Callable[..., torch.Tensor]] = {}
        self._timesteps: dict[torch.device, torch.Tensor] = {}
        self._noisy = self.table.noisy_steps()
        self._capture_failed = False
        self._loop_failed = False
        self._warned: set[str] = set()

    # -- public API -------------------------------------------------------------------------------------------

    def sample(
        self,
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
        """Generate a batch of `shape`: the arguments and the result of `fastdiff.sample(denoiser, sampler, ...)`.

        The result is a new tensor (the engine's buffers are reused by the next call).
        """
        if self._planned is not None:
            return self._planned.sample(
                shape,
                generator=generator,
                x_T=x_T,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
                progress=progress,
                callback=callback,
                device=device,
                dtype=dtype,
            )
        return self._sample_here(
            shape,
            generator=generator,
            x_T=x_T,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
            callback=callback,
            device=device,
            dtype=dtype,
        )

    def plan(
        self,
        shape: Sequence[int],
        *,
        calls: float = 1,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Plan:
        """How calls like `sample(shape, cond=..., ...)` will run, planned now for `calls` expected calls (the work
        a build must pay for): the `Plan`, whose `line()` says which backend and why. With a backend this engine
        runs itself, the plan just names it."""
        shape = check_shape(shape)
        dev = check_device(infer_device(self.denoiser, None, device))
        if self._planned is None:
            return Plan(self.backend, self, self.backend, {}, None, 0.0, False)
        return self._planned.plan_for(
            shape,
            device=dev,
            dtype=check_dtype(dtype),
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            work_calls=calls,
        )

    def _sample_here(
        self,
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
        """`sample` on this engine's own loop (graphs or compile as configured)."""
        shape = check_shape(shape)
        dev = check_device(infer_device(self.denoiser, x_T, device))
        check_dtype(dtype)
        if x_T is not None:
            check_x("x_T", x_T, shape)
            dtype = x_T.dtype
        check_denoiser_matches(self.denoiser, dev, dtype, "x" if x_T is None else "x_T")
        cond, uncond = guidance_conds(self.denoiser, cond, uncond, guidance_scale)
        with denoiser_run(self.denoiser) as recheck, torch.inference_mode():
            x_init = randn(shape, generator, dev, dtype) if x_T is None else x_T
            entry = self._prepare(
                shape, dev, dtype, cond, uncond, guidance_scale, step_only=callback is not None
            )
            self._fill_noise(entry, 0, generator)
            self._ensure_runner(entry)
            self._reset(entry, initial_state(self.table, x_init))
            watch = FiniteWatch(self.table.timesteps)
            self._drive(entry, generator, guidance_scale, progress, callback, watch, recheck)
            # A loop run as one graph is only seen at its end: the step reported is then the last.
            watch.update(len(self.table) - 1, entry.x)
            watch.check(entry.x)
            return entry.x.clone()

    def warmup(
        self,
        shape: Sequence[int],
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> float:
        """Allocate, compile and capture for calls like `sample(shape, cond=..., ...)` ahead of time.

        Runs a few steps on zero inputs (no generator is consumed); returns the seconds it took, which is the
        compile/capture cost a later `sample` with the same key no longer pays. A planned engine plans the key
        (for one call) and warms up what it chose.
        """
        start = time.perf_counter()
        if self._planned is not None:
            kwargs = {"cond": cond, "uncond": uncond, "guidance_scale": guidance_scale, "device": device}
            plan = self.plan(shape, dtype=dtype, **kwargs)
            if plan.backend != "eager":
                if hasattr(plan.runner, "warmup"):
                    plan.runner.warmup(shape, dtype=dtype, **kwargs)
                return time.perf_counter() - start
        shape = check_shape(shape)
        dev = check_device(infer_device(self.denoiser, None, device))
        check_denoiser_matches(self.denoiser, dev, check_dtype(dtype))
        cond, uncond = guidance_conds(self.denoiser, cond, uncond, guidance_scale)
        with torch.inference_mode():
            entry = self._prepare(shape, dev, dtype, cond, uncond, guidance_scale, step_only=False)
            self._ensure_runner(entry)
            if not entry.runner.captures:
                # Nothing was captured: run a step to trigger compilation and lazy initialisation, time the
                # next ones when the mode is still to be chosen, and compile the loop by running its last step.
                entry.counter.zero_()
                if entry.mode != "loop":
                    entry.runner.replay()
                if entry.mode == "auto" and len(self.table) > cpu_loop.AUTO_TIMED_STEPS + 1:
                    timed = [cpu_loop.timed(entry.runner.replay)[0] for _ in range(cpu_loop.AUTO_TIMED_STEPS)]
                    entry.mode = cpu_loop.choose_mode(timed)
                if entry.mode == "loop":
                    entry.counter.fill_(len(self.table) - 1)
                    if not self._run_compiled_loop(entry):
                        entry.counter.zero_()
                        entry.runner.replay()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    # -- cache and buffers ------------------------------------------------------------------------------------

    def _evicted(self, entry: _Entry) -> None:
        # The runner refers back to its entry; breaking the cycle frees the graph's memory now rather than at the
        # next garbage collection.
        entry.runner = None
        self.stats.evictions += 1

    def _uses_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs is False or self._capture_failed:
            return False
        if device.type == self._graph_device:
            return True
        if self.cuda_graphs is True:
            raise ValueError(
                f"cuda_graphs=True needs {self._graph_device} tensors, this call runs on {device}"
            )
        return False

    def _noise_rows(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        row_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return min(len(self._noisy), max(1, NOISE_BUFFER_BYTES // row_bytes))

    def _mode(self, device: torch.device, graphs: bool, rows: int, step_only: bool) -> str:
        compiled_loop = self.compile and device.type != "cuda" and not graphs and not self._loop_failed
        if step_only or not (graphs or compiled_loop) or self.graph_mode == "step":
            return "step"
        if self.graph_mode == "auto" and graphs:
            return "step"
        if rows < len(self._noisy):
            if self.graph_mode == "loop":
                self._warn_once(
                    "loop-noise",
                    f"graph_mode='loop' needs all {len(self._noisy)} noise draws in one buffer, which exceeds "
                    f"fastdiff.engine.NOISE_BUFFER_BYTES; running one step at a time",
                )
            return "step"
        # "auto" here: the CPU compile, which times the first steps and then picks (cpu_loop.choose_mode).
        return self.graph_mode

    def _prepare(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        cond: dict[str, Any],
        uncond: dict[str, Any] | None,
        guidance_scale: float,
        *,
        step_only: bool,
    ) -> _Entry:
        """The entry of this call's key (allocated on a miss), with the conditioning and guidance copied in."""
        kwargs = batch_conds(cond, uncond) if uncond is not None else cond
        leaves, spec = tree_flatten(kwargs)
        leaf_keys = tuple(leaf_key("cond", leaf) for leaf in leaves)
        graphs = self._uses_graphs(device)
        rows = self._noise_rows(shape, dtype)
        mode = self._mode(device, graphs, rows, step_only)
        weights = None if self._weights is None else self._weights.state()
        layout = None if weights is None else weights.layout
        key = (mode, device, dtype, shape, uncond is not None, spec, leaf_keys, layout)
        entry = self._cache.get(key)
        if entry is None:
            self.stats.cache_misses += 1
            entry = self._allocate(shape, device, dtype, leaves, spec, uncond is not None, rows, mode, graphs)
            entry.key = key
            self._cache.put(key, entry, self.max_graphs)
        else:
            self.stats.cache_hits += 1
            if weights is not None and weights.versions != entry.versions:
                self.stats.weight_refreshes += 1
        if weights is not None:
            entry.versions = weights.versions
        copy_leaves(entry.leaves, leaves)
        if entry.guidance is not None:
            entry.guidance.fill_(guidance_scale)
        return entry

    def _allocate(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        leaves: list[Any],
        spec: Any,
        cfg: bool,
        rows: int,
        mode: str,
        graphs: bool,
    ) -> _Entry:
        static_leaves = [torch.empty_like(v) if isinstance(v, torch.Tensor) else v for v in leaves]
        if self._noisy:
            noise = torch.zeros((rows + 1, *shape), device=device, dtype=dtype)
            # Noisy step k (in draw order) reads row k % rows; every other step reads the zero row.
            row_of_step = torch.full((len(self.table),), rows, dtype=torch.long)
            row_of_step[self._noisy] = torch.arange(len(self._noisy)) % rows
            noise_row = row_of_step.to(device)
        else:
            noise, noise_row = None, None
        if device not in self._timesteps:
            self._timesteps[device] = self.table.timesteps.to(device)
        history, xs = self.table.new_state(shape, device, dtype)
        return _Entry(
            mode=mode,
            x=torch.zeros(shape, device=device, dtype=dtype),
            kwargs=tree_unflatten(static_leaves, spec),
            leaves=static_leaves,
            guidance=torch.ones((), device=device, dtype=torch.float32) if cfg else None,
            noise=noise,
            noise_row=noise_row,
            rows=rows,
            counter=torch.zeros((), device=device, dtype=torch.long),
            history=history,
            xs=xs,
            coeffs=self.table.on(device),
            timesteps=self._timesteps[device],
            denoise=self._denoiser_for(device, graphs),
            # On CPU the Triton kernel would only run under the interpreter; the reference is what sample() runs.
            backend="auto" if device.type == "cuda" else "torch",
            graphs=graphs,
        )

    def _denoiser_for(self, device: torch.device, graphs: bool) -> Callable[..., torch.Tensor]:
        # Off CUDA, compile=True compiles the whole step instead (see _ensure_runner).
        if not self.compile or device.type != "cuda":
            return self.denoiser
        key = (device.type, graphs)
        if key not in self._compiled:
            mode = "max-autotune-no-cudagraphs" if graphs else "reduce-overhead"
            self._compiled[key] = torch.compile(self.denoiser, mode=mode, dynamic=False)
        return self._compiled[key]

    def _ensure_runner(self, entry: _Entry) -> None:
        if entry.runner is not None:
            return
        step = functools.partial(self._step, entry)
        body = functools.partial(self._loop, entry) if entry.mode == "loop" else step
        if self.compile and entry.x.device.type != "cuda":
            # Without graphs, the whole step (denoiser, CFG, sampler update, counter) is one compiled graph: the
            # update fuses into the model's last kernels and the per-op dispatch of a small model's step goes
            # away (swiss-roll MLP, batch 1, DDPM 1000: 0.19 s per call against 0.29 s compiling the denoiser only).
            step = cpu_loop.compiled(step)
            entry.compiled_loop = cpu_loop.compiled(functools.partial(self._while, entry))
        reset = entry.counter.zero_
        if entry.graphs:
            start = time.perf_counter()
            try:
                entry.runner = self._graph_runner(step, body, reset)
                self.stats.captures += 1
            except CaptureError as err:
                self._capture_failed = True
                self.stats.eager_fallbacks += 1
                self._warn_once(
                    "capture",
                    f"SamplingEngine: the denoiser could not be captured as a CUDA graph ({err}); "
                    "running it eagerly from now on",
                )
                self._demote(entry)
            finally:
                self.stats.capture_seconds += time.perf_counter() - start
        if entry.runner is None:
            entry.runner = EagerRunner(step, body, reset)

    def _demote(self, entry: _Entry) -> None:
        """Re-file `entry` under the key of an uncaptured, step-by-step run (after a failed capture or compile)."""
        old = entry.key
        entry.mode, entry.graphs = "step", False
        entry.key = ("step", *old[1:])
        self._cache.rekey(old, entry.key)

    def _run_compiled_loop(self, entry: _Entry) -> bool:
        """Run the steps from the counter to the end as the compiled while_loop; False if it could not compile.

        The loop writes the sample buffer and the counter only after its last step, so a loop that fails leaves
        both as they were: the caller goes on step by step from the same state, and the engine stays on steps
        from then on (one warning). A genuine error of the denoiser is raised again by that step.
        """
        why = cpu_loop.run_compiled_loop(entry.compiled_loop, entry.loop_verified)
        if why is None:
            entry.loop_verified = True
            return True
        self._loop_failed = True
        self.stats.eager_fallbacks += 1
        self._warn_once(
            "while-loop",
            f"SamplingEngine: the sampling loop could not be compiled as one torch.while_loop ({why}); "
            "compiling one step at a time from now on",
        )
        entry.compiled_loop = None
        self._demote(entry)
        return False

    def _check_weights(self, e: _Entry) -> None:
        """After user code ran between two replays (a callback): weights written in place are read by the next
        replay; any other change would need another entry, which a call cannot switch to halfway."""
        if self._weights is not None and self._weights.state().layout != e.key[-1]:
            raise StaleWeightsError(
                "the denoiser's weights were replaced or cast (not written in place) during sample(), in the "
                "callback; change them between calls, or write them in place (fastdiff.update_weights)"
            )

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- one step, the loop, and the host driver --------------------------------------------------------------

    def _advance(
        self,
        e: _Entry,
        step: torch.Tensor,
        x: torch.Tensor,
        out: torch.Tensor | None,
        history: torch.Tensor | None,
        xs: torch.Tensor | None,
        functional: bool = False,
        time_table: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Row `step` (a 0-d device tensor) from `x`: (the next x, written into `out` if given; the history and xs
        after the row; the model output m and its unconditional branch). Every per-row value is read from device
        memory through `step`. The fused step updates `history` and `xs` in place; `functional` computes new ones
        instead (`apply_row`, the same math: the carried state of the compiled while_loop cannot be mutated).
        `time_table`: the denoiser's `timestep_table` of the table's timesteps, whose row it is then given."""
        table = self.table
        index = step.view(1)
        t = e.timesteps.index_select(0, index).expand(x.shape[0])
        row = e.coeffs.index_select(0, index)[0]
        x_in = row[COLUMN["k_in"]] * x if table.scales_input else x
        kwargs = (
            e.kwargs if time_table is None else {**e.kwargs, "time_row": time_table.index_select(0, index)}
        )
        m, m_u, variance = model_outputs(e.denoise, table, x_in, t, kwargs, e.guidance is not None)
        noise = None if e.noise is None else e.noise.index_select(0, e.noise_row.index_select(0, index))[0]
        guidance = 1.0 if e.guidance is None else e.guidance
        if functional:
            x_next, history, xs = apply_row(
                row,
                x,
                m,
                m_uncond=m_u,
                guidance_scale=guidance,
                noise=noise,
                variance=variance,
                history=history,
                xs=xs,
                **table_row_kwargs(table),
            )
            return x_next, history, xs, m, m_u
        x_next = sampler_step(
            x,
            m,
            e.coeffs,
            step,
            noise,
            eps_uncond=m_u,
            guidance_scale=guidance,
            history=history,
            xs=xs,
            variance=variance,
            out=out,
            backend=e.backend,
            **table_row_kwargs(table),
        )
        return x_next, history, xs, m, m_u

    def _step(self, e: _Entry) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampler step on the static buffers, in place, advancing the device counter."""
        *_, out, out_u = self._advance(e, e.counter, e.x, e.x, e.history, e.xs)
        e.counter.add_(1)
        return out, out_u

    def _loop(self, e: _Entry) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = None
        for _ in range(len(self.table)):
            outputs = self._step(e)
        return outputs

    def _while(self, e: _Entry) -> None:
        """All remaining steps as one `torch.while_loop` (for the CPU compile), over the static buffers.

        A denoiser with a `timestep_table(timesteps)` method (ours: `MLPDenoiser`) has what it computes from the
        timestep alone computed here, for all steps in one batch, and is called with `time_row=` its row: for the
        swiss-roll MLP that is 6 of 16 matrix products a step. Computed in every run from the weights as they are
        then, so weights written between runs are never stale."""
        table_of = getattr(e.denoise, "timestep_table", None)
        time_table = table_of(e.timesteps) if callable(table_of) else None

        def advance(i: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, xs: torch.Tensor | None) -> Any:
            return self._advance(e, i, x, None, h, xs, functional=True, time_table=time_table)[:3]

        cpu_loop.while_loop(advance, len(self.table), e.counter, e.x, e.history, e.xs)

    def _reset(self, e: _Entry, x: torch.Tensor) -> None:
        """Start a run: the state buffer from `x`, the counter and the sampler state (history, xs) at zero."""
        e.x.copy_(x)
        e.counter.zero_()
        for buf in (e.history, e.xs):
            if buf is not None:
                buf.zero_()

    def _fill_noise(self, e: _Entry, first: int, generator: Generator) -> None:
        """Draw the noise of noisy steps first..first+rows (draw order) into their rows."""
        if e.noise is None:
            return
        shape = tuple(e.x.shape)
        for row in range(min(e.rows, len(self._noisy) - first)):
            e.noise[row].copy_(randn(shape, generator, e.x.device, e.x.dtype))

    def _drive(
        self,
        e: _Entry,
        generator: Generator,
        guidance_scale: float,
        progress: bool,
        callback: Callable[[dict[str, Any]], None] | None,
        watch: FiniteWatch,
        recheck: Callable[[], None],
    ) -> None:
        """Run the table's rows on `e`; `recheck()` after each callback re-checks the denoiser's own weights
        (`fastdiff.checks.denoiser_run`), as `_check_weights` does the engine's."""
        n = len(self.table)
        with tqdm(total=n, disable=not progress, desc="sampling", leave=False) as bar:
            if e.mode == "loop" and (e.graphs or self._run_compiled_loop(e)):
                if e.graphs:
                    e.runner.replay()
                bar.update(n)
                return
            # Steps at which the next chunk of noise is drawn (never, when all of it fits in the buffer).
            refill = {self._noisy[k]: k for k in range(e.rows, len(self._noisy), e.rows)} if e.rows else {}
            timed: list[float] = []
            for i in range(n):
                if e.mode == "auto" and len(timed) == cpu_loop.AUTO_TIMED_STEPS:
                    e.mode = cpu_loop.choose_mode(timed)
                    if e.mode == "loop" and self._run_compiled_loop(e):
                        bar.update(n - i)
                        return
                if i in refill:
                    self._fill_noise(e, refill[i], generator)
                before = e.x.clone() if callback is not None else None
                seconds, (out, out_u) = cpu_loop.timed(e.runner.replay)
                watch.update(i, e.x)
                if e.mode == "auto" and i > 0:  # the first step compiles
                    timed.append(seconds)
                bar.update(1)
                if callback is not None:
                    # Copies: the static buffers are overwritten by the next replay.
                    out_u = None if out_u is None else out_u.clone()
                    callback(
                        callback_info(
                            self.table, e.coeffs, i, before, e.x.clone(), out.clone(), out_u, guidance_scale
                        )
                    )
                    self._check_weights(e)
                    recheck()


def engine_for(
    model: torch.nn.Module,
    sampler: Sampler,
    device: torch.device | str,
    *,
    compile: bool = False,
    backend: str | None = None,
) -> SamplingEngine | None:
    """The engine that `fastdiff sample` runs for `backend` ("compile" and "cuda-graphs" on the accelerated model,
    the others on the model as given: the planner compiles or exports what it chooses itself). Without a
    backend: with `compile` the accelerated model compiled; else CUDA graphs on a GPU, and None (for
    `fastdiff.sample`) on a CPU."""
    from fastdiff.accelerate import accelerate

    if backend is None:
        if not compile and torch.device(device).type != "cuda":
            return None
        backend = "compile" if compile else "cuda-graphs"
    if backend in ("compile", "cuda-graphs"):
        model = accelerate(model)
    return SamplingEngine(model, sampler, backend=backend)

"""The sampling benchmark: every workload x backend x batch size x dtype, against eager PyTorch in the same run.

Methodology, per measurement:
- the same starting noise (seeded, drawn in float32 on the host) and the same step-noise seed for every backend;
- every backend is prepared once per workload and dtype (accelerate, export, engine build: `setup_s`); the first
  sampling run of each batch size (lazy compilation, graph capture) is timed on its own (`first_run_s`); then
  `warmup` more untimed runs; then `repeats` timed runs (CUDA events after a synchronize on GPU,
  `time.perf_counter` on CPU), reported as median, min, max and quartiles. The timed runs of all backends are
  interleaved (round-robin, rotating order), so that other work on a shared machine skews them alike;
- the eager backend is always measured, so every result has `speedup_vs_eager` = eager median / its median
  (same workload, batch size and dtype);
- the final samples are compared with the eager float32 samples (max abs difference, PSNR over the
  reference's peak-to-peak range), so that a fast wrong answer shows;
- a per-step profile: the backend's denoiser called alone on the first step's inputs (a few calls, scaled to
  `steps`: the model time), the rest of a run's time per step being sampler and host overhead; peak memory (`torch.cuda.max_memory_allocated`
  on GPU; the process's peak RSS so far, from `getrusage`, on CPU).
A backend or workload that cannot run is recorded as `skipped` with the reason, one that fails as `error`.
"""

from __future__ import annotations

import datetime
import gc
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.engine import GRAPH_MODES

from .backends import BACKENDS, Backend, BackendSkipped, Case, EagerBackend, prepare
from .environment import device_info, git_revision, load_average, versions
from .scaling import plan, run_scaling
from .weight_swap import SWAP_BACKENDS, run_weight_swap
from .workloads import (
    LATENT_WORKLOADS,
    SAMPLERS,
    WORKLOADS,
    Workload,
    build_workload,
    check_latent_size,
    cpu_skip_reason,
    workload_name,
)

SCHEMA_VERSION = 1
KIND = "fastdiff.benchmarks.sampling"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The profile times PROFILE_ROUNDS loops of (at most) PROFILE_CALLS model calls: every step's call costs the same,
# so a few calls give the per-step model time without paying for a whole extra sampling run.
PROFILE_CALLS = 10
PROFILE_ROUNDS = 3


def _check_names(option: str, values: Sequence[str], choices: Sequence[str]) -> list[str]:
    values = list(values)
    bad = [v for v in values if v not in choices]
    if not values or bad:
        raise ValueError(f"{option}: expected a non-empty list of {', '.join(choices)}; got {values!r}")
    return list(dict.fromkeys(values))


@dataclass
class BenchConfig:
    """What to run. `sampler` / `steps` of None use each workload's own default (DDIM 50; swissroll DDPM 1000)."""

    workloads: Sequence[str] = ("digits", "swissroll")
    backends: Sequence[str] = ("eager", "fastdiff")
    batch_sizes: Sequence[int] = (1, 64)
    dtypes: Sequence[str] = ("float32",)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    sampler: str | None = None
    steps: int | None = None
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    profile: bool = True
    graph_mode: str = "auto"
    # Latent height and width of the workloads in LATENT_WORKLOADS (sd15-unet), named sd15-unet-<size>; None: 64.
    latent_size: int | None = None
    # Data-parallel scaling section (benchmarks/scaling.py): process counts (empty: none), threads per process
    # (CPU) and images per timed run; it samples digits with the digits workload's guidance, at the largest batch.
    processes: Sequence[int] = ()
    threads_per_process: int = 1
    scaling_samples: int = 256
    # Weight-swap section (benchmarks/weight_swap.py): the backends to time a swap of the digits weights on.
    weight_swap: Sequence[str] = ()
    # fastdiff-auto plans each case as a job of this many sample() calls: the work a build (export, compile) must
    # pay for. The default is a served deployment; the benchmark's own few runs would never pay for a build.
    auto_calls: int = 1000

    def __post_init__(self) -> None:
        self.workloads = _check_names("workloads", self.workloads, tuple(WORKLOADS))
        self.backends = _check_names("backends", self.backends, BACKENDS)
        # float32 first: its eager samples are the numerical reference of every other row
        self.dtypes = sorted(_check_names("dtypes", self.dtypes, tuple(DTYPES)), key=list(DTYPES).index)
        sizes = list(self.batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes: expected positive integers, got {sizes!r}")
        self.batch_sizes = list(dict.fromkeys(sizes))
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {self.graph_mode!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)} or None, got {self.sampler!r}")
        procs = list(self.processes)
        if procs and (
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in procs) or 1 not in procs
        ):
            raise ValueError(f"processes: expected positive integers including 1, got {procs!r}")
        self.processes = list(dict.fromkeys(procs))
        self.latent_size = check_latent_size(self.latent_size)
        if self.latent_size is not None and not set(self.workloads) & set(LATENT_WORKLOADS):
            raise ValueError(
                f"latent_size applies to the workloads {LATENT_WORKLOADS}; none of {self.workloads} takes it"
            )
        self.weight_swap = list(dict.fromkeys(self.weight_swap))
        if any(b not in SWAP_BACKENDS for b in self.weight_swap):
            raise ValueError(
                f"weight_swap: expected backends among {SWAP_BACKENDS}, got {self.weight_swap!r}"
            )
        for name, low in (
            ("repeats", 1),
            ("warmup", 0),
            ("steps", 1),
            ("threads_per_process", 1),
            ("scaling_samples", 1),
            ("auto_calls", 1),
        ):
            value = getattr(self, name)
            if name == "steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call: CUDA events around it on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, out
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and quartiles (seconds) of repeated timings, with the timings themselves."""
    arr = np.asarray(times, dtype=np.float64)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {
        "median": float(median),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "q1": float(q1),
        "q3": float(q3),
        "runs": [float(t) for t in arr],
    }


def compare_samples(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs difference and PSNR (dB, peak = the reference's peak-to-peak range) of `out` against `ref`."""
    out = out.detach().float().cpu()
    ref = ref.detach().float().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"samples of shape {tuple(out.shape)} cannot be compared with {tuple(ref.shape)}")
    finite = bool(torch.isfinite(out).all())
    result: dict[str, Any] = {
        "reference": "eager float32",
        "finite": finite,
        "max_abs": None,
        "psnr_db": None,
    }
    if not finite:
        return result
    diff = (out.double() - ref.double()).abs()
    result["max_abs"] = float(diff.max())
    mse = float(diff.square().mean())
    peak = float(ref.max() - ref.min())
    # identical samples have no finite PSNR: None with max_abs 0
    if mse > 0 and peak > 0:
        result["psnr_db"] = 10 * math.log10(peak**2 / mse)
    return result


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "kind": "cuda_max_memory_allocated",
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        }
    try:
        import resource
    except ImportError:
        return {"kind": "unavailable", "peak_mib": None}
    # ru_maxrss is in KiB on Linux (bytes on macOS); it is the process's peak so far, never lower than before
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {
        "kind": "cpu_peak_rss",
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20,
    }


def _model_loop(backend: Backend, case: Case) -> tuple[Callable[[], None], int]:
    """(a loop of a few denoiser calls on the first step's inputs, the number of calls), after one warm call."""
    x, kwargs = case.model_inputs()
    t = backend.model_timestep(x.shape[0])
    denoise = backend.denoise
    calls = min(backend.workload.steps, PROFILE_CALLS)

    def loop() -> None:
        for _ in range(calls):
            denoise(x, t, **kwargs)

    denoise(x, t, **kwargs)
    return loop, calls


def _rotated(names: list[str], turn: int) -> list[str]:
    """`names` starting at position `turn` (mod len), so no backend always runs first in a round."""
    k = turn % len(names) if names else 0
    return names[k:] + names[:k]


def measure_all(
    backends: dict[str, Backend],
    case: Case,
    *,
    repeats: int,
    warmup: int,
    profile: bool,
    status: Callable[[str], None] = lambda text: None,
) -> dict[str, tuple[dict[str, Any], torch.Tensor] | Exception]:
    """Time every backend on `case`; returns per backend (fields, samples) or the exception it raised.

    Per backend, the first run is timed alone (it pays lazy compilation or graph capture), then `warmup` untimed
    runs. The `repeats` timed runs are interleaved, one run of every backend per round in an order that rotates
    from round to round, so that a change of load on a shared machine hits every backend alike; so are the
    loops of the model-only profile. A backend that raises leaves the rotation; the others go on.
    """
    device = case.x_T.device
    failed: dict[str, Exception] = {}
    first: dict[str, float] = {}
    planning: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in backends}
    peak: dict[str, dict[str, Any]] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # a backend failing on this case is a result, not the end of the run
            failed[name] = err
            _release(device)
            return None

    def run(name: str) -> tuple[float, torch.Tensor]:
        return timed(lambda: backends[name].sample(case), device)

    with torch.inference_mode():
        for name, backend in backends.items():
            status(f"first run {name}")

            def first_and_warmup(name: str = name, backend: Backend = backend) -> bool:
                if hasattr(backend, "plan"):  # fastdiff-auto: planning timed apart from the first run
                    planning[name] = timed(lambda: backend.plan(case), device)[0]
                first[name], samples[name] = run(name)
                for _ in range(warmup):
                    backend.sample(case)
                return True

            attempt(name, first_and_warmup)
        for r in range(repeats):
            for name in _rotated([n for n in backends if n not in failed], r):
                status(f"run {r + 1}/{repeats} {name}")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                done = attempt(name, lambda name=name: run(name))
                if done is not None:
                    times[name].append(done[0])
                    samples[name] = done[1]
                    memory = _peak_memory(device)
                    if name not in peak or (memory["peak_mib"] or 0) > (peak[name]["peak_mib"] or 0):
                        peak[name] = memory
        # the model-only profile, interleaved in the same way
        loops: dict[str, tuple[Callable[[], None], int]] = {}
        for name, backend in backends.items():
            if profile and backend.denoise is not None and name not in failed:
                status(f"profile {name}")
                loop = attempt(name, lambda b=backend: _model_loop(b, case))
                if loop is not None:
                    loops[name] = loop
        model_times: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(min(repeats, PROFILE_ROUNDS)):
            for name in _rotated([n for n in loops if n not in failed], r):
                done = attempt(name, lambda name=name: timed(loops[name][0], device))
                if done is not None:
                    model_times[name].append(done[0] / loops[name][1])
        results: dict[str, tuple[dict[str, Any], torch.Tensor] | Exception] = dict(failed)
        for name, backend in backends.items():
            if name in failed:
                continue
            stats = summarize(times[name])
            steps = backend.workload.steps
            fields: dict[str, Any] = {
                "planning_s": planning.get(name),
                "first_run_s": first[name],
                "time_s": stats,
                "samples_per_s": case.shape[0] / stats["median"],
                "ms_per_step": 1e3 * stats["median"] / steps,
                "memory": peak[name],
                "profile": None,
            }
            if model_times.get(name):
                model_s = float(np.median(model_times[name])) * steps
                fields["profile"] = {
                    "model_s": model_s,
                    "model_ms_per_step": 1e3 * model_s / steps,
                    "overhead_ms_per_step": 1e3 * (stats["median"] - model_s) / steps,
                    "overhead_fraction": (stats["median"] - model_s) / stats["median"],
                }
            results[name] = (fields, samples[name])
    return results


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:500]}" if text else type(err).__name__


def _row(
    workload: str, backend: str, batch: int, dtype: str, status: str, reason: str | None
) -> dict[str, Any]:
    return {
        "workload": workload,
        "backend": backend,
        "batch_size": batch,
        "dtype": dtype,
        "status": status,
        "reason": reason,
        "sampler": None,
        "steps": None,
        "guidance_scale": None,
        "setup_s": None,
        "planning_s": None,
        "first_run_s": None,
        "time_s": None,
        "samples_per_s": None,
        "ms_per_step": None,
        "speedup_vs_eager": None,
        "profile": None,
        "memory": None,
        "numerics": None,
        "info": {},
    }


def make_case(workload: Workload, batch: int, dtype: torch.dtype, seed: int) -> Case:
    """The seeded inputs of one measurement, identical for every backend."""
    device = workload.device
    x_T = torch.randn((batch, *workload.sample_shape), generator=torch.Generator().manual_seed(seed))
    cond, uncond = workload.conds(batch, device, dtype)
    guidance = workload.guidance_scale if uncond is not None else 1.0
    return Case(x_T.to(device=device, dtype=dtype), cond, uncond, guidance, seed + 1)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Progress:
    """A bar over the results rows, showing what runs now."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, disable=not enabled, desc="bench", unit="case")

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def advance(self, rows: int) -> None:
        self.bar.update(rows)


def _run_workload(
    name: str,
    config: BenchConfig,
    backends: list[str],
    device: torch.device,
    workdir: Path,
    progress: _Progress,
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """All rows of one workload, its name in the results (with the latent size, if any) and its description."""
    grid = [(d, b, n) for d in config.dtypes for n in config.batch_sizes for b in backends]
    latent_size = config.latent_size if name in LATENT_WORKLOADS else None
    row_name = workload_name(name, latent_size)

    def skip_all(reason: str) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        progress.advance(len(grid))
        rows = [_row(row_name, backend, batch, dtype, "skipped", reason) for dtype, backend, batch in grid]
        return row_name, {"description": spec.description, "skipped": reason}, rows

    spec = WORKLOADS[name]
    gpu_only = cpu_skip_reason(name, latent_size)
    if gpu_only and device.type != "cuda":
        return skip_all(gpu_only)
    try:
        workload = build_workload(
            name,
            device,
            sampler=config.sampler,
            steps=config.steps,
            seed=config.seed,
            latent_size=latent_size,
        )
    except ImportError as err:
        return skip_all(_error_text(err))
    name = workload.name  # the rows' name from here on

    rows: list[dict[str, Any]] = []
    references: dict[int, torch.Tensor] = {}
    if "float32" not in config.dtypes:
        progress.status(f"{name}: eager float32 reference samples")
        reference = EagerBackend(workload, torch.float32)
        with torch.inference_mode():
            for batch in config.batch_sizes:
                references[batch] = reference.sample(make_case(workload, batch, torch.float32, config.seed))
        del reference
    for dtype_name in config.dtypes:
        dtype = DTYPES[dtype_name]
        prepared: dict[str, Backend] = {}
        unavailable: dict[str, tuple[str, str]] = {}
        for backend_name in backends:
            progress.status(f"{name} {dtype_name}: preparing {backend_name}")
            try:
                prepared[backend_name] = prepare(
                    backend_name,
                    workload,
                    dtype,
                    workdir=workdir,
                    max_batch=max(config.batch_sizes),
                    graph_mode=config.graph_mode,
                    auto_calls=config.auto_calls,
                )
            except BackendSkipped as skip:
                unavailable[backend_name] = ("skipped", str(skip))
            except Exception as err:  # a backend that fails to build is a result, not the end of the run
                unavailable[backend_name] = ("error", _error_text(err))
        for batch in config.batch_sizes:
            case = make_case(workload, batch, dtype, config.seed)
            label = f"{name} b{batch} {dtype_name}"
            measured = measure_all(
                prepared,
                case,
                repeats=config.repeats,
                warmup=config.warmup,
                profile=config.profile,
                status=lambda text, label=label: progress.status(f"{label}: {text}"),
            )
            # other processes on the machine skew CPU timings: the load right after these measurements
            load = (load_average() or [None])[0]
            for backend_name in backends:
                if backend_name in unavailable:
                    rows.append(_row(name, backend_name, batch, dtype_name, *unavailable[backend_name]))
                    continue
                backend = prepared[backend_name]
                row = _row(name, backend_name, batch, dtype_name, "ok", None)
                row.update(
                    sampler=workload.sampler_kind,
                    steps=workload.steps,
                    guidance_scale=case.guidance_scale,
                    setup_s=backend.setup_s,
                    info={**backend.info, "load_average_1m": load},
                )
                rows.append(row)
                result = measured[backend_name]
                if isinstance(result, Exception):
                    row.update(status="error", reason=_error_text(result))
                    continue
                fields, samples = result
                row.update(fields)
                if backend_name == "eager" and dtype_name == "float32":
                    references[batch] = samples
                if batch in references:
                    row["numerics"] = compare_samples(samples, references[batch])
            progress.advance(len(backends))
        prepared.clear()
        _release(device)
    return name, workload.describe(), rows


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    eager = {
        (r["workload"], r["batch_size"], r["dtype"]): r["time_s"]["median"]
        for r in rows
        if r["backend"] == "eager" and r["status"] == "ok"
    }
    for r in rows:
        base = eager.get((r["workload"], r["batch_size"], r["dtype"]))
        if r["status"] == "ok" and base is not None:
            r["speedup_vs_eager"] = base / r["time_s"]["median"]


def run_benchmark(
    config: BenchConfig, *, command: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every measurement of `config` and return the results document (see schema.json)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    # the reference is always measured, first, so that every other row has a ratio and a numerical check
    backends = ["eager", *(b for b in config.backends if b != "eager")]
    load_start = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    scaling_rows = (
        len(plan(config.processes, config.threads_per_process, config.device)) if config.processes else 0
    )
    bar = _Progress(
        len(config.workloads) * len(config.dtypes) * len(backends) * len(config.batch_sizes) + scaling_rows,
        progress,
    )
    workloads: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fastdiff-bench-") as tmp:
            for name in config.workloads:
                label, workloads[label], rows = _run_workload(name, config, backends, device, Path(tmp), bar)
                results += rows
        scaling = None
        if config.processes:
            scaling = run_scaling(
                config.processes,
                threads=config.threads_per_process,
                device=config.device,
                num_samples=config.scaling_samples,
                steps=config.steps or WORKLOADS["digits"].steps,
                batch_size=max(config.batch_sizes),
                guidance_scale=WORKLOADS["digits"].guidance_scale,
                repeats=config.repeats,
                seed=config.seed,
                on_row=lambda: bar.advance(1),
            )
        swap = None
        if config.weight_swap:
            swap = run_weight_swap(
                config.weight_swap,
                device=config.device,
                steps=config.steps or WORKLOADS["digits"].steps,
                batch_size=config.batch_sizes[0],
                repeats=config.repeats,
                seed=config.seed,
            )
    finally:
        bar.bar.close()
    _add_speedups(results)
    settings = asdict(config)
    settings["eager_added"] = "eager" not in config.backends
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created_utc": started.isoformat(timespec="seconds"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": command if command is not None else " ".join(sys.argv),
        "git": git_revision(),
        "environment": {
            "device": device_info(device),
            "versions": versions(),
            "platform": platform.platform(),
            "load_average": {"start": load_start, "end": load_average()},
        },
        "settings": settings,
        "workloads": workloads,
        "results": results,
        **({"scaling": scaling} if scaling is not None else {}),
        **({"weight_swap": swap} if swap is not None else {}),
    }

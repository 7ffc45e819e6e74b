"""The planner: how a (denoiser, sampler, shape, dtype, device) runs, chosen by measurement and remembered.

`backend="auto"` takes every candidate of `fastdiff.engine.candidates` that can run here (one that cannot is kept with
its reason), builds those whose build pays for itself, checks each one's samples against eager on the same x_T and
noise, times them, and takes the fastest verified one, or eager:

1. Eager first: runs of the first `k` rows and of half the table (k >= PROBE_STEPS, enough rows for MIN_PROBE_S)
   give the reference samples and, fitted to a fixed cost per call plus a cost per row and extrapolated to the
   whole table, eager's seconds per call (a call's fixed cost, scaled with the rows, would inflate it n/k times).
   When the warm-up run alone, scaled to the table, shows that no build could pay, nothing more is timed.
2. Cost: the work at hand is `work_calls` sample() calls (the CLI knows its batches) plus the calls that earlier runs
   of the same key recorded. A build is paid only if its cost (a build recorded in the cache for this model, else the
   prior of `fastdiff.engine.candidates`; nothing when its artifact is cached) is at most the eager time of that work: the
   most the candidate could save. So a 10-sample run does not pay a 60-second compile, and a command repeated often
   enough pays it once (the ski-rental rule: builds never cost more than the work they could have saved).
3. Verification: the candidate's samples after the same rows (whole runs for per-table candidates) must be within
   its tolerance of eager's (`Candidate.tolerance`: max abs difference over max(1, max |eager|)); one that is not is
   refused with the difference it showed.
4. Timing: REPEATS rounds, one run of every built candidate per round (both probe lengths) in an order that
   rotates, the median per candidate and length (2 shared cores are noisy; interleaving spreads a change of load
   over all). Fewer rounds and a shorter long probe when the rounds would cost more than TIMING_SHARE of the
   eager time of the work at hand. A candidate is taken only when it beats eager by more than MARGIN, so `auto`
   is never slower than eager beyond that noise.

The decision, every candidate's measurements and the work seen are stored in the cache (`fastdiff.cache`) under a key
of the weights' sha256, the table, shape, dtype, device, conditioning, library versions, CPU and threads; the next
run of the same command loads its choice without measuring. A cached choice is taken again only while it still pays
(its recorded load time plus its calls against eager's); a run whose calls measure slower than the recorded eager
time discards the record (`PlannedSampler`), and a later call plans again.

Timing is injectable: `Planner(timer=..., clock=...)`, so tests decide what each candidate "measures".
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.cache import DiskCache, canonical_json, use_for_inductor
from fastdiff.engine.candidates import CANDIDATES, Candidate, Target, package_version
from fastdiff.errors import BackendUnavailableError, StaleWeightsError
from fastdiff.fingerprint import state_sha256, tensor_sha256
from fastdiff.samplers.base import Sampler
from fastdiff.table import sampler_table

BACKENDS = ("auto", *CANDIDATES)
PROBE_STEPS = 3
MIN_PROBE_S = 0.05
REPEATS = 3
# Timing rounds cost at most about this share of the eager time of the work at hand (at least one round runs): a
# 256-sample digits run spent 22 s planning for 13.5 s of work with three full rounds. A choice made on fewer
# rounds is checked against the time its calls are served in (PlannedSampler), and measured again if slower.
TIMING_SHARE = 0.25
# A candidate must be this much faster than eager to be taken: run-to-run noise of one timing on 2 shared cores.
MARGIN = 0.05
# PlannedSampler re-checks a choice after this many calls that measured slower than the recorded eager time.
RECHECK_CALLS = 3
# Loading an exported model found in the cache, before its load time was measured (digits U-Net: 0.3-1.9 s).
LOAD_S = 1.0
PLAN_KIND = "plan"
BUILD_KIND = "build"


def check_backend(backend: object) -> str:
    """`backend` as given, or ValueError naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return str(backend)


# What SamplingEngine runs itself (its own loop, graphs or compile); every other backend is planned.
SELF_RUN = ("eager", "compile", "cuda-graphs")


def resolve_backend(backend: object, cuda_graphs: bool | str, compile: bool) -> tuple[str, bool | str, bool]:
    """SamplingEngine's (backend, cuda_graphs, compile) made consistent: `compile=True` means backend "compile"
    (with `cuda_graphs` as given: graphs of the compiled model on CUDA), `cuda_graphs=True` means "cuda-graphs",
    `cuda_graphs=False` the plain loop ("eager"); an explicit backend sets the flags it needs. A backend that
    contradicts a flag is a ValueError."""
    backend = check_backend(backend)
    for flag, value, means in (("compile", compile, "compile"), ("cuda_graphs", cuda_graphs, "cuda-graphs")):
        if (
            value is True
            and backend not in ("auto", means)
            and not (flag == "cuda_graphs" and backend == "compile")
        ):
            raise ValueError(f"{flag}=True asks for backend={means!r}, which contradicts backend={backend!r}")
    if cuda_graphs is False and backend == "cuda-graphs":
        raise ValueError("cuda_graphs=False contradicts backend='cuda-graphs'")
    if compile:
        return "compile", cuda_graphs, True
    if cuda_graphs is True or backend == "cuda-graphs":
        return "cuda-graphs", True, False
    if backend == "compile":
        return "compile", cuda_graphs, True
    if backend == "eager" or (backend == "auto" and cuda_graphs is False):
        return "eager", False, False
    return backend, cuda_graphs, False


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """What makes a measurement valid elsewhere: library versions, the CPU and its threads, the GPU."""
    env: dict[str, Any] = {
        "versions": {
            p: package_version(p) for p in ("fastdiff", "torch", "onnxruntime", "openvino", "tensorrt")
        },
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _table_id(sampler: Sampler) -> dict[str, Any]:
    table = sampler_table(sampler)
    flags = {
        f.name: getattr(table, f.name)
        for f in dataclasses.fields(table)
        if f.name not in ("coeffs", "timesteps")
    }
    flags = {k: v for k, v in flags.items() if not k.startswith("_")}
    return {"sha256": tensor_sha256(table.coeffs, table.timesteps), "flags": repr(sorted(flags.items()))}


def _cond_id(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: [str(v.dtype), *v.shape] if isinstance(v, torch.Tensor) else repr(v)
        for k, v in sorted(cond.items())
    }


class _Probe:
    """The first `rows` rows of a sampler's table, as a sampler (what the engine reads of one)."""

    def __init__(self, sampler: Sampler, rows: int) -> None:
        table = sampler_table(sampler)
        self.table = dataclasses.replace(
            table, coeffs=table.coeffs[:rows], timesteps=table.timesteps[:rows], _on_device={}
        )


@dataclass
class Result:
    """What the planner found about one candidate."""

    status: str  # "ok", "unavailable", "skipped" (not worth building), "failed", "unverified"
    reason: str | None = None
    s_per_call: float | None = None
    build_s: float | None = None  # the last time making it ready took (cold build or load from the cache)
    cached: bool = False  # whether its artifact was in the cache when it was made ready
    # of build_s, the part that loaded the built artifact (what a run that finds it cached pays)
    load_s: float | None = None
    max_abs_diff: float | None = None
    estimate_s: float | None = None  # the build cost it was judged by
    # skipped: the eager work (s) that would pay for it, its estimate plus what planning had spent before it
    pays_at_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    """The planner's answer: the backend, an object whose `sample(shape, ...)` runs it, and why."""

    backend: str
    runner: Any
    requested: str
    results: dict[str, Result]
    eager_s: float | None  # seconds per call of eager, measured (None when not measured)
    planning_s: float
    from_cache: bool
    key: dict[str, Any] = field(default_factory=dict, repr=False)
    skipped_costs: list[float] = field(default_factory=list)
    # the calls of work the choice was made for (this run's and those seen before), and the calls served since
    work_seen: float = 0.0
    served_s: list[float] = field(default_factory=list, repr=False)

    @property
    def speedup(self) -> float | None:
        """Eager's seconds per call over the chosen backend's, as measured."""
        chosen = self.results.get(self.backend)
        if self.eager_s is None or chosen is None or not chosen.s_per_call:
            return None
        return self.eager_s / chosen.s_per_call

    def line(self) -> str:
        """One line saying which path runs and why, e.g. `backend: onnxruntime (6.1x eager in 3 s of planning)`."""
        if self.requested != "auto":
            built = self.results.get(self.backend)
            extra = "" if built is None or built.build_s is None else f", ready in {built.build_s:.1f} s"
            return f"backend: {self.backend} (requested{'; cached' if built and built.cached else ''}{extra})"
        parts = []
        if self.speedup is not None and self.backend != "eager":
            parts.append(f"{self.speedup:.1f}x eager")
        if self.from_cache:
            parts.append(f"plan cached, {self.planning_s:.1f} s to load")
        else:
            parts.append(f"{self.planning_s:.0f} s of planning")
        if self.backend == "eager":
            others = [f"{n}: {r.reason}" for n, r in self.results.items() if n != "eager" and r.reason]
            if others:
                parts.append("; ".join(others))
        elif self.results[self.backend].cached:
            parts.append("cached")
        return f"backend: {self.backend} (" + "; ".join(parts) + ")"

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "requested": self.requested,
            "eager_s_per_call": self.eager_s,
            "speedup_vs_eager": self.speedup,
            "planning_s": self.planning_s,
            "from_cache": self.from_cache,
            "work_calls": self.work_seen,
            "candidates": {n: r.to_json() for n, r in self.results.items()},
        }


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _per_call(seconds: Mapping[int, float], n: int) -> float:
    """Seconds of a whole `n`-row call from runs of `rows -> seconds`: one length scaled, or two fitted to a
    fixed cost plus a cost per row (never below either measurement)."""
    if len(seconds) == 1:
        ((rows, t),) = seconds.items()
        return t * n / rows
    (r1, t1), (r2, t2) = sorted(seconds.items())
    return max(t1 + (t2 - t1) * (n - r1) / (r2 - r1), t1, t2)


def _pays_at(results: Mapping[str, Result]) -> list[float]:
    """The eager work at which each skipped candidate would pay for its build. Measured the way planning decided:
    builds it paid for count, so a later check does not plan again at once (an SD 1.5 plan that paid an 81 s
    export skipped a 490 s compile against the 237 s left of 498 s: compared with 498 s, its first served call
    would plan again)."""
    return [
        r.pays_at_s if r.pays_at_s is not None else r.estimate_s
        for r in results.values()
        if r.status == "skipped" and (r.pays_at_s is not None or r.estimate_s is not None)
    ]


def _difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().float().cpu()
    out = out.detach().float().cpu()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


class Planner:
    """Chooses and builds backends (see the module docstring). `cache`: a DiskCache (default: the user's cache
    folder; its inductor/ folder becomes inductor's cache unless TORCHINDUCTOR_CACHE_DIR is set). `timer(name,
    run, rows)`: seconds of one run of candidate `name` over `rows` rows of the table (default: `run()` timed with
    `clock`, synchronised on CUDA).
    `candidates`: the candidate objects by name (default: `fastdiff.engine.candidates.CANDIDATES`)."""

    def __init__(
        self,
        cache: DiskCache | None = None,
        *,
        timer: Callable[[str, Callable[[], Any], int], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        candidates: Mapping[str, Candidate] | None = None,
        repeats: int = REPEATS,
    ) -> None:
        self.cache = cache if cache is not None else DiskCache()
        use_for_inductor(self.cache)
        self.clock = clock
        self.timer = timer or self._time
        self.candidates = (
            dict(candidates) if candidates is not None else {n: c() for n, c in CANDIDATES.items()}
        )
        if "eager" not in self.candidates:
            raise ValueError(
                "candidates must include 'eager', the reference every other one is checked against"
            )
        self.repeats = repeats

    def _time(self, name: str, run: Callable[[], Any], rows: int) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = self.clock()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.clock() - start

    # -- the key --------------------------------------------------------------------------------------------------

    def target(
        self,
        denoiser: Any,
        sampler: Sampler,
        shape: Sequence[int],
        *,
        device: torch.device,
        dtype: torch.dtype,
        cond: Mapping[str, Any] | None,
        uncond: Mapping[str, Any] | None,
        guidance_scale: float,
    ) -> Target:
        """The planning target of one call (hashes the denoiser's weights once)."""
        module = denoiser if isinstance(denoiser, torch.nn.Module) else None
        weights = None if module is None else state_sha256(module.state_dict())
        target = Target(
            denoiser=denoiser,
            weights=weights,
            sampler=sampler,
            shape=tuple(int(s) for s in shape),
            device=torch.device(device),
            dtype=dtype,
            cond=dict(cond or {}),
            cfg=guidance_scale != 1.0,
            cache=self.cache,
            environment=environment(torch.device(device)),
        )
        target.shared["call"] = {"cond": cond, "uncond": uncond, "guidance_scale": guidance_scale}
        return target

    def plan_key(self, target: Target, names: Iterable[str]) -> dict[str, Any] | None:
        """The decision's cache key; None when the denoiser has no weights to hash (then nothing is stored)."""
        if target.weights is None:
            return None
        call = target.shared["call"]
        return {
            "weights": target.weights,
            "table": _table_id(target.sampler),
            "shape": list(target.shape),
            "dtype": str(target.dtype),
            "device": target.device.type,
            "cond": _cond_id(target.cond),
            "uncond": None if call["uncond"] is None else _cond_id(call["uncond"]),
            "cfg": target.cfg,
            "candidates": sorted(names),
            "environment": target.environment,
        }

    # -- planning -------------------------------------------------------------------------------------------------

    def plan(
        self, target: Target, *, backend: str = "auto", work_calls: float = 1.0, served: float = 0.0
    ) -> Plan:
        """The plan for `target`: `backend` forced, or chosen by measurement for `work_calls` calls of this key.
        `served`: calls of this key already run beyond the work an earlier plan was told of (they count as work
        seen, like the calls that earlier runs recorded)."""
        if backend != "auto" and backend not in self.candidates:
            raise ValueError(f"backend must be 'auto' or one of {tuple(self.candidates)}, got {backend!r}")
        if not (isinstance(work_calls, (int, float)) and work_calls > 0):
            raise ValueError(f"work_calls must be a positive number of sample() calls, got {work_calls!r}")
        start = self.clock()
        if backend != "auto":
            return self._forced(target, backend, start)
        names = list(self.candidates)
        key = self.plan_key(target, names)
        record = None if key is None else self.cache.get(PLAN_KIND, key)
        seen = served
        if record is not None:
            seen += float(record.get("calls_seen", 0.0))
            record = {**record, "calls_seen": seen}
            plan = self._from_record(target, record, key, work_calls, start)
            if plan is not None:
                return plan
        return self._measure(target, key, names, work_calls, seen, start)

    def _forced(self, target: Target, name: str, start: float) -> Plan:
        candidate = self.candidates[name]
        reason = candidate.unavailable(target)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
        cached = candidate.cached(target)
        runner, build_s = self._ready(candidate, target, target.sampler)
        results = {name: Result("ok", build_s=build_s, cached=cached)}
        return Plan(name, runner, name, results, None, self.clock() - start, False)

    def _ready(self, candidate: Candidate, target: Target, sampler: Sampler) -> tuple[Any, float]:
        """(runner, seconds): the candidate's runner for `sampler`, built and warmed up for the target's call."""
        start = self.clock()
        runner = candidate.runner(target, sampler)
        if candidate.per_table:
            call = target.shared["call"]
            runner.warmup(target.shape, device=target.device, dtype=target.dtype, **call)
        return runner, self.clock() - start

    def _run(self, runner: Any, target: Target, seed: int = 0) -> torch.Tensor:
        x_T = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        generator = torch.Generator(target.device).manual_seed(seed + 1)
        return runner.sample(
            target.shape,
            x_T=x_T.to(target.device, target.dtype),
            generator=generator,
            **target.shared["call"],
        )

    def _from_record(
        self, target: Target, record: Mapping[str, Any], key: dict[str, Any], work_calls: float, start: float
    ) -> Plan | None:
        """The recorded choice, made ready, if it still pays for this work; None: plan again."""
        try:
            results = {n: Result(**r) for n, r in record["candidates"].items()}
            eager_s = float(record["eager_s"])
            choice = str(record["choice"])
        except (KeyError, TypeError, ValueError):
            return None
        if choice not in self.candidates or choice not in results:
            return None
        total = work_calls + float(record.get("calls_seen", 0.0))
        skipped = _pays_at(results)
        if skipped and min(skipped) <= eager_s * total:
            return None  # enough work has been seen to pay for a build skipped before: measure again
        # the recorded choice unless, for this run's work, making it ready costs more than it saves: then the
        # measured candidate with the least (load + calls) time, eager (nothing to load) on ties
        costs = {"eager": eager_s * work_calls}
        for name, r in results.items():
            if name != "eager" and name in self.candidates and r.status == "ok" and r.s_per_call:
                costs[name] = self._load_estimate(name, r, target) + r.s_per_call * work_calls
        if choice not in costs or costs[choice] > min(costs.values()):
            choice = min(costs, key=lambda n: (costs[n], n != "eager"))
        chosen = results[choice]
        candidate = self.candidates[choice]
        cached = candidate.cached(target)
        try:
            runner, ready_s = self._ready(candidate, target, target.sampler)
        except StaleWeightsError:
            raise
        except Exception:  # the recorded choice no longer builds here: measure again
            return None
        chosen.build_s, chosen.cached = ready_s, cached
        self.cache.put(
            PLAN_KIND,
            key,
            {**record, "candidates": {n: r.to_json() for n, r in results.items()}, "calls_seen": total},
        )
        plan = Plan(choice, runner, "auto", results, eager_s, self.clock() - start, True, key)
        plan.work_seen = total
        plan.skipped_costs = skipped
        return plan

    def _measure(
        self,
        target: Target,
        key: dict[str, Any] | None,
        names: list[str],
        work_calls: float,
        seen: float,
        start: float,
    ) -> Plan:
        results: dict[str, Result] = {"eager": Result("ok", build_s=0.0)}
        eager = self.candidates["eager"]
        n = len(sampler_table(target.sampler))
        rows = min(n, PROBE_STEPS)
        eager_runner, _ = self._ready(eager, target, _Probe(target.sampler, rows))
        first = self.timer("eager", lambda: self._run(eager_runner, target), rows)
        per_row = max(first / rows, 1e-9)  # a timer can read 0 for a very short run
        if first > 0 and first < MIN_PROBE_S and rows < n:
            rows = min(n, math.ceil(rows * MIN_PROBE_S / first))
            eager_runner, _ = self._ready(eager, target, _Probe(target.sampler, rows))
        order = []
        for name in names:
            if name == "eager":
                continue
            candidate = self.candidates[name]
            reason = candidate.unavailable(target)
            if reason is not None:
                results[name] = Result("unavailable", reason)
                continue
            order.append((self._estimate(candidate, target), name))
        # The warm-up run scaled to the table bounds eager's time per call from above: when even that much work
        # cannot pay for any build, eager is the answer without timing anything more.
        eager_s = per_row * n
        work_s = eager_s * (work_calls + seen)
        contenders = 1 + sum(estimate <= work_s for estimate, _ in order)  # eager and those it may pay for
        # Two probe lengths: a call's fixed cost (argument checks, buffers, a weights check) is not per row, and
        # scaling one short probe to the whole table would multiply it by n / rows. The second covers half the
        # table, so that extrapolating it multiplies the noise of a difference of two timings by at most about 2
        # (a 3 and 6-row pair on digits multiplied it by 16: onnxruntime measured 0.03 s a call against 0.1 s),
        # unless one round of timing at that length would cost more than TIMING_SHARE of the work at hand: rows
        # that cost that much are mostly per-row cost, which a shorter pair measures well enough.
        share_rows = math.floor(TIMING_SHARE * work_s / (contenders * per_row)) - rows
        long = min(n, max(2 * rows, math.ceil(n / 2)), max(2 * rows, share_rows))
        lengths = (rows,) if rows == n else (rows, long)
        probes = {r: _Probe(target.sampler, r) for r in lengths}
        runners: dict[str, list[tuple[Any, int]]] = {}
        if any(estimate <= work_s for estimate, _ in order):
            runners["eager"] = [(eager_runner, rows)]
            runners["eager"] += [(self._ready(eager, target, probes[r])[0], r) for r in lengths[1:]]
            eager_s = _per_call(
                {
                    r: self.timer("eager", lambda run=run: self._run(run, target), r)
                    for run, r in runners["eager"]
                },
                n,
            )
            reference = self._run(eager_runner, target)
        budget = eager_s * (work_calls + seen)

        full_reference: list[torch.Tensor] = []
        for estimate, name in sorted(order):
            candidate = self.candidates[name]
            if estimate > budget or not runners:
                spent = eager_s * (work_calls + seen) - budget
                results[name] = Result(
                    "skipped",
                    f"building it (~{estimate:.0f} s) costs more than the {budget:.1f} s of eager work it could save",
                    estimate_s=estimate,
                    pays_at_s=estimate + spent,
                )
                continue
            cached = candidate.cached(target)
            try:
                sampler = target.sampler if candidate.per_table else probes[rows]
                runner, build_s = self._ready(candidate, target, sampler)
                if not cached:
                    self.cache.put(BUILD_KIND, candidate.build_key(target), {"build_s": build_s})
                budget -= build_s
                if candidate.per_table:
                    if not full_reference:
                        eager_full, _ = self._ready(eager, target, target.sampler)
                        full_reference.append(self._run(eager_full, target))
                        budget -= eager_s
                    ref = full_reference[0]
                else:
                    ref = reference
                diff = _difference(self._run(runner, target), ref)
                timed = [(runner, n if candidate.per_table else rows)]
                if not candidate.per_table:
                    timed += [(self._ready(candidate, target, probes[r])[0], r) for r in lengths[1:]]
            except StaleWeightsError:
                raise
            except Exception as err:  # a candidate that fails here is a result, not the end of planning
                results[name] = Result("failed", _first_line(err), cached=cached, estimate_s=estimate)
                continue
            tolerance = candidate.tolerance.get(target.dtype, candidate.tolerance[torch.float32])
            load_s = target.shared.get("load_s:" + name)
            result = Result(
                "ok", build_s=build_s, cached=cached, load_s=load_s, max_abs_diff=diff, estimate_s=estimate
            )
            if not diff <= tolerance:
                result.status = "unverified"
                result.reason = f"its samples differ from eager's by {diff:.3g} > {tolerance:g}"
            results[name] = result
            if result.status == "ok":
                runners[name] = timed

        times: dict[str, dict[int, list[float]]] = {name: {} for name in runners}
        round_s = sum(length for timings in runners.values() for _, length in timings) * per_row
        repeats = max(1, min(self.repeats, math.floor(TIMING_SHARE * work_s / round_s))) if runners else 0
        for r in range(repeats):
            order_r = list(runners)
            order_r = order_r[r % len(order_r) :] + order_r[: r % len(order_r)]
            for name in order_r:
                for run, length in runners[name]:
                    seconds = self.timer(name, lambda run=run: self._run(run, target), length)
                    times[name].setdefault(length, []).append(seconds)
        for name, by_length in times.items():
            results[name].s_per_call = _per_call(
                {length: statistics.median(values) for length, values in by_length.items()}, n
            )
        if runners:
            eager_s = results["eager"].s_per_call
        results["eager"].s_per_call = eager_s

        choice = "eager"
        measured = [
            (r.s_per_call, name) for name, r in results.items() if name in runners and name != "eager"
        ]
        if measured and min(measured)[0] < eager_s * (1 - MARGIN):
            choice = min(measured)[1]
        for name, r in results.items():
            if name != choice and r.status == "ok" and name != "eager" and r.s_per_call is not None:
                r.reason = f"{eager_s / r.s_per_call:.2f}x eager"
        candidate = self.candidates[choice]
        if candidate.per_table:
            runner = runners[choice][0][0]
        else:
            runner, _ = self._ready(candidate, target, target.sampler)
        skipped = _pays_at(results)
        if key is not None:
            self.cache.put(
                PLAN_KIND,
                key,
                {
                    "choice": choice,
                    "eager_s": eager_s,
                    "candidates": {n: r.to_json() for n, r in results.items()},
                    "calls_seen": work_calls + seen,
                    "probe_rows": list(lengths),
                },
            )
        plan = Plan(choice, runner, "auto", results, eager_s, self.clock() - start, False, key or {})
        plan.skipped_costs = skipped
        plan.work_seen = work_calls + seen
        return plan

    def _load_estimate(self, name: str, result: Result, target: Target) -> float:
        """Seconds to make a measured candidate ready again: its last time when that was from the cache (or it is
        rebuilt every time, as compile is), else, when its artifact is cached now, the load measured after its
        build (LOAD_S when unknown), else its build estimate."""
        candidate = self.candidates[name]
        if result.cached or candidate.per_table:
            return result.build_s or 0.0
        if not candidate.cached(target):
            return self._estimate(candidate, target)
        return LOAD_S if result.load_s is None else result.load_s

    def _estimate(self, candidate: Candidate, target: Target) -> float:
        """What making the candidate ready is expected to cost: ~nothing when its artifact is cached, else the
        build recorded for this model, else the candidate's prior."""
        if candidate.cached(target):
            return 0.0
        record = self.cache.get(BUILD_KIND, candidate.build_key(target)) if target.weights else None
        if isinstance(record, dict) and isinstance(record.get("build_s"), (int, float)):
            return float(record["build_s"])
        return candidate.estimate_build_s(target)

    def forget(self, plan: Plan) -> None:
        """Discard the stored decision of `plan` (it measured slower than recorded): the next plan measures again."""
        if plan.key:
            self.cache.discard(PLAN_KIND, plan.key)


class PlannedSampler:
    """`sample(shape, ...)` like `SamplingEngine.sample`, each call key (shape, dtype, device, conditioning)
    run the way the planner chose for it, planned on its first call.

    `expected_calls`: how many calls of a key the caller expects (the work a build must pay for; default 1). The
    sampler counts the calls it serves: once they would have paid for a build skipped at planning, the key is
    planned again; when `RECHECK_CALLS` calls of a chosen backend measured slower than the eager time recorded for
    it, the stored decision is discarded and the key planned again. An exported denoiser that finds the model's
    weights changed (`StaleWeightsError`) makes the key plan again (a new weights hash: a new export) and the call
    run again, so stale weights never give samples. `eager`: what runs a key planned to eager (an object with
    `sample`; default: the planner's own eager engine), so that an engine can plan and still run eager itself.
    """

    def __init__(
        self,
        denoiser: Any,
        sampler: Sampler,
        *,
        backend: str = "auto",
        planner: Planner | None = None,
        expected_calls: float = 1.0,
        eager: Any = None,
    ) -> None:
        self.denoiser = denoiser
        self.eager = eager
        self.sampler = sampler
        self.backend = check_backend(backend)
        self._planner = planner
        self.expected_calls = expected_calls
        self.plans: dict[tuple, Plan] = {}
        # per call key: the seconds of each call served, and the calls the planner was told of so far
        self._calls: dict[tuple, list[float]] = {}
        self._declared: dict[tuple, float] = {}

    @property
    def planner(self) -> Planner:
        if self._planner is None:
            self._planner = Planner()
        return self._planner

    def plan_for(
        self,
        shape: Sequence[int],
        *,
        device: torch.device,
        dtype: torch.dtype,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        work_calls: float | None = None,
    ) -> Plan:
        """The plan of this call key, planned now if it has none (or must be re-checked)."""
        key = (
            tuple(shape),
            torch.device(device),
            dtype,
            guidance_scale != 1.0,
            canonical_json(_cond_id(dict(cond or {}))),
            None if uncond is None else canonical_json(_cond_id(dict(uncond))),
        )
        plan = self.plans.get(key)
        if plan is None:
            target = self.planner.target(
                self.denoiser,
                self.sampler,
                shape,
                device=torch.device(device),
                dtype=dtype,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
            )
            served = len(self._calls.get(key, ()))
            work = work_calls if work_calls is not None else max(self.expected_calls - served, 1.0)
            extra = max(0.0, served - self._declared.get(key, 0.0))
            plan = self.planner.plan(target, backend=self.backend, work_calls=work, served=extra)
            self.plans[key] = plan
            self._declared[key] = served + work
        plan._call_key = key  # type: ignore[attr-defined]
        return plan

    def sample(
        self,
        shape: Sequence[int],
        *,
        generator: Any = None,
        x_T: torch.Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        progress: bool = False,
        callback: Callable[[dict[str, Any]], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Generate a batch of `shape`: the arguments and result of `fastdiff.sample(denoiser, sampler, ...)`."""
        from fastdiff.loop import infer_device

        dev = infer_device(self.denoiser, x_T, device)
        dtype = x_T.dtype if x_T is not None else dtype
        kwargs = {
            "generator": generator,
            "x_T": x_T,
            "cond": cond,
            "uncond": uncond,
            "guidance_scale": guidance_scale,
            "progress": progress,
            "callback": callback,
            "device": device,
            "dtype": dtype,
        }
        if x_T is None and generator is not None:
            # A re-run after stale weights must draw the same noise: take x_T from the generator once, here.
            from fastdiff.loop import randn

            kwargs["x_T"] = randn(tuple(shape), generator, dev, dtype)
        for attempt in range(2):
            plan = self.plan_for(
                shape, device=dev, dtype=dtype, cond=cond, uncond=uncond, guidance_scale=guidance_scale
            )
            generators = (
                [] if generator is None else generator if isinstance(generator, list) else [generator]
            )
            states = [g.get_state() for g in generators]
            start = self.planner.clock()
            runner = self.eager if plan.backend == "eager" and self.eager is not None else plan.runner
            try:
                out = runner.sample(shape, **kwargs)
            except StaleWeightsError:
                if attempt or plan.backend in ("eager", "compile", "cuda-graphs"):
                    raise
                del self.plans[plan._call_key]  # type: ignore[attr-defined]
                for g, state in zip(generators, states, strict=True):
                    g.set_state(state)
                continue
            self._served(plan, self.planner.clock() - start)
            return out
        raise AssertionError("unreachable")

    def _served(self, plan: Plan, seconds: float) -> None:
        key = plan._call_key  # type: ignore[attr-defined]
        calls = self._calls.setdefault(key, [])
        calls.append(seconds)
        plan.served_s.append(seconds)
        if plan.requested != "auto" or plan.eager_s is None:
            return
        slow = [s for s in plan.served_s if s > plan.eager_s * (1 + MARGIN)]
        beyond = max(0.0, len(calls) - self._declared[key])
        if plan.backend != "eager" and len(slow) >= RECHECK_CALLS:
            self.planner.forget(plan)
            del self.plans[key]
        elif plan.skipped_costs and min(plan.skipped_costs) <= plan.eager_s * (plan.work_seen + beyond):
            del self.plans[key]

"""fastdiff.engine.planner with injected timings: the choice, skipped and refused candidates, amortisation, the cache."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.cache import DiskCache
from fastdiff.engine.candidates import Candidate, Eager
from fastdiff.engine.planner import (
    LOAD_S,
    MARGIN,
    PLAN_KIND,
    RECHECK_CALLS,
    REPEATS,
    PlannedSampler,
    Planner,
    check_backend,
    resolve_backend,
)
from fastdiff.errors import BackendUnavailableError
from fastdiff.models.mlp import MLPDenoiser

STEPS = 30
PROBE_ROWS = 3  # the shortest probe: a fake's seconds are per 3 rows (10x per call), nothing fixed per call


class _Shifted:
    """A runner that returns the inner runner's samples plus `offset` (a wrong backend when offset != 0), and
    moves the fake clock by `seconds` per call."""

    def __init__(self, inner, offset, clock, seconds):
        self.inner, self.offset, self.clock, self.seconds = inner, offset, clock, seconds

    def sample(self, shape, **kwargs):
        if self.clock is not None:
            self.clock.now += self.seconds
        return self.inner.sample(shape, **kwargs) + self.offset

    def warmup(self, shape, **kwargs):
        return 0.0


class Fake(Candidate):
    def __init__(
        self,
        name,
        *,
        estimate=0.0,
        offset=0.0,
        cached=False,
        reason=None,
        per_table=False,
        clock=None,
        build_s=0.0,
        load_s=None,
    ):
        self.name = name
        self.build_s, self.load_s = build_s, load_s
        self.per_table = per_table
        self.estimate, self.offset, self.is_cached, self.reason = estimate, offset, cached, reason
        self.clock = clock
        self.built = 0

    def unavailable(self, target):
        return self.reason

    def estimate_build_s(self, target):
        return self.estimate

    def cached(self, target):
        return self.is_cached

    def runner(self, target, sampler):
        self.built += 1
        if self.clock is not None:
            self.clock.now += self.build_s
        if self.load_s is not None:  # as _Exported.runner times its load apart from its build
            target.shared["load_s:" + self.name] = self.load_s
        return _Shifted(Eager().runner(target, sampler), self.offset, self.clock, 0.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Timer:
    """Seconds per 3 rows by candidate name; counts calls and runs each function (so outputs are real)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.calls = 0
        self.log = []

    def __call__(self, name, run, rows):
        self.calls += 1
        self.log.append((name, rows))
        run()
        return self.seconds[name] * rows / PROBE_ROWS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLPDenoiser(hidden=16, num_layers=1, time_embed_dim=8).eval()


@pytest.fixture(scope="module")
def sampler():
    return fastdiff.DDIMSampler(fastdiff.NoiseSchedule.from_kind("linear"), num_steps=STEPS)


def _planner(tmp_path, seconds, *fakes, clock=None):
    timer = Timer(seconds)
    clock = clock or Clock()
    candidates = {"eager": Eager(), **{f.name: f for f in fakes}}
    return Planner(DiskCache(tmp_path), timer=timer, clock=clock, candidates=candidates), timer


def _target(planner, model, sampler, batch=4):
    return planner.target(
        model,
        sampler,
        (batch, 2),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cond=None,
        uncond=None,
        guidance_scale=1.0,
    )


def test_check_backend():
    assert check_backend("onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("onnx")


def test_auto_takes_the_fastest_verified_and_says_why(tmp_path, model, sampler):
    planner, _ = _planner(
        tmp_path,
        {"eager": 0.1, "fast": 0.05, "faster-but-wrong": 0.01, "slow": 0.2},
        Fake("fast"),
        Fake("faster-but-wrong", offset=0.5),
        Fake("slow"),
        Fake("missing", reason="missingpkg is not installed"),
    )
    plan = planner.plan(_target(planner, model, sampler), work_calls=10)
    assert plan.backend == "fast"
    r = plan.results
    assert r["eager"].s_per_call == pytest.approx(1.0)  # 0.1 s per 3-row probe, 30 rows
    assert r["fast"].status == "ok" and r["fast"].max_abs_diff == 0.0
    assert (
        r["faster-but-wrong"].status == "unverified" and "differ from eager" in r["faster-but-wrong"].reason
    )
    assert r["slow"].status == "ok" and r["slow"].reason == "0.50x eager"
    assert r["missing"].status == "unavailable" and r["missing"].reason == "missingpkg is not installed"
    assert plan.speedup == pytest.approx(2.0)
    assert plan.line().startswith("backend: fast (2.0x eager")
    # the runner samples the whole table, as eager does
    gen = torch.Generator().manual_seed(5)
    ref = fastdiff.sample(model, sampler, (4, 2), generator=torch.Generator().manual_seed(5))
    assert torch.equal(plan.runner.sample((4, 2), generator=gen), ref)


def test_auto_keeps_eager_unless_a_candidate_beats_it_beyond_noise(tmp_path, model, sampler):
    close = 0.1 * (1 - MARGIN / 2)
    planner, _ = _planner(
        tmp_path, {"eager": 0.1, "close": close, "wrong": 0.001}, Fake("close"), Fake("wrong", offset=1)
    )
    plan = planner.plan(_target(planner, model, sampler))
    assert plan.backend == "eager"
    assert plan.results["wrong"].status == "unverified"
    assert "close: 1.03x eager" in plan.line()


def test_timing_rounds_fit_a_share_of_the_work_at_hand(tmp_path, model, sampler):
    # eager: 0.1 s per 3 rows, 1 s per 30-row call; one round times eager and "fast" at both probe lengths
    seconds = {"eager": 0.1, "fast": 0.05}
    planner, timer = _planner(tmp_path / "big", seconds, Fake("fast"))
    assert planner.plan(_target(planner, model, sampler), work_calls=1000).backend == "fast"
    fast = [rows for name, rows in timer.log if name == "fast"]
    assert sorted(fast) == sorted(
        [PROBE_ROWS, STEPS // 2] * REPEATS
    )  # 3 rows and half the table, every round
    # 2 calls (2 s of eager work): a quarter of it buys one round, at 3 and 6 rows (6 rows of both: 0.6 s)
    planner, timer = _planner(tmp_path / "small", seconds, Fake("fast"))
    assert planner.plan(_target(planner, model, sampler), work_calls=2).backend == "fast"
    assert [rows for name, rows in timer.log if name == "fast"] == [PROBE_ROWS, 2 * PROBE_ROWS]


def test_a_lengthened_first_probe_still_measures_eager_per_row(tmp_path, model, sampler):
    # 0.003 s per 3 rows is under MIN_PROBE_S: the probe grows to the whole table, and eager's time per call
    # is still 0.001 s per row x 30 rows, so 5 calls (0.15 s) pay a 0.1 s build
    planner, _ = _planner(tmp_path, {"eager": 0.003, "fast": 0.001}, Fake("fast", estimate=0.1))
    plan = planner.plan(_target(planner, model, sampler), work_calls=5)
    assert plan.results["fast"].status == "ok" and plan.backend == "fast"
    assert plan.results["eager"].s_per_call == pytest.approx(0.03)


def test_a_failing_build_is_a_result(tmp_path, model, sampler):
    class Broken(Fake):
        def runner(self, target, sampler):
            raise RuntimeError("exporter exploded\nsecond line")

    planner, _ = _planner(tmp_path, {"eager": 0.1}, Broken("broken"))
    plan = planner.plan(_target(planner, model, sampler))
    assert plan.backend == "eager"
    assert plan.results["broken"].status == "failed"
    assert plan.results["broken"].reason == "RuntimeError: exporter exploded"


def test_an_expensive_build_is_skipped_for_small_work_and_taken_when_cached(tmp_path, model, sampler):
    seconds = {"eager": 0.1, "compiled": 0.02}
    expensive = Fake("compiled", estimate=60.0)
    planner, _ = _planner(tmp_path / "a", seconds, expensive)
    plan = planner.plan(
        _target(planner, model, sampler), work_calls=10
    )  # 10 calls of 1 s: at most 10 s to save
    assert plan.backend == "eager" and expensive.built == 0
    assert plan.results["compiled"].status == "skipped"
    assert (
        "~60 s" in plan.results["compiled"].reason
        and "10.0 s of eager work" in plan.results["compiled"].reason
    )
    # the same work with the artifact cached: nothing to pay, so it is built and taken
    cached = Fake("compiled", estimate=60.0, cached=True)
    planner, _ = _planner(tmp_path / "b", seconds, cached)
    plan = planner.plan(_target(planner, model, sampler), work_calls=10)
    assert plan.backend == "compiled" and plan.results["compiled"].cached
    # enough work pays for it
    big = Fake("compiled", estimate=60.0)
    planner, _ = _planner(tmp_path / "c", seconds, big)
    assert planner.plan(_target(planner, model, sampler), work_calls=100).backend == "compiled"


def test_repeated_small_runs_pay_for_the_build_once_their_work_adds_up(tmp_path, model, sampler):
    seconds = {"eager": 0.1, "compiled": 0.02}
    choices = []
    for _ in range(7):
        fake = Fake("compiled", estimate=55.0)
        planner, _ = _planner(tmp_path, seconds, fake)  # the same cache folder: a new process each time
        choices.append(planner.plan(_target(planner, model, sampler), work_calls=10).backend)
    # 10 s of eager work per run: the sixth run has seen 60 s >= 55 s
    assert choices == ["eager"] * 5 + ["compiled"] * 2


def test_a_second_plan_comes_from_the_cache_without_measuring(tmp_path, model, sampler):
    planner, timer = _planner(tmp_path, {"eager": 0.1, "fast": 0.04}, Fake("fast"))
    first = planner.plan(_target(planner, model, sampler), work_calls=5)
    assert not first.from_cache and timer.calls > 0
    planner, timer = _planner(tmp_path, {"eager": 0.1, "fast": 0.04}, Fake("fast", cached=True))
    second = planner.plan(_target(planner, model, sampler), work_calls=5)
    assert second.from_cache and timer.calls == 0
    assert second.backend == "fast" and second.speedup == pytest.approx(2.5)
    assert "plan cached" in second.line() and "cached)" in second.line()
    # another shape is another key
    third = planner.plan(_target(planner, model, sampler, batch=8), work_calls=5)
    assert not third.from_cache


def test_a_corrupt_decision_is_measured_again(tmp_path, model, sampler):
    planner, _ = _planner(tmp_path, {"eager": 0.1, "fast": 0.04}, Fake("fast"))
    plan = planner.plan(_target(planner, model, sampler))
    path = planner.cache.record_path(PLAN_KIND, plan.key)
    path.write_text(path.read_text().replace('"choice":"fast"', '"choice":"eager"'))
    planner, timer = _planner(tmp_path, {"eager": 0.1, "fast": 0.04}, Fake("fast"))
    again = planner.plan(_target(planner, model, sampler))
    assert not again.from_cache and timer.calls > 0 and again.backend == "fast"


def test_forced_backends(tmp_path, model, sampler):
    planner, timer = _planner(tmp_path, {}, Fake("fast"), Fake("missing", reason="needs a CUDA device"))
    plan = planner.plan(_target(planner, model, sampler), backend="eager")
    assert plan.backend == "eager" and timer.calls == 0
    assert plan.line().startswith("backend: eager (requested")
    with pytest.raises(BackendUnavailableError, match="'missing' cannot run here: needs a CUDA device"):
        planner.plan(_target(planner, model, sampler), backend="missing")


def test_real_candidates_skip_what_cannot_run_here_with_reasons(tmp_path, sampler):
    planner = Planner(DiskCache(tmp_path), timer=Timer({}))
    target = planner.target(
        lambda x, t: x * 0,
        sampler,
        (2, 2),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cond=None,
        uncond=None,
        guidance_scale=1.0,
    )
    reasons = {n: c.unavailable(target) for n, c in planner.candidates.items()}
    assert reasons["eager"] is None and reasons["compile"] is None
    assert reasons["onnxruntime"] == "the denoiser is not an nn.Module, so it cannot be exported"
    if not torch.cuda.is_available():
        assert reasons["cuda-graphs"].startswith("needs a CUDA device")
        assert reasons["tensorrt"].startswith("needs a CUDA device")
    assert planner.plan_key(target, planner.candidates) is None  # no weights to hash: nothing is stored


def test_planned_sampler_rechecks_a_choice_that_measures_slower(tmp_path, model, sampler):
    clock = Clock()
    fast = Fake("fast", clock=clock)
    planner, _ = _planner(tmp_path, {"eager": 0.1, "fast": 0.05}, fast, clock=clock)
    planned = PlannedSampler(model, sampler, planner=planner)
    planned.sample((4, 2), generator=torch.Generator().manual_seed(0))
    (plan,) = planned.plans.values()
    assert plan.backend == "fast"
    # the real calls take 1.5 s, eager was measured at 1.0 s a call: after RECHECK_CALLS calls, plan again
    for runner_call in range(RECHECK_CALLS):
        assert planned.plans, runner_call
        next(iter(planned.plans.values())).runner.seconds = 1.5
        planned.sample((4, 2), generator=torch.Generator().manual_seed(0))
    assert planned.plans == {}
    assert planner.cache.get(PLAN_KIND, plan.key) is None


def test_planned_sampler_plans_again_once_the_work_pays_for_a_skipped_build(tmp_path, model, sampler):
    clock = Clock()
    planner, _ = _planner(
        tmp_path, {"eager": 0.1, "compiled": 0.02}, Fake("compiled", estimate=2.5, clock=clock), clock=clock
    )
    planned = PlannedSampler(model, sampler, planner=planner)
    backends = []
    for _ in range(4):
        planned.sample((4, 2), generator=torch.Generator().manual_seed(0))
        backends.append(next(iter(planned.plans.values()), None))
    # 1 s of eager work per call: the third call has seen 3 s >= 2.5 s and the key is planned again
    assert [p.backend if p else None for p in backends] == ["eager", "eager", None, "compiled"]


def test_when_nothing_can_pay_eager_is_chosen_after_one_timed_probe(tmp_path, model, sampler):
    expensive = Fake("compiled", estimate=60.0)
    planner, timer = _planner(
        tmp_path, {"eager": 0.1, "compiled": 0.01}, expensive, Fake("gone", reason="no")
    )
    plan = planner.plan(_target(planner, model, sampler), work_calls=3)
    assert plan.backend == "eager" and expensive.built == 0
    assert timer.calls == 1  # the warm-up run shows that 3 calls cannot pay 60 s: nothing more is timed
    assert plan.results["eager"].s_per_call == pytest.approx(1.0)


def test_planned_sampler_runs_eager_keys_on_the_given_runner(tmp_path, model, sampler):
    class Own:
        calls = 0

        def sample(self, shape, **kwargs):
            Own.calls += 1
            return fastdiff.sample(model, sampler, shape, generator=kwargs["generator"], x_T=kwargs["x_T"])

    planner, _ = _planner(tmp_path, {"eager": 0.1})
    planned = PlannedSampler(model, sampler, planner=planner, eager=Own())
    out = planned.sample((4, 2), generator=torch.Generator().manual_seed(1))
    assert Own.calls == 1
    assert torch.equal(
        out, fastdiff.sample(model, sampler, (4, 2), generator=torch.Generator().manual_seed(1))
    )


def test_a_cached_choice_that_costs_more_to_load_than_this_work_saves_gives_way_to_eager(
    tmp_path, model, sampler
):
    def planner():
        clock = Clock()
        compiled = Fake("compiled", per_table=True, clock=clock, build_s=30.0)
        return _planner(tmp_path, {"eager": 0.1, "compiled": 0.02}, compiled, clock=clock)[0]

    # per-table candidates are timed on whole runs: 0.2 s a call against eager's 1.0 s
    assert planner().plan(_target(planner(), model, sampler), work_calls=100).backend == "compiled"
    small = planner()
    plan = small.plan(_target(small, model, sampler), work_calls=1)
    assert plan.from_cache and plan.backend == "eager"  # 30 s of compiling to save 0.8 s
    big = planner()
    plan = big.plan(_target(big, model, sampler), work_calls=100)
    assert plan.from_cache and plan.backend == "compiled"


@pytest.mark.parametrize(("load_s", "expected"), [(None, "eager"), (0.05, "exported")])
def test_a_cached_export_is_judged_by_the_load_measured_after_its_build(
    tmp_path, model, sampler, load_s, expected
):
    """The first run exports (not cached then) and measures the load apart; the next run, finding the export
    cached, weighs that load (0.05 s) against the 0.6 s its 4 calls save, not the LOAD_S prior (1 s) that would
    keep it on eager. Without a measured load the prior decides."""
    exported = Fake("exported", load_s=load_s)
    seconds = {"eager": 0.1, "exported": 0.085}  # 1.0 against 0.85 s a call
    first, _ = _planner(tmp_path, seconds, exported)
    assert first.plan(_target(first, model, sampler), work_calls=4).backend == "exported"
    exported.is_cached = True
    again, _ = _planner(tmp_path, seconds, exported)
    plan = again.plan(_target(again, model, sampler), work_calls=4)
    assert plan.from_cache and plan.backend == expected
    assert LOAD_S > 4 * (1.0 - 0.85)  # the premise: the prior alone would not pay


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (("auto", "auto", False), ("auto", "auto", False)),
        (("auto", "auto", True), ("compile", "auto", True)),
        (("auto", True, True), ("compile", True, True)),
        (("compile", "auto", False), ("compile", "auto", True)),
        (("auto", True, False), ("cuda-graphs", True, False)),
        (("cuda-graphs", "auto", False), ("cuda-graphs", True, False)),
        (("auto", False, False), ("eager", False, False)),
        (("eager", "auto", False), ("eager", False, False)),
        (("onnxruntime", "auto", False), ("onnxruntime", "auto", False)),
    ],
)
def test_resolve_backend(given, expected):
    assert resolve_backend(*given) == expected


@pytest.mark.parametrize(
    ("backend", "cuda_graphs", "compile"), [("eager", "auto", True), ("openvino", True, False)]
)
def test_resolve_backend_refuses_contradictions(backend, cuda_graphs, compile):
    with pytest.raises(ValueError, match="contradicts backend"):
        resolve_backend(backend, cuda_graphs, compile)


def test_a_fixed_cost_per_call_is_not_scaled_with_the_probe(tmp_path, model, sampler):
    class FixedPlusRows(Timer):
        def __call__(self, name, run, rows):
            self.calls += 1
            run()
            fixed, per_row = self.seconds[name]
            return fixed + per_row * rows

    # eager: 0.1 s a row, 3 s a call; "fast": 0.5 s of fixed cost per call and 0.01 s a row, 0.8 s a call.
    # One 3-row probe scaled 10x would put "fast" at 5.3 s a call, slower than eager.
    timer = FixedPlusRows({"eager": (0.0, 0.1), "fast": (0.5, 0.01)})
    fast = Fake("fast")
    planner = Planner(DiskCache(tmp_path), timer=timer, candidates={"eager": Eager(), "fast": fast})
    plan = planner.plan(_target(planner, model, sampler), work_calls=10)
    assert plan.backend == "fast"
    assert plan.results["fast"].s_per_call == pytest.approx(0.8)
    assert plan.results["eager"].s_per_call == pytest.approx(3.0)


def test_a_build_paid_at_planning_counts_before_a_skipped_one_is_reconsidered(tmp_path, model, sampler):
    clock = Clock()
    paid = Fake("paid", estimate=4.0, clock=clock, build_s=4.0)
    later = Fake("later", estimate=8.0)
    planner, _ = _planner(tmp_path, {"eager": 0.1, "paid": 0.05, "later": 0.01}, paid, later, clock=clock)
    planned = PlannedSampler(model, sampler, planner=planner, expected_calls=10)
    planned.sample((4, 2), generator=torch.Generator().manual_seed(0))
    (plan,) = planned.plans.values()
    # 10 s of eager work: "paid" spends 4 s of it, so "later" (8 s) needs 12 s of work to pay
    assert plan.backend == "paid" and later.built == 0
    assert plan.results["later"].status == "skipped"
    assert plan.results["later"].pays_at_s == pytest.approx(12.0)
    planned.sample((4, 2), generator=torch.Generator().manual_seed(0))
    assert list(planned.plans.values()) == [plan]  # the served calls have not paid for "later" yet

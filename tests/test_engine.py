import copy
import gc
import time
import warnings
import weakref

import pytest
import torch

import fastdiff
import fastdiff.engine.cpu_loop as cpu_loop
import fastdiff.engine.engine as engine_mod
from fastdiff import DDIMSampler, DDPMSampler, NoiseSchedule
from fastdiff.engine import SamplingEngine
from fastdiff.engine.graphs import CaptureError
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.samplers import build_sampler

SCHEDULE = NoiseSchedule.from_kind("linear")
SHAPE = (3, 1, 8, 8)
LABELS = torch.tensor([1, 4, 9])
SAMPLERS = {
    "ddpm": lambda: DDPMSampler(SCHEDULE, num_steps=8),
    "ddim-eta0": lambda: DDIMSampler(SCHEDULE, num_steps=8),
    "ddim-eta1": lambda: DDIMSampler(SCHEDULE, num_steps=8, eta=1.0),
}


class FakeGraphRunner:
    """A CPU stand-in for `CudaGraphRunner` with the same contract: warm `step` up, then 'capture' `body` (a CUDA
    capture runs its Python once, here with `capturing` set so a denoiser can refuse), then replay `body`."""

    captures = True
    capturing = False

    def __init__(self, step, body, reset):
        reset()
        step()
        reset()
        FakeGraphRunner.capturing = True
        try:
            body()
        except Exception as err:
            raise CaptureError(str(err)) from err
        finally:
            FakeGraphRunner.capturing = False
        self._body = body

    def replay(self):
        return self._body()


class FakeEngine(SamplingEngine):
    """The engine with graphs 'on' for CPU tensors, through the fake capture backend (backend "cuda-graphs"
    unless the test sets the flags itself)."""

    _graph_runner = FakeGraphRunner
    _graph_device = "cpu"

    def __init__(self, *args, **kwargs):
        if not {"backend", "cuda_graphs", "compile"} & set(kwargs):
            kwargs["backend"] = "cuda-graphs"
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module")
def unet():
    """A tiny class-conditional ADM U-Net with small random weights (the zero-initialised layers too)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("digits", model_channels=16, num_res_blocks=1, num_groups=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def toy(x, t, **_):
    return torch.tanh(0.7 * x + 1e-3 * t.float().reshape(-1, *([1] * (x.dim() - 1))) - 0.2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_engine(kind, denoiser, sampler, **kwargs):
    if kind == "eager":
        return SamplingEngine(denoiser, sampler, backend="eager", **kwargs)
    return FakeEngine(denoiser, sampler, graph_mode=kind, **kwargs)


@pytest.mark.parametrize("kind", ["eager", "step", "loop"])
@pytest.mark.parametrize("guidance", [1.0, 2.7])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_bitwise_parity_with_sample(unet, name, guidance, kind):
    sampler = SAMPLERS[name]()
    kwargs = {"cond": {"class_labels": LABELS}, "guidance_scale": guidance}
    eng = make_engine(kind, unet, sampler)
    expected = fastdiff.sample(unet, sampler, SHAPE, generator=gen(3), **kwargs)
    got = eng.sample(SHAPE, generator=gen(3), **kwargs)
    assert torch.isfinite(expected).all() and expected.std() > 0.1
    assert torch.equal(got, expected)
    # A second call reuses the buffers and gives the same result for the same seed.
    assert torch.equal(eng.sample(SHAPE, generator=gen(3), **kwargs), expected)
    assert eng.stats.cache_hits == 1 and eng.stats.captures == (kind != "eager")


@pytest.mark.parametrize("kind", ["eager", "loop"])
def test_parity_generator_list_and_x_T(unet, kind):
    sampler = SAMPLERS["ddpm"]()
    eng = make_engine(kind, unet, sampler)
    gens = lambda: [gen(s) for s in (5, 6, 7)]  # noqa: E731
    kwargs = {"cond": {"class_labels": LABELS}, "guidance_scale": 2.0}
    expected = fastdiff.sample(unet, sampler, SHAPE, generator=gens(), **kwargs)
    assert torch.equal(eng.sample(SHAPE, generator=gens(), **kwargs), expected)
    # Sample j depends only on generator j (up to the model's batch-size dependent rounding).
    alone = eng.sample(
        (1, 1, 8, 8), generator=[gen(6)], cond={"class_labels": LABELS[1:2]}, guidance_scale=2.0
    )
    torch.testing.assert_close(alone[0], expected[1], rtol=0, atol=1e-5)

    x_T = torch.randn(SHAPE, generator=gen(9))
    x_T_copy = x_T.clone()
    expected = fastdiff.sample(unet, sampler, SHAPE, x_T=x_T, generator=gen(1), **kwargs)
    assert torch.equal(eng.sample(SHAPE, x_T=x_T, generator=gen(1), **kwargs), expected)
    assert torch.equal(x_T, x_T_copy)


def test_explicit_uncond_and_function_denoiser():
    sampler = SAMPLERS["ddim-eta1"]()
    cond = {"scale": torch.full((2, 1), 0.5)}
    uncond = {"scale": torch.zeros(2, 1)}

    def model(x, t, scale):
        return toy(x, t) + scale * x

    expected = fastdiff.sample(
        model, sampler, (2, 5), generator=gen(), cond=cond, uncond=uncond, guidance_scale=3
    )
    for kind in ("eager", "step"):
        eng = make_engine(kind, model, sampler)
        got = eng.sample((2, 5), generator=gen(), cond=cond, uncond=uncond, guidance_scale=3)
        assert torch.equal(got, expected)


def test_guidance_scale_and_cond_values_change_without_new_capture(unet):
    sampler = SAMPLERS["ddim-eta0"]()
    eng = FakeEngine(unet, sampler)
    for w, labels in ((2.0, LABELS), (3.5, LABELS.flip(0)), (2.0, LABELS)):
        kwargs = {"cond": {"class_labels": labels}, "guidance_scale": w}
        expected = fastdiff.sample(unet, sampler, SHAPE, generator=gen(), **kwargs)
        assert torch.equal(eng.sample(SHAPE, generator=gen(), **kwargs), expected)
    assert eng.stats.captures == 1 and eng.stats.cache_hits == 2


def test_callback_and_progress_match_sample(unet):
    sampler = SAMPLERS["ddpm"]()
    kwargs = {"cond": {"class_labels": LABELS}, "guidance_scale": 1.5}
    expected, got = [], []
    ref = fastdiff.sample(unet, sampler, SHAPE, generator=gen(), callback=expected.append, **kwargs)
    for kind in ("eager", "loop"):
        got.clear()
        eng = make_engine(kind, unet, sampler)
        out = eng.sample(SHAPE, generator=gen(), callback=got.append, progress=True, **kwargs)
        assert torch.equal(out, ref)
        assert len(got) == len(expected) == sampler.num_steps
        for a, b in zip(got, expected, strict=True):
            assert a.keys() == b.keys() and a["i"] == b["i"] and a["t"] == b["t"]
            for key in ("x", "x0", "model_output"):
                assert torch.equal(a[key], b[key]), key
    # With a callback the loop-mode engine captured a step graph for that call.
    assert next(iter(eng._cache.values())).mode == "step"


def test_noise_drawn_in_chunks(unet, monkeypatch):
    sampler = SAMPLERS["ddpm"]()
    monkeypatch.setattr(engine_mod, "NOISE_BUFFER_BYTES", 3 * 4 * 64 * 2)  # two rows of noise
    expected = fastdiff.sample(unet, sampler, SHAPE, generator=gen(2))
    assert torch.equal(
        SamplingEngine(unet, sampler, backend="eager").sample(SHAPE, generator=gen(2)), expected
    )
    eng = FakeEngine(unet, sampler, graph_mode="loop")
    with pytest.warns(RuntimeWarning, match="NOISE_BUFFER_BYTES"):
        got = eng.sample(SHAPE, generator=gen(2))
    assert torch.equal(got, expected)
    (entry,) = eng._cache.values()
    assert entry.mode == "step" and entry.rows == 2 and entry.noise.shape[0] == 3


def test_cache_lru_over_1000_alternating_calls():
    sampler = DDIMSampler(SCHEDULE, num_steps=2, eta=1.0)
    eng = FakeEngine(toy, sampler, max_graphs=2)
    shapes = [(2, 3), (5, 3)]
    buffers = {}
    for k in range(1000):
        shape = shapes[k % 2]
        out = eng.sample(shape, generator=gen(k))
        assert out.shape == shape and len(eng._cache) <= 2
        (entry,) = (e for e in eng._cache.values() if tuple(e.x.shape) == shape)
        buffers.setdefault(shape, (entry.x, entry.noise, entry.counter))
        assert all(a is b for a, b in zip(buffers[shape], (entry.x, entry.noise, entry.counter), strict=True))
    assert torch.equal(out, fastdiff.sample(toy, sampler, shapes[1], generator=gen(999)))
    assert (eng.stats.captures, eng.stats.cache_hits, eng.stats.evictions) == (2, 998, 0)

    # Three shapes in turn through two slots: every call evicts, and evicted buffers are freed at once (with the
    # cyclic garbage collector off, nothing waits for it).
    eng = FakeEngine(toy, sampler, max_graphs=2)
    refs = {}
    gc.disable()
    try:
        for k in range(1000):
            eng.sample((k % 3 + 1, 3), generator=gen(k))
            assert len(eng._cache) <= 2
            refs.update((id(e), weakref.ref(e)) for e in eng._cache.values())
            assert sum(r() is not None for r in refs.values()) <= 2
    finally:
        gc.enable()
    assert eng.stats.evictions == 998 and eng.stats.captures == 1000


def test_moved_weights_capture_anew(unet):
    """A graph replays the weights' addresses: new storage (a cast or a move and back) is a new key; weights
    loaded in place keep the graph, which then reads them."""
    model = copy.deepcopy(unet)
    sampler = SAMPLERS["ddim-eta1"]()
    eng = FakeEngine(model, sampler)
    eng.sample(SHAPE, generator=gen())
    for p in model.parameters():
        p.data = p.data.clone()
    got = eng.sample(SHAPE, generator=gen())
    assert (eng.stats.captures, eng.stats.cache_misses) == (2, 2)
    torch.testing.assert_close(got, fastdiff.sample(model, sampler, SHAPE, generator=gen()), rtol=0, atol=0)
    with torch.no_grad():
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    got = eng.sample(SHAPE, generator=gen())
    assert eng.stats.captures == 2 and eng.stats.cache_hits == 1 and eng.stats.weight_refreshes == 1
    torch.testing.assert_close(got, fastdiff.sample(model, sampler, SHAPE, generator=gen()), rtol=0, atol=0)


def test_returning_to_a_shape_reuses_its_graph():
    eng = FakeEngine(toy, SAMPLERS["ddpm"](), max_graphs=3)
    for shape in [(1, 2), (4, 2), (1, 2), (2, 2), (4, 2), (1, 2)]:
        eng.sample(shape, generator=gen())
    assert (eng.stats.captures, eng.stats.cache_hits, eng.stats.cache_misses) == (3, 3, 3)
    eng.sample((3, 2), generator=gen())  # evicts the least recently used, (2, 2)
    eng.sample((2, 2), generator=gen())
    assert eng.stats.evictions == 2 and eng.stats.captures == 5


def test_uncapturable_denoiser_falls_back_once(unet):
    sampler = SAMPLERS["ddpm"]()

    def refuses_capture(x, t, **cond):
        if FakeGraphRunner.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return unet(x, t, **cond)

    refuses_capture.null_cond = unet.null_cond
    kwargs = {"cond": {"class_labels": LABELS}, "guidance_scale": 2.0}
    expected = fastdiff.sample(unet, sampler, SHAPE, generator=gen(), **kwargs)
    eng = FakeEngine(refuses_capture, sampler, graph_mode="loop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = eng.sample(SHAPE, generator=gen(), **kwargs)
        second = eng.sample((2, 1, 8, 8), generator=gen(), cond={"class_labels": LABELS[:2]})
    assert [str(w.message).count("could not be captured") for w in caught] == [1]
    assert torch.equal(first, expected)
    assert torch.equal(second, fastdiff.sample(unet, sampler, (2, 1, 8, 8), generator=gen(),
                                               cond={"class_labels": LABELS[:2]}))  # fmt: skip
    assert eng.stats.eager_fallbacks == 1 and eng.stats.captures == 0
    assert all(not e.graphs and e.mode == "step" for e in eng._cache.values())


def test_errors_outside_capture_are_raised_not_swallowed():
    eng = FakeEngine(lambda x, t: x[:, :1], SAMPLERS["ddim-eta0"]())
    with pytest.raises(ValueError, match="denoiser returned"):
        eng.sample((2, 3))
    assert eng.stats.eager_fallbacks == 0


def test_warmup_then_sample_hits_the_cache(unet):
    sampler = SAMPLERS["ddpm"]()
    kwargs = {"cond": {"class_labels": LABELS}, "guidance_scale": 2.0}
    for kind in ("eager", "loop"):
        eng = make_engine(kind, unet, sampler)
        assert eng.warmup(SHAPE, **kwargs) >= 0
        assert eng.stats.captures == (kind != "eager") and eng.stats.cache_misses == 1
        expected = fastdiff.sample(unet, sampler, SHAPE, generator=gen(), **kwargs)
        assert torch.equal(eng.sample(SHAPE, generator=gen(), **kwargs), expected)
        assert eng.stats.cache_hits == 1 and eng.stats.cache_misses == 1


def test_nested_and_constant_conditioning():
    def model(x, t, extra, mode):
        return toy(x, t) * extra["gain"] + (0.1 if mode == "shift" else 0.0)

    sampler = SAMPLERS["ddim-eta0"]()
    eng = FakeEngine(model, sampler)
    for mode in ("shift", "none", "shift"):
        cond = {"extra": {"gain": torch.full((2, 1), 0.9)}, "mode": mode}
        expected = fastdiff.sample(model, sampler, (2, 4), generator=gen(), cond=cond)
        assert torch.equal(eng.sample((2, 4), generator=gen(), cond=cond), expected)
    assert eng.stats.captures == 2  # a constant is baked into the graph, so each value has its own key
    with pytest.raises(TypeError, match="cond values"):
        eng.sample((2, 4), cond={"extra": {"gain": torch.ones(2, 1)}, "mode": bytearray(b"unhashable")})


def test_argument_errors(unet):
    sampler = SAMPLERS["ddim-eta0"]()
    with pytest.raises(ValueError, match="cuda_graphs"):
        SamplingEngine(unet, sampler, cuda_graphs=True)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="cuda_graphs"):
            SamplingEngine(unet, sampler, cuda_graphs=bad)
    with pytest.raises(ValueError, match="graph_mode"):
        SamplingEngine(unet, sampler, graph_mode="whole")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_graphs"):
            SamplingEngine(unet, sampler, max_graphs=bad)
    with pytest.raises(TypeError, match="compile"):
        SamplingEngine(unet, sampler, compile="yes")
    with pytest.raises(TypeError, match="sampler"):
        SamplingEngine(unet, object())
    with pytest.raises(TypeError, match="denoiser"):
        SamplingEngine("unet", sampler)

    eng = SamplingEngine(unet, sampler, backend="eager")
    for shape in ((), (3,), (0, 1, 8, 8), (3, -1, 8, 8)):
        with pytest.raises(ValueError, match="shape"):
            eng.sample(shape)
    x_T = torch.randn(SHAPE)
    x_T[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_T"):
        eng.sample(SHAPE, x_T=x_T)
    with pytest.raises(ValueError, match="x_T"):
        eng.sample(SHAPE, x_T=torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="x_T"):
        eng.sample(SHAPE, x_T=torch.zeros(SHAPE, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance_scale"):
        eng.sample(SHAPE, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        eng.sample(SHAPE, cond={"class_labels": LABELS}, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="generator list"):
        eng.sample(SHAPE, generator=[gen(), gen()])
    with pytest.raises(ValueError, match="cuda_graphs=True needs cpu"):
        FakeEngine(toy, sampler, cuda_graphs=True).sample((2, 3), device="meta")


@pytest.mark.parametrize("graph_mode", ["step", "loop"])
def test_compile_matches_eager(graph_mode):
    """compile=True on a tiny model, one compiled step or the whole loop as one while_loop, within 1e-4 of the
    eager engine; the warm-up pays the compilation and the next call reuses it."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=1, time_embed_dim=16).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=4, eta=1.0)
    expected = SamplingEngine(model, sampler, backend="eager").sample((8, 2), generator=gen())
    eng = SamplingEngine(model, sampler, compile=True, graph_mode=graph_mode)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # neither mode may fall back
        warm = eng.warmup((8, 2))
        got = eng.sample((8, 2), generator=gen())
    assert time.perf_counter() - start >= warm
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert eng.stats.cache_hits == 1 and eng.stats.eager_fallbacks == 0
    assert [key[0] for key in eng._cache] == [graph_mode]


def test_each_compiled_entry_has_its_own_recompile_budget():
    """Dynamo counts compiled variants per code object against its recompile limit; engine entries of different
    table structures (DDIM, DPM-Solver++ with history) used to share one method's code, so past the limit a
    process ran the loop uncompiled. With the limit at 1, both engines still compile a graph of their own."""
    from torch._dynamo.utils import counters

    model = MLPDenoiser(hidden=16, num_layers=1, time_embed_dim=8).eval()
    samplers = [DDIMSampler(SCHEDULE, num_steps=3), build_sampler("dpmpp-2m", SCHEDULE, 3)]

    def limits_hit() -> int:
        return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason)

    with torch._dynamo.config.patch(recompile_limit=1):
        compiled, hit = counters["frames"]["ok"], limits_hit()
        for sampler in samplers:
            eng = SamplingEngine(model, sampler, compile=True, graph_mode="loop")
            expected = SamplingEngine(model, sampler, backend="eager").sample((2, 2), generator=gen())
            torch.testing.assert_close(eng.sample((2, 2), generator=gen()), expected, rtol=0, atol=1e-4)
        assert counters["frames"]["ok"] - compiled == len(samplers) and limits_hit() == hit


class _TableProbe(torch.nn.Module):
    """Its `timestep_table` differs from what it computes from t alone, so a result shows which one was used."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.9))

    def timestep_table(self, t: torch.Tensor) -> torch.Tensor:
        return (1e-3 * t.float() + 0.25).view(-1, 1) * self.scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, time_row: torch.Tensor | None = None) -> torch.Tensor:
        row = (1e-3 * t.float()).view(-1, 1) if time_row is None else time_row
        return self.scale * x + row


def test_compiled_loop_gives_each_step_its_timestep_table_row():
    """The compiled while_loop computes a denoiser's `timestep_table` once a run and passes row i at step i:
    equal to a loop that passes each step's row itself, not to one that never does; weights written between
    runs are read by the next run's table."""
    torch.manual_seed(0)
    probe = _TableProbe()
    sampler = DDIMSampler(SCHEDULE, num_steps=5, eta=1.0)

    def with_rows(x, t):
        return probe(x, t, time_row=probe.timestep_table(t))

    eng = SamplingEngine(probe, sampler, compile=True, graph_mode="loop")
    for scale in (0.9, 0.5):
        with torch.no_grad():
            probe.scale.fill_(scale)
        got = eng.sample((3, 2), generator=gen())
        torch.testing.assert_close(
            got, fastdiff.sample(with_rows, sampler, (3, 2), generator=gen()), rtol=0, atol=1e-5
        )
        assert (got - fastdiff.sample(probe, sampler, (3, 2), generator=gen())).abs().max() > 1e-2
    assert eng.stats.eager_fallbacks == 0


@pytest.mark.parametrize("threshold, chosen", [(float("inf"), "loop"), (0.0, "step")])
def test_auto_times_compiled_steps_then_picks_the_loop_or_steps(monkeypatch, threshold, chosen):
    """graph_mode="auto" on the CPU compile times the first compiled steps and runs the rest as one while_loop
    when a step is quicker than LOOP_BELOW_SECONDS (forced both ways here); a callback always steps."""
    monkeypatch.setattr(cpu_loop, "LOOP_BELOW_SECONDS", threshold)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=1, time_embed_dim=16).eval()
    sampler = DDPMSampler(SCHEDULE, num_steps=8)
    expected = SamplingEngine(model, sampler, backend="eager").sample((8, 2), generator=gen())
    eng = SamplingEngine(model, sampler, compile=True)
    first = eng.sample((8, 2), generator=gen(), progress=True)
    (entry,) = eng._cache.values()
    assert entry.key[0] == "auto" and entry.mode == chosen
    assert entry.loop_verified == (chosen == "loop")
    second = eng.sample((8, 2), generator=gen())
    for got in (first, second):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert eng.stats.cache_hits == 1 and eng.stats.eager_fallbacks == 0
    seen = []
    got = eng.sample((8, 2), generator=gen(), callback=lambda info: seen.append(info["i"]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert seen == list(range(8))
    assert sorted(key[0] for key in eng._cache) == ["auto", "step"]


@pytest.mark.parametrize("graph_mode", ["loop", "auto"])
def test_compiled_loop_that_cannot_trace_falls_back_to_steps(monkeypatch, graph_mode):
    """A denoiser with data-dependent Python cannot be a while_loop body: one warning, then per-step compiles
    (which graph-break around the host read) give the eager engine's result, from the step the loop was to
    start at (0 for "loop", after the timed steps for "auto")."""
    monkeypatch.setattr(cpu_loop, "LOOP_BELOW_SECONDS", float("inf"))
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=1, time_embed_dim=16).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=10, eta=1.0)  # more steps than auto times

    def host_read(x, t):
        return model(x, t) * (2.0 if int(t[0]) > 500 else 1.0)

    expected = SamplingEngine(host_read, sampler, backend="eager").sample((8, 2), generator=gen())
    eng = SamplingEngine(host_read, sampler, compile=True, graph_mode=graph_mode)
    with pytest.warns(RuntimeWarning, match="could not be compiled as one torch.while_loop"):
        got = eng.sample((8, 2), generator=gen())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert eng.stats.eager_fallbacks == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = eng.sample((8, 2), generator=gen())
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-4)
    assert [key[0] for key in eng._cache] == ["step"]
    assert eng.stats.eager_fallbacks == 1 and eng.stats.cache_hits == 1


def test_warmup_compiles_what_sample_runs(monkeypatch):
    """After warmup (on zeros, no generator drawn) the auto engine has chosen and compiled the loop."""
    monkeypatch.setattr(cpu_loop, "LOOP_BELOW_SECONDS", float("inf"))
    model = MLPDenoiser(hidden=32, num_layers=1, time_embed_dim=16).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=10)  # more steps than auto times
    eng = SamplingEngine(model, sampler, compile=True)
    eng.warmup((4, 2))
    (entry,) = eng._cache.values()
    assert entry.mode == "loop" and entry.loop_verified
    expected = SamplingEngine(model, sampler, backend="eager").sample((4, 2), generator=gen())
    torch.testing.assert_close(eng.sample((4, 2), generator=gen()), expected, rtol=0, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_unet(unet):
    return copy.deepcopy(unet).cuda()


CUDA_TOL = {"rtol": 1e-4, "atol": 1e-4}  # the Triton step kernel against the PyTorch reference, 8 steps


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("graph_mode", ["step", "loop"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cuda_graph_parity(cuda_unet, name, graph_mode):
    model = cuda_unet
    sampler = SAMPLERS[name]()
    labels = LABELS.cuda()
    eng = SamplingEngine(model, sampler, cuda_graphs=True, graph_mode=graph_mode)
    for w in (1.0, 2.5):
        kwargs = {"cond": {"class_labels": labels}, "guidance_scale": w}
        expected = fastdiff.sample(
            model, sampler, SHAPE, generator=torch.Generator("cuda").manual_seed(0), **kwargs
        )
        got = eng.sample(SHAPE, generator=torch.Generator("cuda").manual_seed(0), **kwargs)
        torch.testing.assert_close(got, expected, **CUDA_TOL)
    assert eng.stats.captures == 2 and eng.stats.eager_fallbacks == 0


@pytest.mark.cuda
@cuda
def test_cuda_graph_replay_with_changing_batch(cuda_unet):
    model = cuda_unet
    sampler = SAMPLERS["ddpm"]()
    eng = SamplingEngine(model, sampler, backend="eager", max_graphs=2)
    batches = [3, 5, 3, 1, 5, 3]
    for b in batches:
        labels = torch.arange(b, device="cuda") % 10
        kwargs = {"cond": {"class_labels": labels}, "guidance_scale": 2.0}
        g = [torch.Generator("cuda").manual_seed(s) for s in range(b)]
        expected = fastdiff.sample(model, sampler, (b, 1, 8, 8), generator=g, **kwargs)
        g = [torch.Generator("cuda").manual_seed(s) for s in range(b)]
        torch.testing.assert_close(eng.sample((b, 1, 8, 8), generator=g, **kwargs), expected, **CUDA_TOL)
        assert len(eng._cache) <= 2
    assert (eng.stats.captures, eng.stats.cache_hits, eng.stats.evictions) == (5, 1, 3)


@pytest.mark.cuda
@cuda
def test_cuda_uncapturable_denoiser_falls_back(cuda_unet):
    model = cuda_unet
    sampler = SAMPLERS["ddim-eta1"]()

    def host_sync(x, t):
        return model(x, t) * float(t[0] >= 0)  # reads a device value: not capturable

    expected = fastdiff.sample(model, sampler, SHAPE, generator=torch.Generator("cuda").manual_seed(0))
    eng = SamplingEngine(host_sync, sampler, backend="eager")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = eng.sample(SHAPE, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    torch.testing.assert_close(got, expected, **CUDA_TOL)
    assert eng.stats.eager_fallbacks == 1


# -- Table v2 in the engine: history, xs, k_in, init_sigma and learned variance ------------------------------------


def _multistep_sampler(n=6):
    """A hand-built table with every v2 feature: 2 history slots of x0, the xs corrector, k_in, init_sigma and
    learned-range variance (the model returns 2C channels), noise on some rows."""
    from fastdiff.samplers import Sampler
    from fastdiff.table import StepTable

    g = torch.Generator().manual_seed(40)

    def col(scale=0.2):
        return (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * scale

    f1, f2 = col(), col()
    f1[0] = f2[:2] = 0.0
    table = StepTable.from_columns(
        SCHEDULE.timesteps(n, "leading"),
        kind="test-multistep",
        history="x0",
        history_slots=2,
        uses_xs=True,
        learned_variance="learned_range",
        init_sigma=1.5,
        k_in=1 + col(),
        a=1 + col(),
        b=-0.5 + col(),
        q=1.0,
        xc_x=0.9 + col(),
        xc_s=col(),
        xc_0=col(),
        xc_1=col(),
        c=0.5 + col(),
        d=col(),
        e=0.5 + col(),
        f1=f1,
        f2=f2,
        s=torch.tensor([0.1, 0.0, 0.2, 0.0, 0.1, 0.0], dtype=torch.float64)[:n],
        lv0=-2 + col(),
        lv1=col(),
    )

    class _Hand(Sampler):
        def __init__(self):
            self.table, self.schedule, self.prediction_type = table, SCHEDULE, "epsilon"

    return _Hand()


def toy_2c(x, t, **_):
    tt = 1e-3 * t.float().reshape(-1, *([1] * (x.dim() - 1)))
    return torch.cat([torch.tanh(0.7 * x + tt - 0.2), torch.sin(x - tt)], dim=1)


@pytest.mark.parametrize("kind", ["eager", "step", "loop"])
def test_multistep_table_engine_is_bitwise_the_loop(kind):
    sampler = _multistep_sampler()
    eng = make_engine(kind, toy_2c, sampler)
    expected = fastdiff.sample(toy_2c, sampler, SHAPE, generator=gen(4))
    assert torch.isfinite(expected).all() and expected.std() > 0.1
    # twice: the history and xs buffers are zeroed per call, so the second call does not see the first's state
    for _ in range(2):
        assert torch.equal(eng.sample(SHAPE, generator=gen(4)), expected)
    x_T = torch.randn(SHAPE, generator=gen(5))
    assert torch.equal(
        eng.sample(SHAPE, x_T=x_T, generator=gen(6)),
        fastdiff.sample(toy_2c, sampler, SHAPE, x_T=x_T, generator=gen(6)),
    )
    seen = []
    eng.sample(SHAPE, generator=gen(4), callback=lambda d: seen.append(d["model_output"].shape))
    assert seen == [SHAPE] * len(sampler.table)  # the C channels of m, not the 2C output


def test_multistep_table_compiled_while_loop_matches_the_loop():
    # One compile (about a minute on 2 cores): the CPU while_loop carries history and xs with x and the counter.
    model = MLPDenoiser(dim=4, hidden=32, num_layers=1, time_embed_dim=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)

    def denoiser(x, t):
        out = model(x, t)
        return torch.cat([out, torch.tanh(out)], dim=1)

    sampler = _multistep_sampler()
    expected = fastdiff.sample(denoiser, sampler, (2, 4), generator=gen(7))
    eng = SamplingEngine(denoiser, sampler, compile=True, graph_mode="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to compiled steps would warn
        got = eng.sample((2, 4), generator=gen(7))
    assert eng.stats.eager_fallbacks == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

"""Weight swaps under the engine's graphs, graph_unet and the compiled CPU loop: never a stale replay.

For each way of changing weights: sample, change, sample again; the second result equals eager sampling with the
new weights (bitwise through the fake capture runner, which replays the same ops; 1e-5 for the compiled loop) and
differs from the first. In-place changes must not capture or compile again; anything else must.
"""

import copy
import gc

import numpy as np
import pytest
import torch
from test_accelerate import with_lora
from test_engine import FakeEngine
from test_integrations_diffusers import fake_graphs  # noqa: F401  (a fixture)
from torch import nn

import fastdiff
from fastdiff import DDIMSampler, NoiseSchedule
from fastdiff.engine.weights import WeightsWatch, update_weights
from fastdiff.errors import StaleWeightsError
from fastdiff.integrations.diffusers import accelerate_pipeline, graph_unet
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig

SCHEDULE = NoiseSchedule.from_kind("linear")
SHAPE = (2, 1, 8, 8)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def our_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig.preset("digits", model_channels=8, num_res_blocks=1, num_groups=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def scaled(model: nn.Module, factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor for k, v in model.state_dict().items()}


def load_state_dict(model):
    model.load_state_dict(scaled(model, 1.5))


def copy_in_place(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p * 1.5)


def data_copy_in_place(model):
    for p in model.parameters():
        p.data.copy_(p.data * 1.5)


def new_parameter(model):
    conv = model.input_blocks[0][0]
    conv.weight = nn.Parameter(conv.weight.detach() * 1.5)


def data_reassigned(model):
    for p in model.parameters():
        p.data = p.data * 1.5


def via_update_weights(model):
    update_weights(model, scaled(model, 1.5))


CHANGES = {
    # name: (change, captures after it, calls that saw weights written in place). `param.data.copy_` writes in
    # place without a version bump (`.data` has its own counter): the graph reads it all the same, unseen.
    "load_state_dict": (load_state_dict, 1, 1),
    "copy_": (copy_in_place, 1, 1),
    "param.data.copy_": (data_copy_in_place, 1, 0),
    "update_weights": (via_update_weights, 1, 1),
    "new nn.Parameter": (new_parameter, 2, 0),
    "param.data = ...": (data_reassigned, 2, 0),
}


# ---- the fingerprint ------------------------------------------------------------------------------------------


def test_fingerprint_tells_in_place_writes_from_new_layouts():
    model = our_unet()
    watch = WeightsWatch(model)
    first = watch.state()
    assert watch.state() == first
    copy_in_place(model)
    second = watch.state()
    assert second.layout == first.layout and second.versions != first.versions
    new_parameter(model)
    assert watch.state().layout != second.layout
    before = watch.state()
    model.to(torch.float64)
    assert watch.state().layout != before.layout
    before = watch.state()
    model.register_buffer("extra", torch.zeros(3))
    assert watch.state().layout != before.layout
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        WeightsWatch(lambda x: x)


# ---- the engine (capture logic through the fake runner) ------------------------------------------------------


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_engine_after_each_weight_change(change):
    fn, captures, refreshes = CHANGES[change]
    model = our_unet()
    sampler = DDIMSampler(SCHEDULE, num_steps=3, eta=1.0)
    eng = FakeEngine(model, sampler)
    first = eng.sample(SHAPE, generator=gen())
    fn(model)
    second = eng.sample(SHAPE, generator=gen())
    torch.testing.assert_close(
        second, fastdiff.sample(model, sampler, SHAPE, generator=gen()), rtol=0, atol=0
    )
    assert (second - first).abs().max() > 1e-3
    assert (eng.stats.captures, eng.stats.weight_refreshes) == (captures, refreshes)
    eng.sample(SHAPE, generator=gen())  # unchanged weights: a plain replay
    assert (eng.stats.captures, eng.stats.weight_refreshes) == (captures, refreshes)


def test_engine_after_a_dtype_change():
    model = our_unet()
    sampler = DDIMSampler(SCHEDULE, num_steps=3)
    eng = FakeEngine(model, sampler)
    x_T = torch.randn(SHAPE, generator=gen())
    eng.sample(SHAPE, x_T=x_T)
    model.to(torch.bfloat16)
    got = eng.sample(SHAPE, x_T=x_T.bfloat16())
    assert got.dtype == torch.bfloat16 and eng.stats.captures == 2
    torch.testing.assert_close(
        got, fastdiff.sample(model, sampler, SHAPE, x_T=x_T.bfloat16()), rtol=0, atol=0
    )


def test_callback_may_write_in_place_but_not_replace():
    model = our_unet()
    sampler = DDIMSampler(SCHEDULE, num_steps=3)

    def halve_at_step_1(info):
        if info["i"] == 1:
            with torch.no_grad():
                for p in target.parameters():
                    p.mul_(0.5)

    target = copy.deepcopy(model)
    ref = fastdiff.sample(target, sampler, SHAPE, generator=gen(), callback=halve_at_step_1)
    target = model
    got = FakeEngine(model, sampler).sample(SHAPE, generator=gen(), callback=halve_at_step_1)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    eng = FakeEngine(model, sampler)
    with pytest.raises(StaleWeightsError, match="during sample"):
        eng.sample(SHAPE, generator=gen(), callback=lambda info: new_parameter(model))


# ---- update_weights ---------------------------------------------------------------------------------------------


def test_update_weights_through_every_wrapper_and_its_errors():
    model = our_unet()
    eng = FakeEngine(model, DDIMSampler(SCHEDULE, num_steps=2))
    sd = scaled(model, 0.5)
    for target in (eng, model, torch.compile(model), fastdiff.as_denoiser(model)):
        assert update_weights(target, sd) == list(sd)
        torch.testing.assert_close(model.state_dict(), sd, rtol=0, atol=0)
        sd = scaled(model, 0.5)
    key = next(iter(sd))
    unchanged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"key.*does not"):
        update_weights(model, {key: sd[key], "nope.weight": sd[key]})
    with pytest.raises(ValueError, match="has shape"):
        update_weights(model, {key: sd[key][:1]})
    with pytest.raises(ValueError, match=r"is torch.float64.*cast it first"):
        update_weights(model, {key: sd[key].double()})
    with pytest.raises(TypeError, match="must be a tensor"):
        update_weights(model, {key: 1.0})
    with pytest.raises(ValueError, match="strict=True"):
        update_weights(model, {key: sd[key]}, strict=True)
    with pytest.raises(TypeError, match="must be a mapping"):
        update_weights(model, [sd[key]])
    with pytest.raises(TypeError, match="update_weights takes"):
        update_weights(lambda x, t: x, sd)
    torch.testing.assert_close(model.state_dict(), unchanged, rtol=0, atol=0)  # nothing half-written


# ---- the compiled CPU loop (real inductor: two compiles) ---------------------------------------------------


def test_compiled_loop_reads_in_place_weights_and_recompiles_for_new_ones():
    """Inductor runs without freezing, so the compiled while_loop takes the parameters as inputs: weights written
    in place are read with no recompile. A new Parameter gets a new entry; dynamo's guards (shapes, dtypes) let
    it reuse the compiled code, which reads the new parameter: the result is right either way."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=4, eta=1.0)
    eng = fastdiff.SamplingEngine(model, sampler, compile=True, graph_mode="loop")
    shape = (3, 2)
    first = eng.sample(shape, generator=gen())
    frames = counters["frames"]["ok"]
    update_weights(eng, scaled(model, 1.5))
    second = eng.sample(shape, generator=gen())
    torch.testing.assert_close(
        second, fastdiff.sample(model, sampler, shape, generator=gen()), rtol=1e-5, atol=1e-5
    )
    assert (second - first).abs().max() > 1e-3
    assert counters["frames"]["ok"] == frames and eng.stats.weight_refreshes == 1
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    layer.weight = nn.Parameter(layer.weight.detach() * -1.0)
    third = eng.sample(shape, generator=gen())
    torch.testing.assert_close(
        third, fastdiff.sample(model, sampler, shape, generator=gen()), rtol=1e-5, atol=1e-5
    )
    assert (third - second).abs().max() > 1e-3
    assert eng.stats.cache_misses == 2


def test_compiled_loop_after_data_copy_load_state_dict_and_dtype():
    """The other changes on the real compiled while_loop: `param.data.copy_` (no version bump) and
    `load_state_dict` are read in place with no recompile and no new entry; `.to(float64)` is a new entry."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, num_layers=1).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=3, eta=1.0)
    eng = fastdiff.SamplingEngine(model, sampler, compile=True, graph_mode="loop")
    shape = (3, 2)
    previous = eng.sample(shape, generator=gen())
    frames = counters["frames"]["ok"]
    for change in (data_copy_in_place, load_state_dict):
        change(model)
        got = eng.sample(shape, generator=gen())
        ref = fastdiff.sample(model, sampler, shape, generator=gen())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert (got - previous).abs().max() > 1e-3, change.__name__
        previous = got
    assert counters["frames"]["ok"] == frames and eng.stats.cache_misses == 1
    model.to(torch.float64)
    got = eng.sample(shape, generator=gen(), dtype=torch.float64)
    ref = fastdiff.sample(model, sampler, shape, generator=gen(), dtype=torch.float64)
    assert got.dtype == torch.float64 and eng.stats.cache_misses == 2
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)


# ---- exported denoisers (ONNX Runtime, OpenVINO): they hold a copy, so any change must raise ------------------


def _export(fmt: str, model: nn.Module, folder) -> object:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        from fastdiff.export import OnnxDenoiser, to_onnx

        return OnnxDenoiser(to_onnx(model, folder / "m.onnx", sample_shape=(2, 2)), source=model)
    pytest.importorskip("openvino")
    from fastdiff.export.openvino import OpenVinoDenoiser, to_openvino

    return OpenVinoDenoiser(to_openvino(model, folder / "m.xml", sample_shape=(2, 2)), source=model)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_direct_call_after_a_data_write_raises(fmt, tmp_path):
    """A direct call (outside a sampling run) after `param.data.copy_`, which bumps no version counter: the
    bytes sampled from every weight differ, and the digest confirms the change; the exported values written
    back the same way are no change."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    denoiser = _export(fmt, model, tmp_path)
    x, t = torch.randn(3, 2, generator=gen(1)), torch.tensor([10, 500, 900])
    first = denoiser(x, t)
    data_copy_in_place(model)
    with pytest.raises(StaleWeightsError, match="re-export it: fastdiff.export.to_" + fmt):
        denoiser(x, t)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data.copy_(exported[name])
    torch.testing.assert_close(denoiser(x, t), first, rtol=0, atol=0)


def test_sampled_bytes_follow_data_writes_in_any_layout():
    """`WeightsWatch.sampled` reads weights in place, channels-last ones included: a `.data` write shows, a
    new storage is followed after `state()`, and a weight that does not fill one block of memory is left out."""
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    lin = nn.Linear(6, 5)
    module = nn.Sequential(conv, lin)
    watch = WeightsWatch(module)
    watch.state()
    before = watch.sampled()
    assert before.dtype == torch.uint8 and before.numel() == 4 * (16 + 8 + 16 + 5)
    conv.weight.data.mul_(2.0)
    assert not torch.equal(watch.sampled(), before)
    lin.weight = nn.Parameter(torch.randn(6, 5).t())  # a transposed view: not one block in the usual order
    watch.state()
    assert watch.sampled().numel() == 4 * (16 + 8 + 5)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_denoiser_never_samples_from_old_weights(fmt, tmp_path):
    """`param.data.copy_` bumps no version counter, so no per-call fingerprint sees it: the content checksum
    that every sampling run compares first does. A write of the exported values back is no change; the
    fingerprinted changes (update_weights, load_state_dict, a new Parameter, a cast) raise on the next call."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    denoiser = _export(fmt, model, tmp_path)
    sampler = DDIMSampler(SCHEDULE, num_steps=2)
    engine = fastdiff.SamplingEngine(denoiser, sampler, cuda_graphs=False)
    shape = (3, 2)
    first = fastdiff.sample(denoiser, sampler, shape, generator=gen())
    torch.testing.assert_close(
        first, fastdiff.sample(model, sampler, shape, generator=gen()), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(engine.sample(shape, generator=gen()), first, rtol=0, atol=0)
    data_copy_in_place(model)
    fix = "re-export it: fastdiff.export.to_" + fmt
    for run in (
        lambda: fastdiff.sample(denoiser, sampler, shape, generator=gen()),
        lambda: engine.sample(shape, generator=gen()),
        lambda: fastdiff.ddim_invert(denoiser, sampler, first),
    ):
        with pytest.raises(StaleWeightsError, match=fix):
            run()
    model.load_state_dict(exported)  # the exported values again: sampling goes on
    again = fastdiff.sample(denoiser, sampler, shape, generator=gen())
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    x, t = torch.randn(shape, generator=gen(1)), torch.tensor([10, 500, 900])

    def new_in_proj(model):
        model.in_proj.weight = nn.Parameter(model.in_proj.weight.detach() * 1.5)

    for change in (via_update_weights, load_state_dict, new_in_proj, lambda m: m.to(torch.float64)):
        change(model)
        with pytest.raises(StaleWeightsError, match=fix):
            denoiser(x, t)
        model.to(torch.float32).load_state_dict(exported)
        denoiser(x, t)


def test_a_models_own_check_weights_is_not_the_per_run_hook():
    class Checked(MLPDenoiser):
        def check_weights(self, strict):  # a model's own method, with its own meaning
            raise AssertionError("called by fastdiff")

    model = Checked(hidden=8, num_layers=1).eval()
    sampler = DDIMSampler(SCHEDULE, num_steps=1)
    assert fastdiff.sample(model, sampler, (2, 2), generator=gen()).shape == (2, 2)
    assert fastdiff.SamplingEngine(model, sampler).sample((2, 2), generator=gen()).shape == (2, 2)


# ---- a diffusers U-Net with LoRA adapters (peft) -------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers():
    pytest.importorskip("peft")
    return pytest.importorskip("diffusers")


def cond_unet(diffusers) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


def lora_state_dict(diffusers, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA for `cond_unet` in the peft format `load_lora_adapter` reads (no adapter name in the keys)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(with_lora(cond_unet(diffusers), "src", seed), adapter_name="src")


def adapted(diffusers) -> nn.Module:
    """An accelerated U-Net carrying adapters "a" (active) and "b", loaded by diffusers' own loader."""
    unet = fastdiff.accelerate(with_lora(cond_unet(diffusers), "a", seed=1), kernels="torch")
    unet.load_lora_adapter(lora_state_dict(diffusers, seed=2), prefix=None, adapter_name="b")
    unet.set_adapters("a")
    return unet


TEXT = {"encoder_hidden_states": torch.randn(1, 3, 16, generator=gen(7))}
LATENT = (1, 4, 8, 8)

LORA_CHANGES = {
    # name: change to the U-Net; each gives a new layout (adapter state or parameters), so a new capture
    "set_adapters(weights=...)": lambda unet, d: unet.set_adapters("a", weights=0.5),
    "set_adapters([a, b])": lambda unet, d: unet.set_adapters(["a", "b"], weights=[1.0, 0.7]),
    "fuse_lora": lambda unet, d: unet.fuse_lora(lora_scale=0.8),
    "unfuse_lora": lambda unet, d: (unet.fuse_lora(), unet.unfuse_lora(), unet.set_adapters("b")),
    "unload_lora": lambda unet, d: unet.unload_lora(),
    "load_lora_adapter": lambda unet, d: (
        unet.load_lora_adapter(lora_state_dict(d, seed=3), prefix=None, adapter_name="c"),
        unet.set_adapters("c"),
    ),
    "disable_lora": lambda unet, d: unet.disable_lora(),
}


@pytest.mark.parametrize("change", sorted(LORA_CHANGES))
def test_engine_follows_lora_changes(diffusers, change):
    unet = adapted(diffusers)
    denoiser = fastdiff.as_denoiser(unet)
    sampler = DDIMSampler(SCHEDULE, num_steps=2)
    eng = FakeEngine(denoiser, sampler)
    first = eng.sample(LATENT, generator=gen(), cond=TEXT)
    LORA_CHANGES[change](unet, diffusers)
    second = eng.sample(LATENT, generator=gen(), cond=TEXT)
    ref = fastdiff.sample(denoiser, sampler, LATENT, generator=gen(), cond=TEXT)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)
    assert (second - first).abs().max() > 1e-3
    assert eng.stats.captures == 2


def test_engine_in_place_lora_weights_and_dtype(diffusers):
    """New LoRA weights of the same shapes written in place: no capture; a dtype change: a capture."""
    unet = adapted(diffusers)
    denoiser = fastdiff.as_denoiser(unet)
    sampler = DDIMSampler(SCHEDULE, num_steps=2)
    eng = FakeEngine(denoiser, sampler)
    first = eng.sample(LATENT, generator=gen(), cond=TEXT)
    new = {k.replace(".weight", ".a.weight"): v for k, v in lora_state_dict(diffusers, seed=4).items()}
    update_weights(eng, new)
    second = eng.sample(LATENT, generator=gen(), cond=TEXT)
    torch.testing.assert_close(
        second, fastdiff.sample(denoiser, sampler, LATENT, generator=gen(), cond=TEXT), rtol=0, atol=0
    )
    assert (second - first).abs().max() > 1e-3
    assert (eng.stats.captures, eng.stats.weight_refreshes) == (1, 1)
    unet.to(torch.bfloat16)
    third = eng.sample(LATENT, generator=gen(), cond=TEXT)
    ref = fastdiff.sample(denoiser, sampler, LATENT, generator=gen(), cond=TEXT)
    torch.testing.assert_close(third, ref, rtol=0, atol=0)
    assert eng.stats.captures == 2


@pytest.mark.usefixtures("fake_graphs")
def test_alternating_adapters_keeps_memory_and_cache_bounded(diffusers):
    """100 switches between two adapters: two graphs in the engine and two in graph_unet, replayed in turn."""
    unet = adapted(diffusers)
    denoiser = fastdiff.as_denoiser(unet)
    sampler = DDIMSampler(SCHEDULE, num_steps=1)
    eng = FakeEngine(denoiser, sampler)
    results = {}
    for name in ("a", "b"):
        unet.set_adapters(name)
        results[name] = fastdiff.sample(denoiser, sampler, LATENT, generator=gen(), cond=TEXT)
    assert (results["a"] - results["b"]).abs().max() > 1e-3

    def tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for i in range(100):
        if i == 10:
            baseline = tensors()
        name = "ab"[i % 2]
        unet.set_adapters(name)
        got = eng.sample(LATENT, generator=gen(), cond=TEXT)
        assert torch.equal(got, results[name]), i
    assert tensors() <= baseline
    assert eng.stats.captures == 2 and len(eng._cache) == 2
    graphed = graph_unet(unet)
    x, t = torch.randn(LATENT, generator=gen(1)), torch.tensor(10)
    with torch.no_grad():
        for i in range(20):
            unet.set_adapters("ab"[i % 2])
            out = unet(x, t, **TEXT).sample
            del unet.forward
            torch.testing.assert_close(out, unet(x, t, **TEXT).sample, rtol=0, atol=0)
            unet.forward = graphed
    assert graphed.captures == 2 and len(graphed._cache) == 2


@pytest.mark.usefixtures("fake_graphs")
def test_graph_unet_follows_in_place_and_new_weights(diffusers):
    unet = adapted(diffusers)
    graphed = graph_unet(unet)
    x, t = torch.randn(LATENT, generator=gen(1)), torch.tensor(10)

    def eager():
        del unet.forward
        try:
            return unet(x, t, **TEXT).sample
        finally:
            unet.forward = graphed

    with torch.no_grad():
        first = unet(x, t, **TEXT).sample
        update_weights(graphed, scaled(unet, 1.2))
        second = unet(x, t, **TEXT).sample
        assert graphed.captures == 1 and (second - first).abs().max() > 1e-3
        torch.testing.assert_close(second, eager(), rtol=0, atol=0)
        data_copy_in_place(unet)  # in place, no version bump: read by the same graph
        third = unet(x, t, **TEXT).sample
        assert graphed.captures == 1 and (third - second).abs().max() > 1e-3
        torch.testing.assert_close(third, eager(), rtol=0, atol=0)
        unet.conv_in.weight = nn.Parameter(unet.conv_in.weight * 2)
        fourth = unet(x, t, **TEXT).sample
        assert graphed.captures == 2 and (fourth - third).abs().max() > 1e-3
        torch.testing.assert_close(fourth, eager(), rtol=0, atol=0)
        unet.to(torch.bfloat16)
        x, text = x.bfloat16(), {k: v.bfloat16() for k, v in TEXT.items()}
        fifth = unet(x, t, **text).sample
        assert graphed.captures == 3 and fifth.dtype == torch.bfloat16
        del unet.forward
        torch.testing.assert_close(fifth, unet(x, t, **text).sample, rtol=0, atol=0)


@pytest.mark.usefixtures("fake_graphs")
def test_accelerated_pipeline_loads_a_lora(diffusers):
    """The README's recipe: accelerate_pipeline, then pipe.load_lora_weights / set_adapters / fuse_lora /
    unload_lora_weights give the plain pipeline's images, the U-Net replayed from (fake) graphs throughout."""
    from test_integrations_diffusers import SD_SCHEDULER, images, tiny_stable_diffusion

    lora = {"unet." + k: v for k, v in lora_state_dict(diffusers, seed=5).items()}
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=4.0)
    plain = tiny_stable_diffusion(diffusers.DDIMScheduler(**SD_SCHEDULER))
    fast = tiny_stable_diffusion(diffusers.DDIMScheduler(**SD_SCHEDULER))
    accelerate_pipeline(fast, kernels="torch", cuda_graphs=True)
    before = images(fast, **call)
    steps = [
        lambda p: p.load_lora_weights(lora, adapter_name="style"),
        lambda p: p.set_adapters(["style"], adapter_weights=[0.5]),
        lambda p: p.fuse_lora(),
        lambda p: (p.unfuse_lora(), p.unload_lora_weights()),
    ]
    outputs = []
    for step in steps:
        step(plain), step(fast)
        outputs.append(images(fast, **call))
        assert np.abs(outputs[-1] - images(plain, **call)).max() <= 1e-4
    assert np.abs(outputs[0] - before).max() > 1e-3 and np.abs(outputs[1] - outputs[0]).max() > 1e-4
    assert np.abs(outputs[-1] - before).max() <= 1e-4
    assert vars(fast.unet)["forward"].captures == 4


# ---- GPU: real CUDA graphs ------------------------------------------------------------------------------------------


@cuda
def test_cuda_graphs_follow_weight_changes():
    model = our_unet().cuda()
    sampler = DDIMSampler(SCHEDULE, num_steps=4, eta=1.0)
    eng = fastdiff.SamplingEngine(model, sampler, cuda_graphs=True)

    def cuda_gen():
        return torch.Generator("cuda").manual_seed(0)

    first = eng.sample(SHAPE, generator=cuda_gen())
    update_weights(eng, scaled(model, 1.5))
    second = eng.sample(SHAPE, generator=cuda_gen())
    ref = fastdiff.sample(model, sampler, SHAPE, generator=cuda_gen())
    torch.testing.assert_close(second, ref, rtol=1e-4, atol=1e-4)
    assert (second - first).abs().max() > 1e-3 and eng.stats.captures == 1
    new_parameter(model)
    third = eng.sample(SHAPE, generator=cuda_gen())
    torch.testing.assert_close(
        third, fastdiff.sample(model, sampler, SHAPE, generator=cuda_gen()), rtol=1e-4, atol=1e-4
    )
    assert eng.stats.captures == 2
    gc.collect()


class _SlicesItsLayers(nn.Module):
    """Builds a ModuleList in every forward, as diffusers' UNetMidBlock2DCrossAttn does (`self.resnets[1:]`)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[1:]:
            x = layer(x)
        return x


def test_a_module_built_inside_a_compiled_forward_recompiles_nothing():
    model = _SlicesItsLayers()
    WeightsWatch(model)  # installs the registration hooks, as every engine and exported denoiser does
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x = torch.randn(2, 4)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), atol=0, rtol=0)

"""FastDDIMScheduler / FastDDPMScheduler as drop-ins for diffusers' schedulers, and accelerate_pipeline().

Parity is with diffusers itself, float32 on CPU, same generator seed:
- images from a full pipeline loop: max abs difference <= 1e-5 (1e-4 when accelerate_pipeline also swaps the
  U-Net's kernels);
- one scheduler step on the same inputs: within 1e-6 times the magnitude of the terms x0 is computed from (at
  least 1) of the exact float64 step, and of diffusers' result up to diffusers' own float32 error.
Pipelines use small random-weight components built from configs (a tiny CLIP tokenizer from an in-memory
vocabulary); nothing is downloaded.
"""

import copy
import pickle
import string
import warnings

import numpy as np
import pytest
import torch

from fastdiff.accelerate import report
from fastdiff.integrations import diffusers as integration

diffusers = pytest.importorskip("diffusers")
from diffusers_parity import table_steps_only  # noqa: E402

from fastdiff.engine.graphs import CaptureError  # noqa: E402
from fastdiff.integrations.diffusers import (  # noqa: E402
    FastDDIMScheduler,
    FastDDPMScheduler,
    GraphedForward,
    accelerate_pipeline,
    from_diffusers_scheduler,
    graph_unet,
)

ATOL = 1e-5  # images from a full pipeline loop, max abs
# accelerate_pipeline also changes the U-Net's float32 rounding (~1e-7 relative per call), which a random-weight
# U-Net amplifies along the loop
ATOL_ACCELERATED = 1e-4
STEP_ATOL = 1e-6  # one scheduler step on the same unit-scale inputs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    ).eval()


def images(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


# ---- schedulers -------------------------------------------------------------------------------------------------


def test_drop_in_keeps_diffusers_interface():
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    fast = FastDDIMScheduler.from_config(ref.config)
    assert isinstance(fast, diffusers.DDIMScheduler)
    assert {k: v for k, v in fast.config.items() if k != "_class_name"} == {
        k: v for k, v in ref.config.items() if k != "_class_name"
    }
    ref.set_timesteps(20)
    fast.set_timesteps(20)
    assert torch.equal(fast.timesteps, ref.timesteps)
    assert (fast.order, fast.init_noise_sigma) == (ref.order, ref.init_noise_sigma) == (1, 1.0)
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert fast.scale_model_input(x, fast.timesteps[0]) is x
    t = torch.tensor([10, 900])
    assert torch.equal(fast.add_noise(x, noise, t), ref.add_noise(x, noise, t))
    # a new instance from the fast config, a deep copy and a pickle round trip are the same scheduler
    for other in (
        FastDDIMScheduler.from_config(fast.config),
        copy.deepcopy(fast),
        pickle.loads(pickle.dumps(fast)),
    ):
        assert type(other) is FastDDIMScheduler
        other.set_timesteps(20)
        assert torch.equal(other.timesteps, ref.timesteps)
    assert type(from_diffusers_scheduler(fast, 20)).__name__ == "DDIMSampler"


STEP_CASES = {
    "ddim-eta0": (diffusers.DDIMScheduler, dict(clip_sample=True), dict(eta=0.0)),
    "ddim-eta0.5-v-trailing": (
        diffusers.DDIMScheduler,
        dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
        dict(eta=0.5),
    ),
    "ddim-sample-linspace-no-alpha-one": (
        diffusers.DDIMScheduler,
        dict(prediction_type="sample", timestep_spacing="linspace", set_alpha_to_one=False),
        dict(eta=1.0),
    ),
    "ddpm-fixed-small": (diffusers.DDPMScheduler, dict(), dict()),
    "ddpm-fixed-large-cosine": (
        diffusers.DDPMScheduler,
        dict(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2", clip_sample=False),
        dict(),
    ),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_every_step_matches_diffusers(case, monkeypatch):
    cls, config, step_kwargs = STEP_CASES[case]
    ref = cls(**config)
    fast = (FastDDIMScheduler if cls is diffusers.DDIMScheduler else FastDDPMScheduler).from_config(
        ref.config
    )
    ref.set_timesteps(25)
    fast.set_timesteps(25)
    table = from_diffusers_scheduler(ref, 25, eta=step_kwargs.get("eta", 0.0)).table
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(fast.timesteps):
        # fresh unit-scale inputs at every row (random outputs fed back would make x grow without bound)
        x, model_output = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
        seed = 100 + i
        a = ref.step(model_output, t, x, generator=torch.Generator().manual_seed(seed), **step_kwargs)
        with table_steps_only(cls, monkeypatch) as steps:  # one sampler_step, no diffusers step()
            b = fast.step(model_output, t, x, generator=torch.Generator().manual_seed(seed), **step_kwargs)
        assert len(steps) == 1
        # the exact step in float64 from the table (itself checked against diffusers in test_samplers.py)
        ca, cb, cp, cq, cc, cd, ce, cs = (table.column(name)[i].item() for name in "abpqcdes")
        xd, md = x.double(), model_output.double()
        x0 = ca * xd + cb * md
        if table.clip is not None:
            x0 = x0.clamp(-table.clip, table.clip)
        prev = cc * x0 + cd * (cp * xd + cq * md) + ce * xd
        if cs:
            prev = prev + cs * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).double()
        # x0 = a x + b m cancels terms up to 1/sqrt(alpha_bar) times larger than itself at early steps, and
        # float32 rounds those terms: the tolerance scales with them
        tol = STEP_ATOL * max(1.0, abs(ca) * x.abs().max().item() + abs(cb) * model_output.abs().max().item())
        for ours, theirs, exact in (
            (b.prev_sample, a.prev_sample, prev),
            (b.pred_original_sample, a.pred_original_sample, x0),
        ):
            assert (ours.double() - exact).abs().max() <= tol
            # diffusers rounds its coefficients to float32: a few steps are off the exact value by more than tol
            assert (ours - theirs).abs().max() <= tol + (theirs.double() - exact).abs().max()
    # return_dict=False gives the same pair as a tuple
    prev, x0 = fast.step(
        model_output, t, x, generator=torch.Generator().manual_seed(1), return_dict=False, **step_kwargs
    )
    out = fast.step(model_output, t, x, generator=torch.Generator().manual_seed(1), **step_kwargs)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


def test_ddim_variance_noise_and_no_diffusers_fallback():
    ref = diffusers.DDIMScheduler(clip_sample=True)
    fast = FastDDIMScheduler.from_config(ref.config)
    for s in (ref, fast):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(1, 3, 4, 4, generator=gen) * 3 for _ in range(3))
    t = fast.timesteps[2]
    # explicit variance noise, as CycleDiffusion passes it
    a = ref.step(m, t, x, eta=0.7, variance_noise=z).prev_sample
    torch.testing.assert_close(
        fast.step(m, t, x, eta=0.7, variance_noise=z).prev_sample, a, rtol=0, atol=STEP_ATOL
    )
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        fast.step(m, t, x, eta=0.7, variance_noise=z, generator=gen)
    # what the table cannot express is refused, never handed to diffusers' own step: a timestep between the
    # table's rows
    with pytest.raises(ValueError, match="is not one of this scheduler's timesteps"):
        fast.step(m, int(t) + 3, x)
    # a plain int timestep finds its row by value
    a = ref.step(m, int(t), x).prev_sample
    torch.testing.assert_close(fast.step(m, int(t), x).prev_sample, a, rtol=0, atol=STEP_ATOL)


def test_ddpm_without_set_timesteps_steps_through_training_timesteps():
    ref = diffusers.DDPMScheduler(num_train_timesteps=50)
    fast = FastDDPMScheduler.from_config(ref.config)
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for t in (49, 20, 0):
        a = ref.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = fast.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(b, a, rtol=0, atol=STEP_ATOL)


def test_unsupported_configs_fail_at_set_timesteps():
    # thresholding, learned variances and custom timesteps are supported (tests/test_samplers.py); epsilon
    # prediction at the zero-SNR timestep is not (x0 = x / 0)
    with pytest.raises(ValueError, match="zero-SNR"):
        FastDDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing").set_timesteps(10)
    with pytest.raises(ValueError, match="variance must be one of"):
        FastDDPMScheduler(variance_type="fixed_tiny").set_timesteps(10)
    with pytest.raises(ValueError, match="run 'set_timesteps'"):
        FastDDIMScheduler().step(torch.zeros(1, 1, 2, 2), 10, torch.zeros(1, 1, 2, 2))


def test_lazy_attributes():
    import fastdiff.integrations.diffusers as module

    assert module.FastDDIMScheduler is FastDDIMScheduler
    assert FastDDIMScheduler.__module__ == module.__name__
    with pytest.raises(AttributeError, match="FastEulerScheduler"):
        _ = module.FastEulerScheduler


# ---- full pipelines ---------------------------------------------------------------------------------------------

PIPELINE_CASES = {
    "ddim-eta0": (diffusers.DDIMPipeline, dict(clip_sample=False), dict(eta=0.0, num_inference_steps=10)),
    "ddim-eta1-generator-list": (
        diffusers.DDIMPipeline,
        dict(clip_sample=False),
        dict(eta=1.0, num_inference_steps=10),
    ),
    # clipping x0 makes a random U-Net amplify float32 rounding along the loop: fewer steps keep it in 1e-5
    "ddim-clip": (diffusers.DDIMPipeline, dict(clip_sample=True), dict(eta=0.0, num_inference_steps=5)),
    "ddpm": (diffusers.DDPMPipeline, dict(), dict(num_inference_steps=10)),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_pipeline_with_fast_scheduler_matches_diffusers(case, monkeypatch):
    pipeline_cls, config, call = PIPELINE_CASES[case]
    scheduler_cls = (
        diffusers.DDIMScheduler if pipeline_cls is diffusers.DDIMPipeline else diffusers.DDPMScheduler
    )
    fast_cls = FastDDIMScheduler if pipeline_cls is diffusers.DDIMPipeline else FastDDPMScheduler
    unet = tiny_unet()
    pipe = pipeline_cls(unet, scheduler_cls(**config))
    # the drop-in's loop: every step one call of sampler_step, diffusers' own step() failing the test
    if case.endswith("generator-list"):
        call["generator"] = [torch.Generator().manual_seed(s) for s in (3, 4)]
        ref = pipe(batch_size=2, output_type="np", **call).images
        pipe.scheduler = fast_cls.from_config(pipe.scheduler.config)
        call["generator"] = [torch.Generator().manual_seed(s) for s in (3, 4)]
        with table_steps_only(scheduler_cls, monkeypatch) as steps:
            out = pipe(batch_size=2, output_type="np", **call).images
    else:
        ref = images(pipe, batch_size=2, **call)
        pipe.scheduler = fast_cls.from_config(pipe.scheduler.config)
        with table_steps_only(scheduler_cls, monkeypatch) as steps:
            out = images(pipe, batch_size=2, **call)
    assert type(pipe.scheduler) is fast_cls
    assert len(steps) == call["num_inference_steps"]
    assert np.abs(out - ref).max() <= ATOL
    assert (
        np.abs(
            out - images(pipe, seed=1, batch_size=2, **{k: v for k, v in call.items() if k != "generator"})
        ).max()
        > 1e-2
    )


def tiny_stable_diffusion(scheduler) -> "diffusers.StableDiffusionPipeline":
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
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
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    # A byte-less CLIP BPE vocabulary of single letters: enough to tokenize lowercase prompts offline.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


SD_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "stable-diffusion", "stable-diffusion-euler-a"])
def test_accelerate_pipeline_matches_the_original(name, monkeypatch):
    if name.startswith("stable-diffusion"):
        if name.endswith("euler-a"):
            # a sigma-space scheduler: the pipeline scales x_T by init_noise_sigma and calls scale_model_input
            config = {k: SD_SCHEDULER[k] for k in ("beta_schedule", "beta_start", "beta_end", "steps_offset")}
            scheduler = lambda: diffusers.EulerAncestralDiscreteScheduler(**config)  # noqa: E731
            fast_cls = integration.FastEulerAncestralDiscreteScheduler
        else:
            scheduler = lambda: diffusers.DDIMScheduler(**SD_SCHEDULER)  # noqa: E731
            fast_cls = FastDDIMScheduler
        build = lambda: tiny_stable_diffusion(scheduler())  # noqa: E731
        call = dict(prompt="a red cat", num_inference_steps=5, guidance_scale=4.0)
    else:
        pipeline_cls = diffusers.DDPMPipeline if name == "ddpm" else diffusers.DDIMPipeline
        scheduler_cls = diffusers.DDPMScheduler if name == "ddpm" else diffusers.DDIMScheduler
        build = lambda: pipeline_cls(tiny_unet(), scheduler_cls(clip_sample=False))  # noqa: E731
        call = dict(batch_size=2, num_inference_steps=10)
        fast_cls = FastDDPMScheduler if name == "ddpm" else FastDDIMScheduler
    ref = images(build(), **call)
    pipe = build()
    assert accelerate_pipeline(pipe, kernels="torch") is pipe  # cuda_graphs="auto": no graphs on CPU
    assert "forward" not in vars(pipe.unet)
    assert type(pipe.scheduler) is fast_cls
    rep = report(pipe.unet)
    assert rep.complete and rep.coverage["attention"].fused > 0, str(rep)
    base = fast_cls.__mro__[2]  # (Fast<Name>, the table mixin, diffusers' <Name>)
    with table_steps_only(base, monkeypatch) as steps:
        out = images(pipe, **call)
    assert len(steps) == call["num_inference_steps"]
    assert np.abs(out - ref).max() <= ATOL_ACCELERATED


def test_accelerate_pipeline_keeps_schedulers_it_has_no_counterpart_for():
    ref = images(
        tiny_stable_diffusion(diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)),
        prompt="a cat",
        num_inference_steps=3,
    )
    pipe = tiny_stable_diffusion(diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerate_pipeline(pipe, kernels="torch")
    kept = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(kept) == 1 and "\n" not in kept[0], kept  # warned once, on one line
    assert kept[0].startswith(
        "accelerate_pipeline kept PNDMScheduler: PNDMScheduler has no fastdiff counterpart"
    )
    assert type(pipe.scheduler) is diffusers.PNDMScheduler and report(pipe.unet).complete
    assert np.abs(images(pipe, prompt="a cat", num_inference_steps=3) - ref).max() <= ATOL_ACCELERATED
    # a DDIM config fastdiff refuses (epsilon prediction at the zero-SNR timestep: x0 = x / 0) is kept too
    pipe = diffusers.DDIMPipeline(tiny_unet(), diffusers.DDIMScheduler())
    pipe.scheduler = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.warns(UserWarning, match="zero-SNR"):
        accelerate_pipeline(pipe, kernels="torch")
    assert type(pipe.scheduler) is diffusers.DDIMScheduler


def test_accelerate_pipeline_dtype_and_bad_arguments():
    pipe = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerate_pipeline(pipe, dtype=torch.float16, kernels="torch")
    assert pipe.unet.dtype == torch.float16 and report(pipe.unet).dtype == torch.float16
    out = images(pipe, batch_size=1, num_inference_steps=2)
    assert np.isfinite(out).all()
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        accelerate_pipeline(object())
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        accelerate_pipeline(pipe, cuda_graphs="always")
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs pipe\.unet on a cuda device"):
        accelerate_pipeline(pipe, cuda_graphs=True)
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        accelerate_pipeline(pipe, dtype=torch.float64)


class FakeGraphRunner:
    """A CPU stand-in for the engine's CUDA graph runner with its contract: warm `step` up, 'capture' `body`
    (refused while `refuse` is set), then replay it; `captured` counts captures across instances."""

    captures = True
    refuse = False
    captured = 0

    def __init__(self, step, body, reset):
        reset()
        step()
        if FakeGraphRunner.refuse:
            raise CaptureError("refused by the test")
        self._outputs = body
        FakeGraphRunner.captured += 1

    def replay(self):
        return self._outputs()


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(GraphedForward, "_graph_runner", FakeGraphRunner)
    monkeypatch.setattr(GraphedForward, "_graph_device", "cpu")
    monkeypatch.setattr(FakeGraphRunner, "refuse", False)
    monkeypatch.setattr(FakeGraphRunner, "captured", 0)


def test_graphed_unet_replays_one_graph_per_signature(fake_graphs):
    """Through accelerate_pipeline(cuda_graphs=True) with the capture faked on CPU: a Stable Diffusion pipeline's
    U-Net calls (CFG batch, text states) replay one graph per input signature and give the eager images."""
    call = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=4.0)
    ref = images(tiny_stable_diffusion(diffusers.DDIMScheduler(**SD_SCHEDULER)), **call)
    pipe = tiny_stable_diffusion(diffusers.DDIMScheduler(**SD_SCHEDULER))
    accelerate_pipeline(pipe, kernels="torch", cuda_graphs=True)
    graphed = vars(pipe.unet)["forward"]
    assert isinstance(graphed, GraphedForward) and graph_unet(pipe.unet) is graphed
    assert np.abs(images(pipe, **call) - ref).max() <= ATOL_ACCELERATED
    assert (graphed.captures, graphed.replays) == (1, 4)
    images(pipe, **call)  # same signature: replays only
    assert (graphed.captures, graphed.replays) == (1, 8)
    images(pipe, num_images_per_prompt=2, **call)  # a new batch size captures a new graph
    assert (graphed.captures, graphed.replays) == (2, 12)
    # return_dict=True gives diffusers' output type, with a fresh tensor each call
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(5)
    states = torch.randn(2, 8, 16)
    with torch.no_grad():
        first = pipe.unet(x, t, encoder_hidden_states=states)
        second = pipe.unet(x + 1, t, encoder_hidden_states=states)
        expected = type(pipe.unet).forward(pipe.unet, x, t, encoder_hidden_states=states).sample
    assert type(first).__name__ == "UNet2DConditionOutput" and first.sample is not second.sample
    torch.testing.assert_close(first.sample, expected, rtol=0, atol=0)
    # with autograd on, the original forward runs
    replays = graphed.replays
    pipe.unet(x, t, encoder_hidden_states=states)
    assert graphed.replays == replays
    # moving or casting the weights captures anew; accelerate_pipeline again starts from the plain forward
    pipe.unet.to(torch.bfloat16)
    with torch.no_grad():
        pipe.unet(x.bfloat16(), t, encoder_hidden_states=states.bfloat16())
    assert graphed.captures == 4
    pipe.unet.to(torch.float32)
    accelerate_pipeline(pipe, kernels="torch", cuda_graphs=True)
    assert vars(pipe.unet)["forward"] is not graphed


def test_graphed_unet_lru_bound_and_capture_failure(fake_graphs):
    unet = tiny_unet()
    expected = {b: unet(torch.ones(b, 3, 8, 8), 7).sample for b in (1, 2, 3)}
    graphed = graph_unet(unet, max_graphs=2)
    with torch.no_grad():
        for b in (1, 2, 3, 1):
            torch.testing.assert_close(unet(torch.ones(b, 3, 8, 8), 7).sample, expected[b], rtol=0, atol=0)
    assert graphed.captures == 4 and len(graphed._cache) == 2  # batch 1 was evicted by 3, then captured again
    twin = copy.deepcopy(unet)  # a copy gets its own, empty replayer bound to the copy
    twin_graphed = vars(twin)["forward"]
    assert twin_graphed is not graphed and twin_graphed.unet is twin and not twin_graphed._cache
    with torch.no_grad():
        torch.testing.assert_close(twin(torch.ones(2, 3, 8, 8), 7).sample, expected[2], rtol=0, atol=0)
    assert twin_graphed.captures == 1 and graphed.captures == 4
    other = tiny_unet()
    FakeGraphRunner.refuse = True
    graphed = graph_unet(other)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"), torch.no_grad():
        out = other(torch.ones(2, 3, 8, 8), 7, return_dict=False)[0]
    torch.testing.assert_close(out, expected[2], rtol=0, atol=0)
    assert graphed.failed and graphed.captures == 0
    with pytest.raises(ValueError, match="max_graphs"):
        graph_unet(tiny_unet(), max_graphs=0)
    with pytest.raises(TypeError, match=r"unet must be a torch\.nn\.Module"):
        graph_unet(object())


# ---- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
def test_cuda_fast_scheduler_pipeline_matches_diffusers():
    pipe = diffusers.DDIMPipeline(tiny_unet(), diffusers.DDIMScheduler(clip_sample=False)).to("cuda")
    ref = images(pipe, batch_size=2, eta=1.0, num_inference_steps=10)
    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)
    assert np.abs(images(pipe, batch_size=2, eta=1.0, num_inference_steps=10) - ref).max() <= 1e-4
    accelerate_pipeline(pipe, cuda_graphs=True)  # float32, U-Net forward replayed from a CUDA graph
    graphed = vars(pipe.unet)["forward"]
    assert np.abs(images(pipe, batch_size=2, eta=1.0, num_inference_steps=10) - ref).max() <= 1e-3
    assert (graphed.captures, graphed.replays) == (1, 10)
    accelerate_pipeline(pipe, dtype=torch.float16)
    out = images(pipe, batch_size=2, eta=1.0, num_inference_steps=10)
    assert np.abs(out - ref).max() < 5e-2

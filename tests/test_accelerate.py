"""accelerate(), report() and as_denoiser() on our UNet and on small random-weight diffusers U-Nets.

Every accelerated model must reach 100% coverage and give the original's output: float32 on CPU through the
PyTorch reference kernels (kernels="torch") within 1e-5 relative to the output's magnitude, and through the Triton
kernels under the interpreter (in a subprocess, since TRITON_INTERPRET is read at import) within 1e-4.
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastdiff.accelerate import DiffusersDenoiser, FastAttnProcessor, accelerate, as_denoiser, report
from fastdiff.errors import BackendUnavailableError
from fastdiff.kernels.backend import triton_runs_on
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.models.unet import AttentionBlock, GroupNormSiLU
from fastdiff.samplers import DDIMSampler, sample
from fastdiff.schedule import NoiseSchedule

RTOL = 1e-5  # max |accelerated - original| / max |original|, float32, reference kernels
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter nudged, so zero-initialised branches (ours) contribute to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ---- our UNet -------------------------------------------------------------------------------------------------

OUR_CONFIGS = {
    # scale-shift norm, class labels, attention at one resolution + the middle block
    "digits": UNetConfig.preset("digits", model_channels=8, num_groups=4, num_res_blocks=1),
    # plain norm, no classes, attention at two resolutions
    "cifar-like": UNetConfig.preset(
        "ddpm-cifar10",
        image_size=8,
        model_channels=8,
        num_groups=4,
        num_res_blocks=1,
        channel_mult=(1, 2, 2),
        attention_resolutions=(8, 4),
        dropout=0.0,
    ),
}


def our_unet(name: str) -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet(OUR_CONFIGS[name]))


def our_inputs(model: UNet) -> tuple:
    cfg = model.config
    x = torch.randn(
        2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)
    )
    labels = None if cfg.num_classes is None else torch.tensor([1, cfg.num_classes])
    return x, torch.tensor([3, 700]), labels


@pytest.mark.parametrize("name", sorted(OUR_CONFIGS))
def test_our_unet_backends_and_full_coverage(name):
    model = our_unet(name)
    fast = accelerate(model, kernels="torch")
    norms = [m for m in fast.modules() if isinstance(m, GroupNormSiLU)]
    attention = [m for m in fast.modules() if isinstance(m, AttentionBlock)]
    rep = report(fast)
    assert rep.complete
    assert rep.coverage["group_norm_silu"].fused == sum(m.silu for m in norms) > 0
    assert rep.coverage["group_norm"].fused == sum(not m.silu for m in norms) > 0
    assert rep.coverage["attention"].fused == len(attention) > 0
    assert "100%" in str(rep)
    for kernels in ("auto", "torch"):
        fast = accelerate(model, kernels=kernels)
        assert {m.backend for m in fast.modules() if isinstance(m, (GroupNormSiLU, AttentionBlock))} == {
            kernels
        }
    # the original is not touched (deep copy)
    assert {m.backend for m in model.modules() if isinstance(m, (GroupNormSiLU, AttentionBlock))} == {"torch"}
    x, t, y = our_inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
        # the same computation in the same layout is bitwise the original; channels-last (the default for a
        # model with convolutions) only reorders the convolutions' float32 sums
        torch.testing.assert_close(
            accelerate(model, kernels="torch", channels_last=False)(x, t, y), expected, rtol=0, atol=0
        )
        fast = accelerate(model, kernels="torch")
        assert report(fast).channels_last
        torch.testing.assert_close(fast(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_inplace_returns_the_same_module():
    model = our_unet("digits")
    assert accelerate(model, kernels="torch", inplace=True) is model
    assert report(model).complete
    # `fastdiff.accelerate.report` also resolves when `fastdiff.accelerate` names the exported function
    assert accelerate.report is report


# ---- diffusers U-Nets -----------------------------------------------------------------------------------------

TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
DIFFUSERS_CONFIGS = {
    # attention at two of three resolutions and in the middle block, default time embedding norm
    "unet2d": (
        "UNet2DModel",
        dict(
            TINY,
            block_out_channels=(8, 16, 16),
            down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
            attention_head_dim=4,
        ),
    ),
    # ADM-style scale-shift norm and class embeddings
    "unet2d-scale-shift-classes": (
        "UNet2DModel",
        dict(
            TINY,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=5,
        ),
    ),
    # text-to-image style: cross-attention transformer blocks at one resolution
    "unet2d-condition": (
        "UNet2DConditionModel",
        dict(
            TINY,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12,
            attention_head_dim=2,
        ),
    ),
    # cross-attention at both resolutions, linear projections, scale-shift norm, class embeddings
    "unet2d-condition-scale-shift-classes": (
        "UNet2DConditionModel",
        dict(
            TINY,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12,
            attention_head_dim=4,
            use_linear_projection=True,
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=3,
        ),
    ),
}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_unet(diffusers, name: str) -> nn.Module:
    cls, kwargs = DIFFUSERS_CONFIGS[name]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**kwargs).eval()


def diffusers_inputs(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = unet.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    cond = {}
    if cfg.get("cross_attention_dim") is not None:
        cond["encoder_hidden_states"] = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen)
    if cfg.num_class_embeds is not None:
        cond["class_labels"] = torch.tensor([1, cfg.num_class_embeds - 1])
    return x, torch.tensor([10, 800]), cond


def run(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, t, **cond).sample


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_diffusers_unet_full_coverage_and_same_output(diffusers, name):
    unet = diffusers_unet(diffusers, name)
    fast = accelerate(unet, kernels="torch")
    rep = report(fast)
    assert rep.complete, str(rep)
    assert rep.skipped == []
    assert all(rep.coverage[k].found > 0 for k in ("group_norm_silu", "group_norm", "attention")), str(rep)
    # every GroupNorm of the model now runs through group_norm_silu, every attention through the kernel
    assert not [m for m in fast.modules() if type(m) is nn.GroupNorm]
    attention = [m for m in fast.modules() if isinstance(m, diffusers.models.attention_processor.Attention)]
    assert len(attention) == rep.coverage["attention"].fused
    assert all(isinstance(a.processor, FastAttnProcessor) for a in attention)
    blocks = [m for m in fast.modules() if isinstance(m, diffusers.models.resnet.ResnetBlock2D)]
    assert 2 * len(blocks) + 1 == rep.coverage["group_norm_silu"].fused
    assert all(type(b).__name__ == "FusedResnetBlock2D" for b in blocks)
    # the original is untouched
    assert not any(isinstance(m, GroupNormSiLU) for m in unet.modules())
    x, t, cond = diffusers_inputs(unet)
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL


def test_reaccelerating_switches_backends_and_keeps_coverage(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-condition")
    fast = accelerate(accelerate(unet, kernels="torch"), kernels="auto")
    assert report(fast).complete and report(fast).skipped == []
    assert {m.backend for m in fast.modules() if isinstance(m, GroupNormSiLU)} == {"auto"}
    processors = [
        m.processor for m in fast.modules() if isinstance(getattr(m, "processor", None), FastAttnProcessor)
    ]
    assert {p.backend for p in processors} == {"auto"}
    assert report(fast).coverage == report(accelerate(unet, kernels="auto")).coverage


def test_attention_mask_falls_back_to_the_original_processor(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-condition")
    fast = accelerate(unet, kernels="torch")
    x, t, cond = diffusers_inputs(unet)
    cond["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert report(fast).fallback_calls == 0
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL
    cross = [m for m in fast.modules() if getattr(m, "is_cross_attention", False)]
    assert report(fast).fallback_calls == len(cross) > 0
    assert "masks" in str(report(fast))


def test_unsupported_processor_is_left_alone_and_reported(diffusers):
    from diffusers.models.attention_processor import Attention, SlicedAttnProcessor

    unet = diffusers_unet(diffusers, "unet2d")
    attention = [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]
    name, custom = attention[0]
    custom.set_processor(SlicedAttnProcessor(1))
    fast = accelerate(unet, kernels="torch")
    rep = report(fast)
    assert not rep.complete
    assert (rep.coverage["attention"].found, rep.coverage["attention"].fused) == (
        len(attention),
        len(attention) - 1,
    )
    assert [(s.path, s.kind) for s in rep.skipped] == [(name, "attention")]
    assert "SlicedAttnProcessor" in str(rep)
    assert isinstance(fast.get_submodule(name).processor, SlicedAttnProcessor)
    x, t, cond = diffusers_inputs(unet)
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL


def test_state_dict_keeps_the_original_keys_and_pickles(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-condition")
    fast = accelerate(unet, kernels="torch")
    assert list(fast.state_dict()) == list(unet.state_dict())
    x, t, cond = diffusers_inputs(unet)
    restored = pickle.loads(pickle.dumps(fast))
    torch.testing.assert_close(run(restored, x, t, cond), run(fast, x, t, cond), rtol=0, atol=0)
    assert report(restored).complete


def with_lora(unet: nn.Module, name: str = "a", seed: int = 0, r: int = 2) -> nn.Module:
    """`unet` with a peft LoRA adapter on every attention projection, its weights drawn from `seed` (peft would
    zero the B matrices)."""
    peft = pytest.importorskip("peft")
    unet.add_adapter(
        peft.LoraConfig(r=r, lora_alpha=r, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        adapter_name=name,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in unet.named_parameters():
            if f".{name}." in key and "lora_" in key:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return unet


def test_lora_adapters_keep_working_before_and_after_accelerate(diffusers):
    """An adapter present at accelerate() time, and one added to the accelerated model, both change the output
    exactly as on the plain model; unloading it brings back the fused projections."""
    unet = with_lora(diffusers_unet(diffusers, "unet2d-condition"))
    x, t, cond = diffusers_inputs(unet)
    fast = accelerate(unet, kernels="torch")
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL
    plain = diffusers_unet(diffusers, "unet2d-condition")
    fast = accelerate(plain, kernels="torch")
    no_adapter = run(fast, x, t, cond)
    with_lora(plain), with_lora(fast)
    out = run(fast, x, t, cond)
    assert rel_err(out, run(plain, x, t, cond)) <= RTOL
    assert (out - no_adapter).abs().max() > 1e-2
    fast.delete_adapters("a")
    assert rel_err(run(fast, x, t, cond), no_adapter) <= RTOL


def test_checkpoints_move_between_plain_and_accelerated(diffusers):
    """load_state_dict both ways with the original keys; the fused projections read the loaded weights."""
    unet = diffusers_unet(diffusers, "unet2d-condition")
    other = perturbed(diffusers_unet(diffusers, "unet2d-condition"), seed=3)
    x, t, cond = diffusers_inputs(unet)
    fast = accelerate(unet, kernels="torch")
    fast.load_state_dict(other.state_dict())
    assert rel_err(run(fast, x, t, cond), run(other, x, t, cond)) <= RTOL
    unet.load_state_dict(fast.state_dict())
    assert rel_err(run(unet, x, t, cond), run(other, x, t, cond)) <= RTOL


def test_fused_projections_follow_replaced_and_cast_parameters(diffusers):
    """A new nn.Parameter, an in-place copy and a dtype change all reach the fused projection."""
    unet = diffusers_unet(diffusers, "unet2d-condition")
    x, t, cond = diffusers_inputs(unet)
    fast = accelerate(unet, kernels="torch")
    attn = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    new = torch.randn_like(attn.to_k.weight)
    attn.to_k.weight = nn.Parameter(new.clone())
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight = nn.Parameter(new.clone())
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL
    with torch.no_grad():
        for model in (fast, unet):
            model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v.weight.mul_(2.0)
    assert rel_err(run(fast, x, t, cond), run(unet, x, t, cond)) <= RTOL
    half, ref = fast.to(torch.bfloat16), run(unet, x, t, cond)
    assert rel_err(run(half, x.bfloat16(), t, {k: v.bfloat16() for k, v in cond.items()}), ref) < 5e-2


def test_channels_last_and_bfloat16(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-scale-shift-classes")
    x, t, cond = diffusers_inputs(unet)
    ref = run(unet, x, t, cond)
    fast = accelerate(unet, kernels="torch", channels_last=True)
    assert report(fast).channels_last and fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(run(fast, x, t, cond), ref) <= RTOL
    half = accelerate(unet, kernels="torch", dtype=torch.bfloat16)
    assert report(half).dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    out = run(half, x.bfloat16(), t, cond)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-2  # bfloat16 keeps 8 bits of mantissa
    assert next(unet.parameters()).dtype == torch.float32  # the original keeps its dtype


def test_compile_fullgraph_has_no_graph_break(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-scale-shift-classes")
    x, t, cond = diffusers_inputs(unet)
    fast = accelerate(unet, kernels="torch")
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    assert rel_err(run(compiled, x, t, cond), run(unet, x, t, cond)) <= RTOL
    ours = accelerate(our_unet("digits"), kernels="torch")
    x, t, y = our_inputs(ours)
    with torch.no_grad():
        out = torch.compile(ours, fullgraph=True, backend="aot_eager")(x, t, y)
        torch.testing.assert_close(out, ours(x, t, y), rtol=0, atol=0)
    assert report(compiled).complete  # report() sees through torch.compile


def test_bad_arguments():
    model = our_unet("digits")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        accelerate(lambda x: x)
    with pytest.raises(ValueError, match="kernels must be one of"):
        accelerate(model, kernels="cuda")
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        accelerate(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="channels_last must be None or a bool"):
        accelerate(model, channels_last="yes")
    with pytest.raises(TypeError, match="accelerate the module first"):
        accelerate(torch.compile(model))
    with pytest.raises(ValueError, match=r"was not returned by fastdiff\.accelerate"):
        report(model)


@pytest.mark.skipif(triton_runs_on(torch.device("cpu")), reason="Triton runs on CPU here (interpreter on)")
def test_explicit_triton_fails_early_where_it_cannot_run():
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        accelerate(our_unet("digits"), kernels="triton")


def test_models_without_known_parts_are_left_unchanged():
    mlp = MLPDenoiser(hidden=16, num_layers=1)
    fast = accelerate(mlp, kernels="torch")
    rep = report(fast)
    assert rep.complete and rep.swaps == [] and all(c.found == 0 for c in rep.coverage.values())
    x, t = torch.randn(4, 2), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), mlp(x, t), rtol=0, atol=0)


# ---- as_denoiser ------------------------------------------------------------------------------------------------


def test_as_denoiser_passes_our_models_through():
    model = our_unet("digits")
    assert as_denoiser(model) is model
    mlp = MLPDenoiser(hidden=16, num_layers=1)
    assert as_denoiser(mlp) is mlp
    with pytest.raises(TypeError, match="diffusers U-Net"):
        as_denoiser(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="only for diffusers"):
        as_denoiser(model, null_class_label=0)


def test_as_denoiser_wraps_diffusers_unets(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-condition-scale-shift-classes")
    den = as_denoiser(accelerate(unet, kernels="torch"))
    assert isinstance(den, DiffusersDenoiser) and as_denoiser(den) is den
    assert sum(p.numel() for p in den.parameters()) >= sum(p.numel() for p in unet.parameters())
    assert report(den).complete
    x, t, cond = diffusers_inputs(unet)
    ref = run(unet, x, t, cond)
    with torch.no_grad():
        assert rel_err(den(x, t, **cond), ref) <= RTOL
        # a scalar timestep is broadcast to the batch
        torch.testing.assert_close(den(x, 800, **cond)[1], run(unet, x, torch.tensor([800, 800]), cond)[1])
    assert den.null_cond is None  # no null class: users pass uncond explicitly
    labelled = as_denoiser(unet, null_class_label=2)
    y = torch.tensor([0, 1])
    assert torch.equal(labelled.null_cond({"class_labels": y})["class_labels"], torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="no null condition for 'encoder_hidden_states'"):
        labelled.null_cond({"encoder_hidden_states": cond["encoder_hidden_states"]})
    with pytest.raises(ValueError, match=r"null_class_label must be in \[0, 3\)"):
        as_denoiser(unet, null_class_label=3)
    with pytest.raises(ValueError, match="no class embedding"):
        as_denoiser(diffusers_unet(diffusers, "unet2d"), null_class_label=0)


def test_as_denoiser_in_the_sampling_loop_with_guidance(diffusers):
    unet = diffusers_unet(diffusers, "unet2d-condition-scale-shift-classes")
    _, _, cond = diffusers_inputs(unet)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    sampler = DDIMSampler(NoiseSchedule.from_kind("linear"), num_steps=3)

    def by_hand(x, t, **kw):
        return unet(x, t, **kw).sample

    kwargs = dict(cond=cond, uncond=uncond, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    out = sample(as_denoiser(accelerate(unet, kernels="torch")), sampler, (2, 4, 8, 8), **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    ref = sample(by_hand, sampler, (2, 4, 8, 8), **kwargs)
    assert rel_err(out, ref) <= 10 * RTOL  # three model calls feed each other


# ---- Triton kernels under the interpreter -----------------------------------------------------------------------

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import fastdiff.accelerate, fastdiff.integrations.diffusers
    assert "diffusers" not in sys.modules, "importing fastdiff must not import diffusers"
    import diffusers
    from fastdiff.accelerate import accelerate, report
    from fastdiff.models import UNet, UNetConfig

    def check(model, args, kwargs, name):
        fast = accelerate(model, kernels="triton")
        assert report(fast).complete and report(fast).backend == "triton", str(report(fast))
        with torch.no_grad():
            ref, out = model(*args, **kwargs), fast(*args, **kwargs)
        ref, out = getattr(ref, "sample", ref), getattr(out, "sample", out)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-4, (name, err)
        print(name, err)

    torch.manual_seed(0)
    ours = UNet(UNetConfig.preset("digits", model_channels=8, num_groups=4, num_res_blocks=1, channel_mult=(1, 1)))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 1, 8, 8)
    check(ours.eval(), (x, torch.tensor([500]), torch.tensor([3])), {}, "ours")
    small = dict(sample_size=4, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
    unet = diffusers.UNet2DModel(**small, down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
                                 attention_head_dim=4, resnet_time_scale_shift="scale_shift")
    check(unet.eval(), (torch.randn(1, 3, 4, 4), torch.tensor([500])), {}, "UNet2DModel")
    cond = diffusers.UNet2DConditionModel(**small, in_channels=4, out_channels=4, cross_attention_dim=8,
                                          down_block_types=("CrossAttnDownBlock2D",),
                                          up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=4)
    check(cond.eval(), (torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.randn(1, 3, 8)), {},
          "UNet2DConditionModel")
    """
)


def test_triton_kernels_under_the_interpreter_and_lazy_diffusers_import():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {line.split()[0] for line in proc.stdout.splitlines()} == {
        "ours",
        "UNet2DModel",
        "UNet2DConditionModel",
    }


# ---- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["unet2d-scale-shift-classes", "unet2d-condition"])
def test_cuda_half_precision_matches_float32(diffusers, name, dtype):
    unet = diffusers_unet(diffusers, name).cuda()
    x, t, cond = diffusers_inputs(unet)
    x, t = x.cuda(), t.cuda()
    cond = {k: v.cuda() for k, v in cond.items()}
    ref = run(unet, x, t, cond)
    fast = accelerate(unet, dtype=dtype)
    rep = report(fast)
    assert rep.complete and rep.backend == "triton" and rep.channels_last
    half_cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    out = run(fast, x.to(dtype), t, half_cond)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (2e-2 if dtype == torch.float16 else 5e-2)
    # same precision, original modules: the fused kernels are at least as close to float32
    baseline = run(copy.deepcopy(unet).to(dtype), x.to(dtype), t, half_cond)
    assert rel_err(out, ref) <= 2 * rel_err(baseline, ref) + 1e-3


@pytest.mark.cuda
@cuda
def test_cuda_our_unet_triton_matches_reference():
    model = our_unet("digits").cuda()
    x, t, y = (v.cuda() for v in our_inputs(model))
    fast = accelerate(model, kernels="triton", channels_last=False)
    with torch.no_grad():
        assert rel_err(fast(x, t, y), model(x, t, y)) <= 1e-4

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastdiff.kernels as kernels
from fastdiff.models.unet import (
    PRESETS,
    AttentionBlock,
    Downsample,
    GroupNormSiLU,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    broadcast_timesteps,
    timestep_embedding,
    timestep_rows,
)

ATOL = 1e-5  # float32 paths that compute the same sums in a different order


def tiny_config(**overrides) -> UNetConfig:
    """The digits preset shrunk to a few thousand parameters, at 16x16 with three levels, for fast CPU tests."""
    base = {
        "model_channels": 8,
        "num_groups": 4,
        "image_size": 16,
        "channel_mult": (1, 2, 2),
        "attention_resolutions": (8, 4),
    }
    return UNetConfig.preset("digits", **{**base, **overrides})


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Model with every parameter nudged, so zero-initialised branches contribute to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def build(config: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return perturbed(UNet(config), seed)


def num_params(name: str, **overrides) -> int:
    with torch.device("meta"):
        model = UNet(UNetConfig.preset(name, **overrides))
    return sum(p.numel() for p in model.parameters())


# ---- parameter counts -------------------------------------------------------------------------------------


def test_ddpm_cifar10_has_35_7m_parameters():
    assert num_params("ddpm-cifar10") == pytest.approx(35.7e6, rel=0.005)


def test_adm_imagenet64_parameter_count():
    # Dhariwal & Nichol report 296M for their ImageNet 64x64 model, which learns sigma: its output conv has 6
    # channels instead of 3, i.e. 3 * (192 * 9 + 1) more parameters than ours.
    eps_only = num_params("adm-imagenet64")
    learned_sigma = num_params("adm-imagenet64", learn_sigma=True)
    assert learned_sigma - eps_only == 3 * (192 * 9 + 1)
    assert learned_sigma == pytest.approx(296e6, rel=0.005)


def test_digits_preset_fits_a_5mb_checkpoint():
    count = num_params("digits")
    assert 500_000 < count <= 1_200_000
    assert count * 4 < 5 * 1024 * 1024


# ---- shapes and presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("ddpm-cifar10", {"model_channels": 32}),
        (
            "adm-imagenet64",
            {"model_channels": 32, "num_head_channels": 16, "num_res_blocks": 1, "image_size": 32},
        ),
        ("digits", {}),
    ],
)
def test_preset_output_shape(name, overrides):
    config = UNetConfig.preset(name, **overrides)
    model = UNet(config).eval()
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    labels = None if config.num_classes is None else torch.tensor([0, config.num_classes - 1])
    with torch.no_grad():
        out = model(x, torch.tensor([1, 999]), class_labels=labels)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert model.num_classes == config.num_classes
    assert model.config is config


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="unknown preset") as info:
        UNetConfig.preset("cifar")
    for name in PRESETS:
        assert name in str(info.value)


def test_zero_initialised_output():
    model = UNet(tiny_config())
    out = model(torch.randn(2, 1, 16, 16), 10)
    assert torch.equal(out, torch.zeros_like(out))
    for module in model.modules():
        if isinstance(module, ResBlock):
            assert not module.out_conv.weight.any()
        if isinstance(module, AttentionBlock):
            assert not module.proj_out.weight.any()


def test_out_channels_differ_from_in_channels():
    model = build(tiny_config(in_channels=2, out_channels=3))
    assert model(torch.randn(2, 2, 16, 16), 5).shape == (2, 3, 16, 16)


def test_learn_sigma_returns_eps_and_the_variance_channels():
    # ADM's learned variance: 2C output channels, epsilon first, then the variance interpolation (issue 12)
    model = build(tiny_config(learn_sigma=True))
    assert model.out_conv.out_channels == 2
    captured = {}
    model.out_conv.register_forward_hook(lambda mod, inp, out: captured.setdefault("out", out))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16), 5)
    assert out.shape == (2, 2, 16, 16)
    assert torch.equal(out, captured["out"])


# ---- timesteps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [None, 10])
def test_timestep_broadcast_forms_agree(num_classes):
    # One timestep for the batch (a number, a 1-element tensor, a stride-0 view) is embedded once and broadcast;
    # a (B,) tensor is embedded per row: the same sums over other rows, so equal to within ATOL.
    model = build(tiny_config(num_classes=num_classes, use_scale_shift_norm=True))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        one = model(x, torch.tensor(7.0).expand(3))
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7])):
            assert torch.equal(model(x, t), one), t
        torch.testing.assert_close(model(x, torch.full((3,), 7.0)), one, atol=ATOL, rtol=0)
        assert not torch.allclose(model(x, 8), one)


def test_timestep_rows_keeps_one_timestep_one_row():
    cpu = torch.device("cpu")
    for t in (7, torch.tensor(7.0), torch.tensor([7.0]), torch.tensor(7.0).expand(3)):
        assert timestep_rows(t, 3, cpu).shape == (1,), t
    per_row = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(timestep_rows(per_row, 3, cpu), per_row)
    assert timestep_rows(torch.full((3,), 7.0), 3, cpu).shape == (3,)  # equal values, but not known to be


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[0, 3:], torch.zeros(4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :6], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_broadcast_timesteps_rejects_bad_t():
    with pytest.raises(ValueError, match="t must have shape"):
        broadcast_timesteps(torch.zeros(2), 3, torch.device("cpu"))
    with pytest.raises(TypeError, match="t must be"):
        broadcast_timesteps("5", 3, torch.device("cpu"))


# ---- conditioning -------------------------------------------------------------------------------------------


def test_class_labels_none_is_the_null_label():
    model = build(tiny_config())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(x, 5)
        assert torch.equal(model(x, 5, class_labels=torch.full((2,), 10)), ref)
        a = model(x, 5, class_labels=torch.tensor([1, 1]))
        b = model(x, 5, class_labels=torch.tensor([2, 2]))
    assert not torch.allclose(a, ref)
    assert not torch.allclose(a, b)


def test_class_labels_are_per_sample():
    model = build(tiny_config())
    x = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        mixed = model(x, 5, class_labels=torch.tensor([3, 10]))
        torch.testing.assert_close(
            mixed[0], model(x[:1], 5, class_labels=torch.tensor([3]))[0], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(mixed[1], model(x[:1], 5)[0], atol=ATOL, rtol=0)


def test_null_cond():
    model = UNet(tiny_config())
    labels = torch.tensor([1, 4, 9], dtype=torch.int32)
    null = model.null_cond({"class_labels": labels})
    assert torch.equal(null["class_labels"], torch.full((3,), 10, dtype=torch.int32))
    assert model.null_cond({"class_labels": None}) == {"class_labels": None}
    with pytest.raises(ValueError, match=r"no null condition for .low_res.: pass an explicit `uncond`"):
        model.null_cond({"low_res": torch.zeros(1)})
    with pytest.raises(ValueError, match="unconditional"):
        UNet(tiny_config(num_classes=None)).null_cond({"class_labels": labels})


def test_low_res_is_upsampled_bilinearly_and_concatenated():
    model = build(tiny_config(low_res_channels=1, num_classes=None))
    assert model.input_blocks[0][0].in_channels == 2
    x = torch.randn(2, 1, 16, 16)
    low = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model(x, 5, low_res=low)
        up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, model(x, 5, low_res=up), atol=ATOL, rtol=0)
        assert not torch.allclose(out, model(x, 5, low_res=torch.randn(2, 1, 8, 8)))


# ---- building blocks against plain-PyTorch formulas ----------------------------------------------------------


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_adm_formula(scale_shift):
    torch.manual_seed(0)
    block = perturbed(ResBlock(8, 12, 0.0, 16, use_scale_shift_norm=scale_shift, num_groups=4))
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = F.silu(F.group_norm(x, 4, block.in_norm.weight, block.in_norm.bias))
    h = F.conv2d(h, block.in_conv.weight, block.in_conv.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)
    if scale_shift:
        scale, shift = e[:, :16, None, None], e[:, 16:, None, None]
        h = F.group_norm(h, 4, block.out_norm.weight, block.out_norm.bias) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e[:, :, None, None], 4, block.out_norm.weight, block.out_norm.bias)
    h = F.silu(h)
    h = F.conv2d(h, block.out_conv.weight, block.out_conv.bias, padding=1)
    expected = F.conv2d(x, block.skip_connection.weight, block.skip_connection.bias) + h
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_resblock_updown_resamples_both_branches(direction):
    torch.manual_seed(0)
    block = perturbed(ResBlock(8, 12, 0.0, num_groups=4, **{direction: True}))
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    resample = Upsample(8, False) if direction == "up" else Downsample(8, False)
    h = resample(F.silu(F.group_norm(x, 4, block.in_norm.weight, block.in_norm.bias)))
    h = F.conv2d(h, block.in_conv.weight, block.in_conv.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)
    h = F.silu(F.group_norm(h + e[:, :, None, None], 4, block.out_norm.weight, block.out_norm.bias))
    expected = resample(x) + F.conv2d(h, block.out_conv.weight, block.out_conv.bias, padding=1)
    with torch.no_grad():
        out = block(x, emb)
    assert out.shape == (2, 8, 12, 12) if direction == "up" else (2, 8, 3, 3)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_unet_resblock_updown_replaces_resample_layers():
    model = build(tiny_config(resblock_updown=True))
    layers = [layer for block in [*model.input_blocks, *model.output_blocks] for layer in block]
    assert not any(isinstance(layer, (Upsample, Downsample)) for layer in layers)
    updown = [m for m in model.modules() if isinstance(m, ResBlock) and m.h_upd is not None]
    assert len(updown) == 2 * (len(model.config.channel_mult) - 1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16), 5).shape == (2, 1, 16, 16)


def test_attention_block_matches_multi_head_sdpa():
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(8, num_heads=2, num_groups=4))
    x = torch.randn(2, 8, 3, 5)
    qkv = F.conv2d(F.group_norm(x, 4, block.norm.weight, block.norm.bias), block.qkv.weight, block.qkv.bias)
    q, k, v = (t.reshape(2, 2, 4, 15).transpose(-1, -2) for t in qkv.chunk(3, dim=1))
    a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 8, 3, 5)
    expected = x + F.conv2d(a, block.proj_out.weight, block.proj_out.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=ATOL, rtol=0)


def test_rescale_residual_divides_by_sqrt2():
    torch.manual_seed(0)
    plain_res = perturbed(ResBlock(8, 12, 0.0, 16, num_groups=4))
    scaled_res = ResBlock(8, 12, 0.0, 16, num_groups=4, rescale_residual=True)
    scaled_res.load_state_dict(plain_res.state_dict())
    plain_attn = perturbed(AttentionBlock(8, 2, num_groups=4))
    scaled_attn = AttentionBlock(8, 2, num_groups=4, rescale_residual=True)
    scaled_attn.load_state_dict(plain_attn.state_dict())
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(scaled_res(x, emb), plain_res(x, emb) / math.sqrt(2), atol=ATOL, rtol=0)
        torch.testing.assert_close(scaled_attn(x), plain_attn(x) / math.sqrt(2), atol=ATOL, rtol=0)
    model = UNet(tiny_config(rescale_residual=True))
    assert all(m.rescale_residual for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock)))


def test_every_norm_and_attention_goes_through_the_kernels(monkeypatch):
    model = build(tiny_config())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    attns = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert norms and all(type(m) is GroupNormSiLU for m in norms)
    assert attns and all(not a.norm.silu for a in attns)
    for m in norms + attns:
        m.backend = "auto"
    calls = {"norm": [], "attention": []}
    group_norm_silu, attention = kernels.group_norm_silu, kernels.attention

    def spy_norm(*args, **kwargs):
        calls["norm"].append(kwargs["backend"])
        return group_norm_silu(*args, **kwargs)

    def spy_attention(*args, **kwargs):
        calls["attention"].append(kwargs["backend"])
        return attention(*args, **kwargs)

    monkeypatch.setattr(kernels, "group_norm_silu", spy_norm)
    monkeypatch.setattr(kernels, "attention", spy_attention)
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16), 5)
    assert calls == {"norm": ["auto"] * len(norms), "attention": ["auto"] * len(attns)}


# ---- memory format, determinism, compile ----------------------------------------------------------------------


def test_channels_last_matches_contiguous():
    model = build(tiny_config(use_scale_shift_norm=True))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(x, torch.tensor([3, 500]), class_labels=torch.tensor([1, 10]))
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last), torch.tensor([3, 500]), torch.tensor([1, 10]))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_deterministic():
    x = torch.randn(2, 1, 16, 16)
    a, b = build(tiny_config(), seed=3), build(tiny_config(), seed=3)
    with torch.no_grad():
        out = a(x, 9, torch.tensor([2, 5]))
        assert torch.equal(out, a(x, 9, torch.tensor([2, 5])))
        assert torch.equal(out, b(x, 9, torch.tensor([2, 5])))


def test_dropout_only_in_training_mode():
    model = build(tiny_config(dropout=0.5))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 4), model(x, 4))
        model.train()
        assert not torch.equal(model(x, 4), model(x, 4))


def test_torch_compile_fullgraph_matches_eager():
    model = build(tiny_config(num_res_blocks=1))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 500]), torch.tensor([1, 10])
    # Inference only: the kernels' custom ops define no backward, which aot_eager would trace with grad enabled.
    with torch.no_grad():
        ref = model(x, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, t, y), ref, atol=ATOL, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_with_class_labels():
    # Validating label values reads them on the host, which capture forbids: forward must skip it there.
    model = build(tiny_config()).cuda()
    x = torch.randn(2, 1, 16, 16, device="cuda")
    t, y = torch.tensor([3, 500], device="cuda"), torch.tensor([1, 10], device="cuda")
    with torch.no_grad():
        ref = model(x, t, y)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x, t, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        graph.replay()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# ---- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip_through_json(name):
    config = UNetConfig.preset(name, low_res_channels=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert isinstance(data["channel_mult"], list)
    restored = UNetConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.channel_mult, tuple) and isinstance(restored.attention_resolutions, tuple)


def test_from_dict_rejects_unknown_and_missing_keys():
    data = tiny_config().to_dict()
    with pytest.raises(ValueError, match="unknown UNetConfig keys: \\['depth'\\]"):
        UNetConfig.from_dict({**data, "depth": 3})
    del data["image_size"]
    with pytest.raises(ValueError, match="missing UNetConfig keys: \\['image_size'\\]"):
        UNetConfig.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_groups": 5}, ValueError, "not divisible by num_groups"),
        ({"attention_resolutions": (6,)}, ValueError, "attention_resolutions"),
        ({"image_size": 18}, ValueError, "image_size.*divisible"),
        ({"num_head_channels": 5}, ValueError, "num_head_channels"),
        ({"num_heads": 3}, ValueError, "num_heads"),
        ({"num_head_channels": 0}, ValueError, "num_head_channels"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"channel_mult": ()}, ValueError, "channel_mult"),
        ({"channel_mult": (1, 0)}, ValueError, "channel_mult"),
        ({"model_channels": 0}, ValueError, "model_channels"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"low_res_channels": -1}, ValueError, "low_res_channels"),
        ({"num_res_blocks": 1.5}, TypeError, "num_res_blocks"),
        ({"use_scale_shift_norm": 1}, TypeError, "use_scale_shift_norm"),
    ],
)
def test_config_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_unet_requires_a_config():
    with pytest.raises(TypeError, match="config"):
        UNet({"image_size": 16})


# ---- bad inputs -----------------------------------------------------------------------------------------------


def test_bad_forward_inputs():
    model = UNet(tiny_config())
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 1, 8, 8), 1)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(1, 16, 16), 1)
    with pytest.raises(TypeError, match="x must be"):
        model(torch.zeros(2, 1, 16, 16, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="class_labels must lie in"):
        model(x, 1, class_labels=torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class_labels must lie in"):
        model(x, 1, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="class_labels"):
        model(x, 1, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="class_labels must have shape"):
        model(x, 1, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="low_res given"):
        model(x, 1, low_res=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels given to an unconditional model"):
        UNet(tiny_config(num_classes=None))(x, 1, class_labels=torch.tensor([0, 1]))
    sr = UNet(tiny_config(low_res_channels=1))
    with pytest.raises(ValueError, match="low_res is required"):
        sr(x, 1)
    with pytest.raises(ValueError, match="low_res must have shape"):
        sr(x, 1, low_res=torch.randn(2, 3, 8, 8))

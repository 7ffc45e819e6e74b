"""ONNX export (fastdiff.export.onnx, the `fastdiff export` CLI) against eager PyTorch, run with onnxruntime on CPU.

Exports take seconds (1-2 s with the TorchScript tracer, 10-30 s with the dynamo exporter), so every exported
file is made once per module and shared. Parity tolerance: max abs difference <= 1e-4 in float32 (what `to_onnx` itself enforces).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx

from fastdiff.errors import CheckpointError, FastdiffError
from fastdiff.export import ExportReport, OnnxDenoiser, to_onnx
from fastdiff.export.onnx import onnx_metadata
from fastdiff.export.runtime import sidecar_path
from fastdiff.kernels import attention, attention_reference, group_norm_silu
from fastdiff.kernels.backend import decomposed, decomposing
from fastdiff.models import UNet, UNetConfig
from fastdiff.models.unet import AttentionBlock, GroupNormSiLU
from fastdiff.samplers import DDIMSampler, sample
from fastdiff.schedule import NoiseSchedule

ATOL = 1e-4
DIGITS_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "fastdiff", "weights", "digits.safetensors")


def _randomize_zero_params(model: nn.Module) -> nn.Module:
    """ADM zero-initialises every residual branch and the output conv: give them weights so outputs are not 0."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _digits() -> tuple[nn.Module, NoiseSchedule, bool]:
    """The shipped digits model when its checkpoint exists, else the digits preset with random weights."""
    if os.path.exists(DIGITS_CHECKPOINT):
        from fastdiff.pretrained import load_pretrained

        pre = load_pretrained("digits")
        return pre.model, pre.schedule, True
    model = _randomize_zero_params(UNet(UNetConfig.preset("digits")))
    return model, NoiseSchedule.from_kind("cosine"), False


def _tiny_unet(**overrides) -> UNet:
    config = dict(
        image_size=8,
        in_channels=1,
        model_channels=8,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(1, 2),
        num_groups=4,
        use_scale_shift_norm=True,
        num_classes=3,
    )
    config.update(overrides)
    return _randomize_zero_params(UNet(UNetConfig(**config)))


def _domains(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {node.domain for node in model.graph.node} | {f.domain for f in model.functions}


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model, schedule, trained = _digits()
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    report = to_onnx(
        model, path, sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}, return_report=True
    )
    return model, schedule, trained, report


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    # The ddpm-cifar10 structure (4 levels, 2 res blocks, attention at 16x16, 32 groups) at a quarter of the width:
    # tracing costs the same per op, the full 35.7M-parameter preset only adds weight and eager/ORT compute time.
    model = _randomize_zero_params(UNet(UNetConfig.preset("ddpm-cifar10", model_channels=32)))
    path = tmp_path_factory.mktemp("cifar") / "cifar.onnx"
    return model, to_onnx(model, path, sample_shape=(2, 3, 32, 32), return_report=True)


def _diffusers_unet2d():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=10,
    ).eval()


def _diffusers_unet2d_condition():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()


@pytest.fixture(scope="module")
def unet2d(tmp_path_factory):
    model = _diffusers_unet2d()
    path = tmp_path_factory.mktemp("unet2d") / "unet2d.onnx"
    to_onnx(model, path, sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)})
    return model, path


@pytest.fixture(scope="module")
def unet2d_condition(tmp_path_factory):
    model = _diffusers_unet2d_condition()
    path = tmp_path_factory.mktemp("unet2dc") / "unet2dc.onnx"
    to_onnx(model, path, sample_shape=(2, 4, 8, 8), cond_shapes={"encoder_hidden_states": (2, 5, 16)})
    return model, path


def _check_parity(model, path, sample_shape, cond_fn, *, batches=(1, 5)):
    denoiser = OnnxDenoiser(path, ["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        x = torch.randn((batch, *sample_shape), generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        cond = cond_fn(batch, gen)
        with torch.no_grad():
            expected = model(x, t, **cond)
        expected = expected[0] if isinstance(expected, tuple) else getattr(expected, "sample", expected)
        got = denoiser(x, t, **cond)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert expected.abs().max() > 1e-2  # a graph of zeros would match anything
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ parity


def test_digits_parity_at_other_batches(digits):
    model, _, _, report = digits
    assert isinstance(report, ExportReport) and report.path.is_file()
    assert report.max_abs_diff <= ATOL and report.atol == ATOL
    assert report.exporter == "torchscript" and not report.external_data

    def labels(batch, gen):
        return {"class_labels": torch.randint(0, 11, (batch,), generator=gen)}  # 10 is the null label

    _check_parity(model, report.path, (1, 8, 8), labels)


def test_digits_graph_signature_metadata_and_standard_ops(digits):
    _, _, _, report = digits
    proto = onnx.load(str(report.path))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep", "class_labels"]
    assert [o.name for o in proto.graph.output] == ["eps"]
    for tensor in proto.graph.input:
        assert tensor.type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert _domains(report.path) <= {"", "ai.onnx"}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fastdiff.null_class_label"] == "10" and meta["fastdiff.num_classes"] == "10"
    assert meta["fastdiff.exporter"] == "torchscript"
    denoiser = OnnxDenoiser(report.path)
    assert denoiser.cond_names == ["class_labels"] and denoiser.null_label == 10
    y = torch.tensor([3, 7])
    assert torch.equal(denoiser.null_cond({"class_labels": y})["class_labels"], torch.tensor([10, 10]))


def test_ddpm_cifar10_structure_parity(cifar):
    model, report = cifar
    assert report.max_abs_diff <= ATOL
    _check_parity(model, report.path, (3, 32, 32), lambda batch, gen: {})
    denoiser = OnnxDenoiser(report.path)
    assert denoiser.cond_names == [] and not hasattr(denoiser, "null_cond")


def test_diffusers_unet2d_parity(unet2d):
    model, path = unet2d

    def labels(batch, gen):
        return {"class_labels": torch.randint(0, 10, (batch,), generator=gen)}

    _check_parity(model, path, (1, 8, 8), labels)
    assert _domains(path) <= {"", "ai.onnx"}
    assert OnnxDenoiser(path).null_label is None  # diffusers has no null class unless told (as_denoiser)


def test_a_wrapped_model_exports_with_the_digest_of_the_weights_it_wraps(unet2d, tmp_path):
    """as_denoiser wraps a diffusers U-Net in a module whose state_dict names the weights differently; the export
    records the wrapped weights' digest, so the wrapper and the bare model are both its source (the planner binds
    the wrapper: an SD 1.5 benchmark failed with StaleWeightsError before)."""
    from fastdiff.accelerate import as_denoiser

    model, _ = unet2d
    wrapped = as_denoiser(model)
    assert wrapped is not model
    path = to_onnx(
        wrapped, tmp_path / "w.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    for source in (wrapped, model):
        denoiser = OnnxDenoiser(path, ["CPUExecutionProvider"], source=source)
        x, t = torch.zeros(1, 1, 8, 8), torch.tensor([10])
        out = denoiser(x, t, class_labels=torch.tensor([3]))
        torch.testing.assert_close(out, model(x, t, class_labels=torch.tensor([3])).sample, rtol=0, atol=ATOL)


def test_diffusers_unet2d_condition_parity(unet2d_condition):
    model, path = unet2d_condition

    def text(batch, gen):
        return {"encoder_hidden_states": torch.randn((batch, 5, 16), generator=gen)}

    _check_parity(model, path, (4, 8, 8), text)
    assert OnnxDenoiser(path).cond_names == ["encoder_hidden_states"]


def test_accelerated_model_exports_as_standard_ops(tmp_path):
    try:
        from fastdiff.accelerate import accelerate
    except ImportError:
        accelerate = None
    model = _tiny_unet()
    if accelerate is not None:
        fast = accelerate(model, kernels="auto")
    else:  # what accelerate() does to our U-Net: flip every fused module's backend
        fast = _tiny_unet()
        for m in fast.modules():
            if isinstance(m, (GroupNormSiLU, AttentionBlock)):
                m.backend = "auto"
    assert any(getattr(m, "backend", "torch") == "auto" for m in fast.modules())
    path = to_onnx(
        fast, tmp_path / "fast.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    domains = _domains(path)
    assert not any("fastdiff" in d for d in domains) and domains <= {"", "ai.onnx"}

    def labels(batch, gen):
        return {"class_labels": torch.randint(0, 4, (batch,), generator=gen)}

    _check_parity(model, path, (1, 8, 8), labels, batches=(3,))


def test_decomposed_mode_runs_references_and_restores():
    x = torch.randn(2, 4, 3, 3)
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind()
    assert not decomposing()
    with decomposed():
        assert decomposing()
        # "triton" cannot run on CPU without the interpreter: in decomposed mode the reference runs instead
        y = group_norm_silu(x, 2, None, None, backend="triton")
        torch.testing.assert_close(attention(q, k, v, backend="triton"), attention_reference(q, k, v))
        with pytest.raises(ValueError, match="backend"):
            group_norm_silu(x, 2, None, None, backend="cuda")
    assert not decomposing()
    torch.testing.assert_close(y, group_norm_silu(x, 2, None, None, backend="torch"))
    with pytest.raises(RuntimeError), decomposed():
        raise RuntimeError("boom")
    assert not decomposing()


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_with_onnx_matches_pytorch(digits):
    model, schedule, _, report = digits
    sampler = DDIMSampler(schedule, 20)
    labels = torch.arange(10)
    results = []
    for denoiser in (model, OnnxDenoiser(report.path)):
        results.append(
            sample(
                denoiser,
                sampler,
                (10, 1, 8, 8),
                generator=torch.Generator().manual_seed(0),
                cond={"class_labels": labels},
                guidance_scale=2.0,
            )
        )
    eager, onnx_run = results
    assert eager.abs().max() > 0.1
    # Per-call differences of ~1e-6 grow through 20 DDIM steps: the images agree to 1e-3 (0.13 of one 8-bit level).
    torch.testing.assert_close(onnx_run, eager, atol=1e-3, rtol=0)
    from fastdiff.output import to_uint8

    levels = np.abs(to_uint8(onnx_run).astype(int) - to_uint8(eager).astype(int))
    assert levels.max() <= 1
    try:
        from fastdiff.engine import SamplingEngine
    except ImportError:
        return
    engine_run = SamplingEngine(OnnxDenoiser(report.path), sampler, backend="eager").sample(
        (10, 1, 8, 8),
        generator=torch.Generator().manual_seed(0),
        cond={"class_labels": labels},
        guidance_scale=2.0,
    )
    torch.testing.assert_close(engine_run, onnx_run, atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_onnx_denoiser_on_cuda_uses_io_binding(digits):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    model, _, _, report = digits
    denoiser = OnnxDenoiser(report.path)
    assert denoiser.cuda
    x = torch.randn(5, 1, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (5,), device="cuda")
    y = torch.randint(0, 11, (5,), device="cuda")
    with torch.no_grad():
        expected = copy.deepcopy(model).cuda()(x, t, y)
    out = denoiser(x, t, class_labels=y)
    assert out.is_cuda
    # cuDNN may pick TF32 convolutions
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ runtime errors


def test_onnx_denoiser_with_source_never_runs_stale_weights(digits, tmp_path):
    """The file's weights digest is checked against `source` when the denoiser is made; every call checks the
    source's fingerprint, tells a rewrite of the same values from a change, and names the call that fixes it."""
    import fastdiff
    from fastdiff.errors import StaleWeightsError

    model, _, _, report = digits
    model = copy.deepcopy(model)
    denoiser = OnnxDenoiser(report.path, source=fastdiff.as_denoiser(model))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    out = denoiser(x, t, class_labels=y)
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # the same values written again
    torch.testing.assert_close(denoiser(x, t, class_labels=y), out, rtol=0, atol=0)
    fastdiff.update_weights(model, {k: v * 1.1 for k, v in model.state_dict().items()})
    with pytest.raises(StaleWeightsError, match=r"have changed; re-export it: fastdiff\.export\.to_onnx"):
        denoiser(x, t, class_labels=y)
    with pytest.raises(StaleWeightsError, match="exported from other weights"):
        OnnxDenoiser(report.path, source=model)
    with pytest.raises(StaleWeightsError, match="holds its own copy of the weights"):
        fastdiff.update_weights(denoiser, model.state_dict())
    with pytest.raises(TypeError, match="source must be"):
        OnnxDenoiser(report.path, source=object())
    path = to_onnx(
        model, tmp_path / "new.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    with torch.no_grad():
        expected = model(x, t, y)
    torch.testing.assert_close(
        OnnxDenoiser(path, source=model)(x, t, class_labels=y), expected, rtol=0, atol=ATOL
    )
    assert (expected - out).abs().max() > 1e-3


@pytest.mark.parametrize("loop", ["sample", "engine"])
def test_a_sampling_run_checks_the_source_once_and_after_each_callback(digits, loop):
    """Inside fastdiff's loops no user code runs between two calls except callbacks: the run checks the source
    (fingerprint and content) once before its first step and after each callback, and its calls skip the
    per-call fingerprint check; a direct call outside a run still checks."""
    import fastdiff
    from fastdiff.errors import StaleWeightsError

    model, schedule, _, report = digits
    model = copy.deepcopy(model)
    denoiser = OnnxDenoiser(report.path, source=model)
    calls = {"check_source": 0, "check_weights": 0}
    for name in calls:
        real = getattr(denoiser, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(denoiser, name, counted)
    sampler = fastdiff.DDIMSampler(schedule, num_steps=4)
    engine = fastdiff.SamplingEngine(denoiser, sampler, backend="eager")  # one run per sample(): no planning
    runner = fastdiff.sample if loop == "sample" else engine.sample
    args = (denoiser, sampler) if loop == "sample" else ()
    kwargs = {"cond": {"class_labels": torch.tensor([1, 2])}, "generator": torch.Generator().manual_seed(0)}
    runner(*args, (2, 1, 8, 8), **kwargs)
    assert calls == {"check_source": 0, "check_weights": 1}
    denoiser(torch.randn(2, 1, 8, 8), torch.tensor([5, 6]), class_labels=torch.tensor([1, 2]))
    assert calls["check_source"] == 1  # a direct call checks

    def change_weights(info):
        if info["i"] == 1:
            fastdiff.update_weights(model, {k: v * 1.1 for k, v in model.state_dict().items()})

    with pytest.raises(StaleWeightsError, match="have changed"):
        runner(*args, (2, 1, 8, 8), callback=change_weights, **kwargs)
    assert calls["check_weights"] == 1 + 1 + 2  # both runs' starts, the callbacks of steps 0 and 1 (raised)


def test_onnx_denoiser_rejects_bad_inputs(digits, unet2d):
    _, _, _, report = digits
    denoiser = OnnxDenoiser(report.path)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 9]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"'sample'.*shape"):
        denoiser(torch.randn(2, 1, 16, 16), t, class_labels=y)
    with pytest.raises(ValueError, match=r"'sample'.*dtype"):
        denoiser(x.double(), t, class_labels=y)
    with pytest.raises(ValueError, match="'timestep'"):
        denoiser(x, torch.tensor([1, 2, 3]), class_labels=y)
    with pytest.raises(ValueError, match=r"'class_labels'.*integer"):
        denoiser(x, t, class_labels=y.float())
    with pytest.raises(ValueError, match=r"'class_labels'.*shape"):
        denoiser(x, t, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        denoiser(x, t, class_labels=y, encoder_hidden_states=torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="x must be"):
        denoiser(x.numpy(), t, class_labels=y)
    # the null label fills a missing class_labels; a number is a timestep for the whole batch
    torch.testing.assert_close(
        denoiser(x, 5), denoiser(x, t.new_tensor([5, 5]), class_labels=torch.tensor([10, 10]))
    )
    no_null = OnnxDenoiser(unet2d[1])
    with pytest.raises(ValueError, match="missing conditioning input 'class_labels'"):
        no_null(x, t)
    with pytest.raises(ValueError, match="providers"):
        OnnxDenoiser(report.path, providers=["NoSuchExecutionProvider"])


def test_corrupt_truncated_and_missing_files(digits, tmp_path):
    _, _, _, report = digits
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 100)
    with pytest.raises(CheckpointError, match=r"corrupt\.onnx"):
        OnnxDenoiser(corrupt)
    truncated = tmp_path / "truncated.onnx"
    data = report.path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.onnx"):
        OnnxDenoiser(truncated)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        OnnxDenoiser(tmp_path / "missing.onnx")


def test_bit_flips_are_caught_by_the_sidecar(digits, tmp_path):
    _, _, _, report = digits
    assert OnnxDenoiser(report.path).verified
    data = bytearray(report.path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the weights: onnxruntime alone would load it
    flipped = tmp_path / report.path.name
    flipped.write_bytes(bytes(data))
    shutil.copy(sidecar_path(report.path), sidecar_path(flipped))
    with pytest.raises(CheckpointError, match=rf"{flipped.name} is corrupt: its sha256 does not match"):
        OnnxDenoiser(flipped)
    sidecar_path(flipped).unlink()  # a file exported elsewhere has no sidecar: loaded, but not verified
    assert not OnnxDenoiser(flipped).verified


# ------------------------------------------------------------------------------------------------ export errors


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.conv(x)


def test_export_fails_early_on_bad_paths_and_arguments(tmp_path):
    model = _Recorder()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, tmp_path / "missing" / "m.onnx", sample_shape=(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\.onnx"):
        to_onnx(model, tmp_path / "m.txt", sample_shape=(2, 1, 4, 4))
    with pytest.raises(ValueError, match="sample_shape"):
        to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 0, 4))
    with pytest.raises(ValueError, match="cond_shapes"):
        to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), cond_shapes={"class_labels": (3,)})
    with pytest.raises(ValueError, match="cond_shapes"):
        to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), cond_shapes={"timestep": (2,)})
    with pytest.raises(TypeError, match="model"):
        to_onnx(lambda x, t: x, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4))
    with pytest.raises(ValueError, match="atol"):
        to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), atol=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), dtype=torch.int64)
    assert model.calls == 0 and _files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only folders")
def test_export_fails_early_in_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            to_onnx(_Recorder(), folder / "m.onnx", sample_shape=(2, 1, 4, 4))
    finally:
        folder.chmod(0o700)


class _TracedDiffers(nn.Module):
    """Exports a different function than it runs eagerly: to_onnx's parity check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.conv(x) * (2.0 if decomposing() else 1.0)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        if decomposing():
            raise RuntimeError("cannot be traced")
        return self.conv(x)


def test_parity_failure_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(FastdiffError, match="differs from eager"):
        to_onnx(_TracedDiffers(), tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4))
    assert _files(tmp_path) == []
    with pytest.raises(FastdiffError, match="both exporters"):
        to_onnx(_Untraceable(), tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4))
    assert _files(tmp_path) == []


class _DataDependent(nn.Module):
    """Branches on a tensor value: torch.export refuses it, the TorchScript tracer records the branch taken."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        y = self.conv(x)
        return y * 2 if (t > -1).all() else y


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.conv(x)


def test_auto_falls_back_to_dynamo_when_the_tracer_fails_and_logs_it(tmp_path, caplog, monkeypatch):
    real_export = torch.onnx.export

    def export_without_tracer(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter was removed")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_without_tracer)
    model = _Plain()
    with caplog.at_level(logging.INFO, logger="fastdiff.export"):
        report = to_onnx(model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), return_report=True)
    assert report.exporter == "dynamo" and report.max_abs_diff <= ATOL
    assert (
        "the torchscript ONNX exporter failed (RuntimeError: the TorchScript exporter was removed)"
        in caplog.text
    )
    assert "with the dynamo exporter" in caplog.text
    assert _files(tmp_path) == ["m.onnx", "m.onnx.sha256"]
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            OnnxDenoiser(report.path)(x, torch.zeros(3)), model(x, None), atol=ATOL, rtol=0
        )


def test_a_named_exporter_is_the_only_one_tried(tmp_path):
    model = _DataDependent()
    # The tracer records the branch taken (the parity check passes: every timestep here is > -1) ...
    report = to_onnx(
        model, tmp_path / "m.onnx", sample_shape=(2, 1, 4, 4), exporter="torchscript", return_report=True
    )
    assert report.exporter == "torchscript" and report.max_abs_diff <= ATOL
    # ... torch.export refuses the branch, and nothing else is tried.
    with pytest.raises(FastdiffError, match=r"failed with the exporter \(dynamo: "):
        to_onnx(model, tmp_path / "d.onnx", sample_shape=(2, 1, 4, 4), exporter="dynamo")
    assert _files(tmp_path) == ["m.onnx", "m.onnx.sha256"]
    with pytest.raises(ValueError, match="exporter must be 'auto', 'torchscript' or 'dynamo', got 'onnx'"):
        to_onnx(model, tmp_path / "x.onnx", sample_shape=(2, 1, 4, 4), exporter="onnx")


def test_large_model_path_writes_external_data(tmp_path, monkeypatch):
    # Weights above EXTERNAL_DATA_BYTES go to `<name>.onnx.data`; lower the threshold instead of building 2 GB.
    monkeypatch.setattr("fastdiff.export.onnx.EXTERNAL_DATA_BYTES", 0)
    model = _tiny_unet(num_classes=None)
    report = to_onnx(model, tmp_path / "big.onnx", sample_shape=(2, 1, 8, 8), return_report=True)
    assert report.external_data and _files(tmp_path) == ["big.onnx", "big.onnx.data", "big.onnx.sha256"]
    assert report.size_bytes == sum(f.stat().st_size for f in tmp_path.iterdir() if f.suffix != ".sha256")
    _check_parity(model, report.path, (1, 8, 8), lambda batch, gen: {}, batches=(3,))
    (tmp_path / "big.onnx.data").unlink()  # the weights really are in it
    with pytest.raises(CheckpointError, match=r"big\.onnx"):
        OnnxDenoiser(report.path)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fastdiff.pretrained import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(path, _tiny_unet(), {"kind": "linear"})


def test_cli_export_onnx(tiny_checkpoint, tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "tiny.onnx"
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_checkpoint),
                "--format",
                "onnx",
                "--batch",
                "1:3:8",
                "--exporter",
                "torchscript",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "max abs diff vs eager" in line and str(out) in line and "MB" in line
    assert onnx_metadata(out)["fastdiff.exporter"] == "torchscript"
    denoiser = OnnxDenoiser(out)
    assert denoiser.cond_names == ["class_labels"] and denoiser.null_label == 3
    assert _files(tmp_path) == ["tiny.onnx", "tiny.onnx.sha256"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "8:2:4"], "--batch"),
        (["--batch", "x"], "--batch"),
        (["--model", "nope"], "unknown model"),
        (["--out", "{tmp}/model.txt"], ".onnx"),
        (["--out", "{tmp}/missing/m.onnx"], "does not exist"),
    ],
)
def test_cli_export_errors(argv, message, tmp_path, capsys):
    from fastdiff.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "m.onnx")]
    assert main(["export", *argv]) == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_cli_export_refuses_an_unknown_exporter(tmp_path, capsys):
    from fastdiff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--exporter", "jit", "--out", str(tmp_path / "m.onnx")])
    assert exit_.value.code == 2 and "--exporter: invalid choice: 'jit'" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_cli_tensorrt_without_tensorrt_names_the_extra(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    from fastdiff.cli import main

    assert main(["export", "--format", "tensorrt", "--out", str(tmp_path / "m.engine")]) == 2
    assert "fastdiff[tensorrt]" in capsys.readouterr().err
    assert _files(tmp_path) == []

"""TensorRT export (fastdiff.export.tensorrt): argument validation and the missing-extra error run everywhere;
building and running engines needs a CUDA GPU with tensorrt (marked `cuda`, skipped otherwise)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from fastdiff.errors import CheckpointError
from fastdiff.export import TensorRTDenoiser, build_tensorrt_engine

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def onnx_file(tmp_path):
    """A placeholder: validation happens before the file is parsed."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"placeholder")
    return path


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_batch": 0}, ValueError, "min_batch"),
        ({"opt_batch": 2.0}, ValueError, "opt_batch"),
        ({"max_batch": True}, ValueError, "max_batch"),
        ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, ValueError, "min_batch <= opt_batch <= max_batch"),
        ({"opt_batch": 16, "max_batch": 8}, ValueError, "min_batch <= opt_batch <= max_batch"),
        ({"fp16": "yes"}, TypeError, "fp16"),
        ({"bf16": 1}, TypeError, "bf16"),
        ({"refittable": "yes"}, TypeError, "refittable"),
        ({"workspace_gb": 0}, ValueError, "workspace_gb"),
        ({"workspace_gb": -1.5}, ValueError, "workspace_gb"),
    ],
)
def test_build_validates_arguments_before_importing_tensorrt(onnx_file, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_tensorrt_engine(onnx_file, tmp_path / "model.engine", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_checks_files_before_importing_tensorrt(onnx_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "model.engine")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tensorrt_engine(onnx_file, tmp_path / "no" / "model.engine")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tensorrt_engine(onnx_file, tmp_path / "model.engine", timing_cache=tmp_path / "no" / "cache")
    with pytest.raises(FileNotFoundError, match=r"missing\.engine"):
        TensorRTDenoiser(tmp_path / "missing.engine")
    with pytest.raises(TypeError, match="null_label"):
        TensorRTDenoiser(onnx_file, null_label="10")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")
def test_without_tensorrt_the_error_names_the_extra(onnx_file, tmp_path):
    with pytest.raises(ImportError, match=r"fastdiff\[tensorrt\]"):
        build_tensorrt_engine(onnx_file, tmp_path / "model.engine")
    with pytest.raises(ImportError, match=r"fastdiff\[tensorrt\]"):
        TensorRTDenoiser(onnx_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ------------------------------------------------------------------------------------------------ GPU


def gpu(test):
    """A test that builds or runs engines: needs a CUDA GPU and tensorrt."""
    test = pytest.mark.skipif(
        not HAS_TENSORRT, reason='tensorrt is not installed (pip install "fastdiff[tensorrt]")'
    )(test)
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The digits U-Net (random weights, non-zero output) on the GPU and its ONNX graph."""
    pytest.importorskip("onnxruntime")
    from fastdiff.export import to_onnx
    from fastdiff.models import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("digits")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("trt")
    path = to_onnx(
        model, folder / "digits.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    return model.cuda(), path, folder


@pytest.fixture(scope="module")
def engines(exported):
    """fp32 (TensorRT may use TF32) and fp16 engines for batches 1..8, sharing one timing cache."""
    _, path, folder = exported
    cache = folder / "timing.cache"
    built = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        built[name] = build_tensorrt_engine(
            path,
            folder / f"{name}.engine",
            min_batch=1,
            opt_batch=4,
            max_batch=8,
            fp16=fp16,
            timing_cache=cache,
        )
    assert cache.is_file() and cache.stat().st_size > 0
    return built


def _inputs(batch: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    y = torch.randint(0, 11, (batch,), device="cuda", generator=gen)
    return x, t, y


@gpu
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 5e-3), ("fp16", 5e-2)])
@pytest.mark.parametrize("batch", [1, 5, 8])
def test_engine_matches_eager(exported, engines, precision, atol, batch):
    model = exported[0]
    denoiser = TensorRTDenoiser(engines[precision], null_label=10)
    assert denoiser.cond_names == ["class_labels"] and denoiser.batch_range == (1, 8)
    x, t, y = _inputs(batch)
    with torch.no_grad():
        expected = model(x, t, y)
    assert expected.abs().max() > 1e-2
    out = denoiser(x, t, class_labels=y)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    torch.testing.assert_close(
        denoiser(x, t), model(x, t), atol=atol, rtol=0
    )  # missing labels: the null label


@gpu
def test_engine_call_is_cuda_graph_capturable(engines):
    denoiser = TensorRTDenoiser(engines["fp32"])
    x, t, y = _inputs(4)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        denoiser(static_x, t, class_labels=y)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = denoiser(static_x, t, class_labels=y)
    new_x = _inputs(4, seed=1)[0]
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, denoiser(new_x, t, class_labels=y), atol=0, rtol=0)


@gpu
def test_engine_errors(engines, tmp_path):
    denoiser = TensorRTDenoiser(engines["fp32"])
    x, t, y = _inputs(9)
    with pytest.raises(ValueError, match=r"built for 1\.\.8"):
        denoiser(x, t, class_labels=y)
    with pytest.raises(ValueError, match="CUDA"):
        denoiser(x[:2].cpu(), t[:2].cpu(), class_labels=y[:2].cpu())
    with pytest.raises(ValueError, match=r"'sample'.*shape"):
        denoiser(torch.randn(2, 1, 4, 4, device="cuda"), t[:2], class_labels=y[:2])
    with pytest.raises(AttributeError):
        denoiser.null_cond  # noqa: B018 - no null label was given
    corrupt = tmp_path / "corrupt.engine"
    corrupt.write_bytes(engines["fp32"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"corrupt\.engine"):
        TensorRTDenoiser(corrupt)


@gpu
def test_refit_follows_new_weights_without_a_rebuild(exported, tmp_path):
    """A refittable engine with its source watched: new weights make calls fail with StaleWeightsError until the
    ONNX graph is re-exported and the engine refitted from it; then it matches the new weights."""
    from fastdiff import StaleWeightsError, update_weights
    from fastdiff.export import to_onnx

    model, path, _ = exported
    model = copy.deepcopy(model)
    engine = build_tensorrt_engine(path, tmp_path / "refit.engine", max_batch=2, fp16=False, refittable=True)
    denoiser = TensorRTDenoiser(engine, source=model)
    x, t, y = _inputs(2)
    denoiser(x, t, class_labels=y)
    update_weights(model, {k: v * 1.1 for k, v in model.state_dict().items()})
    with pytest.raises(StaleWeightsError, match=r"refit"):
        denoiser(x, t, class_labels=y)
    new_onnx = to_onnx(
        model, tmp_path / "new.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    denoiser.refit(new_onnx)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, class_labels=y), model(x, t, y), atol=5e-3, rtol=0)

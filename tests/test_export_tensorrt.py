"""TensorRT export (fastdiff.export.tensorrt): argument validation and the missing-extra error run everywhere;
building and running engines needs a CUDA GPU with tensorrt (marked `cuda`, skipped otherwise)."""

from __future__ import annotations

import copy
import importlib.util
import types

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


# ------------------------------------------------------------------------- refit, through a stand-in tensorrt


class FakeTensorRT(types.ModuleType):
    """The slice of the tensorrt 10 API that TensorRTDenoiser and its refit use, on the CPU. An engine is its IO
    ports and its named weights (the initializers of the ONNX file it was 'built' from); the ONNX parser-refitter
    hands the refitter every initializer of a file by name (`set_named_weights`), as TensorRT's parser names
    weights after the ONNX initializers; `handed` keeps what it was given. Nothing here computes outputs."""

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    def __init__(self, onnx_path, refittable=True):
        super().__init__("tensorrt")
        from fastdiff.export import OnnxDenoiser
        from fastdiff.export.tensorrt import _TRT_DTYPES

        graph = OnnxDenoiser(onnx_path)
        names = {dtype: name for name, dtype in _TRT_DTYPES.items()}
        fake = self

        class Engine:
            def __init__(self):
                self.refittable = refittable
                self.weights = fake.initializers(onnx_path)
                self.ports = [(p, fake.TensorIOMode.INPUT) for p in graph.inputs]
                self.ports += [(p, fake.TensorIOMode.OUTPUT) for p in graph.outputs]
                self.num_io_tensors = len(self.ports)

            def _port(self, name):
                return next(p for p in self.ports if p[0].name == name)

            def get_tensor_name(self, i):
                return self.ports[i][0].name

            def get_tensor_dtype(self, name):
                return types.SimpleNamespace(name=names[self._port(name)[0].dtype])

            def get_tensor_shape(self, name):
                return tuple(-1 if d is None else d for d in self._port(name)[0].shape)

            def get_tensor_mode(self, name):
                return self._port(name)[1]

            def get_tensor_profile_shape(self, name, profile):
                return (1, 2), (2, 2), (4, 2)

            def create_execution_context(self):
                return object()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine() if data == b"fake engine" else None

        class Refitter:
            def __init__(self, engine, logger):
                self.engine, self.pending = engine, {}

            def set_named_weights(self, name, weights):
                old = self.engine.weights.get(name)
                if old is None or old.shape != weights.shape or old.dtype != weights.dtype:
                    return False
                self.pending[name] = weights
                fake.handed[name] = weights
                return True

            def get_missing_weights(self):
                return [n for n in self.engine.weights if n not in self.pending]

            def refit_cuda_engine(self):
                self.engine.weights.update(self.pending)
                return True

        class OnnxParserRefitter:
            num_errors = 0

            def __init__(self, refitter, logger):
                self.refitter = refitter

            def refit_from_file(self, path):
                wanted = fake.initializers(path)
                return all(
                    self.refitter.set_named_weights(n, wanted[n]) for n in self.refitter.engine.weights
                )

        self.Runtime, self.Refitter, self.OnnxParserRefitter = Runtime, Refitter, OnnxParserRefitter
        self.handed = {}

    @staticmethod
    def initializers(path):
        import onnx
        from onnx import numpy_helper

        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_refit_hands_tensorrt_the_new_weights_by_name(tmp_path, monkeypatch):
    """Through the stand-in: stale weights are refused on the next check; refit from the re-exported file hands
    the refitter the module's new weights under their names and leaves the denoiser current; a file exported
    from other weights is refused before the engine is touched; a non-refittable engine names the rebuild."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from fastdiff import StaleWeightsError
    from fastdiff.errors import FastdiffError
    from fastdiff.export import tensorrt as trt_module
    from fastdiff.export import to_onnx
    from fastdiff.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, num_layers=1).eval()
    old_onnx = to_onnx(model, tmp_path / "old.onnx", sample_shape=(2, 2))
    engine_path = tmp_path / "m.engine"
    engine_path.write_bytes(b"fake engine")
    fake = FakeTensorRT(old_onnx)
    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: fake)
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        denoiser = TensorRTDenoiser(engine_path, source=model)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    # no version bump: the per-call sampled bytes and the per-run checksum see it
    for p in model.parameters():
        p.data.copy_(p.data * 1.5)
    for check in (denoiser.check_source, denoiser.check_weights):
        with pytest.raises(StaleWeightsError, match=r"refit\(onnx_path\)"):
            check()
    with pytest.raises(StaleWeightsError, match="other weights than source's current"):
        denoiser.refit(old_onnx)
    assert fake.handed == {}
    new_onnx = to_onnx(model, tmp_path / "new.onnx", sample_shape=(2, 2))
    denoiser.refit(new_onnx)
    new = model.state_dict()
    compared = [k for k in new if f"model.{k}" in fake.handed]
    assert {k for k, v in new.items() if v.dim() == 2} <= set(compared)  # every Linear weight
    for key in compared:
        np.testing.assert_array_equal(fake.handed[f"model.{key}"], new[key].numpy(), err_msg=key)
        assert not np.array_equal(fake.handed[f"model.{key}"], old[key].numpy()) or not old[key].any()
    assert fake.handed.keys() == denoiser.engine.weights.keys()
    denoiser.check_weights()  # current again
    with pytest.raises(FileNotFoundError, match="missing"):
        denoiser.refit(tmp_path / "missing.onnx")
    denoiser.engine.refittable = False
    with pytest.raises(FastdiffError, match="refittable=True"):
        denoiser.refit(new_onnx)


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
    with pytest.raises(StaleWeightsError, match="other weights than source's current"):
        denoiser.refit(path)  # the old export: refused before the engine is touched
    new_onnx = to_onnx(
        model, tmp_path / "new.onnx", sample_shape=(2, 1, 8, 8), cond_shapes={"class_labels": (2,)}
    )
    denoiser.refit(new_onnx)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, class_labels=y), model(x, t, y), atol=5e-3, rtol=0)
    for p in model.parameters():
        p.data.copy_(p.data * 0.9)  # no version bump: the per-run check sees it
    with pytest.raises(StaleWeightsError, match=r"refit"):
        denoiser.check_weights()

"""OpenVINO export (fastdiff.export.openvino, `fastdiff export --format openvino`) against eager PyTorch, on CPU.

Tolerance: max abs difference <= 1e-4 per call in float32 with the f32 precision hint (what `to_openvino` itself
enforces; measured about 2e-6 on the digits U-Net). Two ONNX exports in all (the digits U-Net through the CLI, a
small MLP through `to_onnx`): the other `to_openvino` calls reuse the MLP's ONNX file instead of exporting again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import openvino as ov

from fastdiff.cli import main
from fastdiff.errors import CheckpointError, FastdiffError, StaleWeightsError
from fastdiff.export import OpenVinoDenoiser, to_onnx, to_openvino
from fastdiff.export import openvino as ov_export
from fastdiff.export.runtime import sidecar_path
from fastdiff.models import MLPDenoiser
from fastdiff.pretrained import load_pretrained
from fastdiff.samplers import DDIMSampler, sample

ATOL = 1e-4


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The shipped digits U-Net exported by `fastdiff export --format openvino` (the CLI round trip)."""
    folder = tmp_path_factory.mktemp("digits")
    out = folder / "digits.xml"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["export", "--model", "digits", "--format", "openvino", "--batch", "1:2:8", "--out", str(out)]
        )
    assert code == 0
    return load_pretrained("digits"), out, stdout.getvalue().strip()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """(model, its ONNX export report): a small MLP for 2-D points."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    return model, to_onnx(model, path, sample_shape=(2, 2), return_report=True)


@pytest.fixture
def reuse_mlp_onnx(mlp, monkeypatch):
    """`to_openvino` on the MLP without a second ONNX export: its ONNX step copies the module's file."""
    _, report = mlp

    def copy_export(model, path, **kwargs):
        shutil.copy(report.path, path)
        return dataclasses.replace(report, path=path)

    monkeypatch.setattr(ov_export, "to_onnx", copy_export)


# ------------------------------------------------------------------------------------------------ parity


def test_cli_round_trip(digits):
    pre, out, line = digits
    assert str(out) in line and "OpenVINO f32" in line and "max abs diff vs eager" in line
    # no temporary files or ONNX left behind
    assert _files(out.parent) == ["digits.bin", "digits.xml", "digits.xml.sha256"]
    denoiser = OpenVinoDenoiser(out)
    assert denoiser.verified
    assert denoiser.cond_names == ["class_labels"]
    assert denoiser.null_label == pre.num_classes == denoiser.num_classes
    assert denoiser.metadata["fastdiff.format"] == "fastdiff-openvino-v1"
    assert float(denoiser.metadata["fastdiff.max_abs_diff"]) <= ATOL
    # f32 unless asked: OpenVINO's own default on bf16-capable CPUs is bf16 (about 1e-2 off)
    assert denoiser.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_digits_matches_eager_at_any_batch(digits, batch):
    pre, out, _ = digits
    denoiser = OpenVinoDenoiser(out)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn((batch, *pre.sample_shape), generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, pre.num_classes + 1, (batch,), generator=gen)  # the null label included
    with torch.no_grad():
        expected = pre.model(x, t, class_labels=y)
    got = denoiser(x, t, class_labels=y)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert expected.abs().max() > 1e-2  # a graph of zeros would match anything
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_sampling_with_openvino_matches_pytorch(digits):
    pre, out, _ = digits
    sampler = DDIMSampler(pre.schedule, 10)
    labels = torch.arange(pre.num_classes)
    runs = [
        sample(
            denoiser,
            sampler,
            (pre.num_classes, *pre.sample_shape),
            generator=torch.Generator().manual_seed(0),
            cond={"class_labels": labels},
            guidance_scale=2.0,  # the null condition comes from the IR's metadata
        )
        for denoiser in (pre.model, OpenVinoDenoiser(out))
    ]
    eager, openvino_run = runs
    assert eager.abs().max() > 0.1
    # per-call differences of ~1e-6 grow through the steps
    torch.testing.assert_close(openvino_run, eager, atol=1e-3, rtol=0)


def test_mlp_matches_eager(mlp, reuse_mlp_onnx, tmp_path):
    model, _ = mlp
    report = to_openvino(model, tmp_path / "mlp.xml", sample_shape=(2, 2), return_report=True)
    assert report.max_abs_diff <= ATOL and report.size_bytes > 0
    assert _files(tmp_path) == ["mlp.bin", "mlp.xml", "mlp.xml.sha256"]
    gen = torch.Generator().manual_seed(0)
    for path in (report.path, mlp[1].path):  # the IR, and OpenVINO reading the ONNX file itself
        denoiser = OpenVinoDenoiser(path, threads=1)
        assert denoiser.null_label is None and denoiser.cond_names == []
        for batch in (1, 5, 64):
            x = torch.randn(batch, 2, generator=gen)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            with torch.no_grad():
                expected = model(x, t)
            torch.testing.assert_close(denoiser(x, t), expected, atol=ATOL, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(denoiser(x, 250), model(x, torch.full((64,), 250)), atol=ATOL, rtol=0)
    assert denoiser.compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_an_existing_onnx_export_is_converted_not_exported_again(mlp, tmp_path, monkeypatch):
    model, onnx_report = mlp

    def no_export(*args, **kwargs):
        raise AssertionError("to_onnx must not run when onnx_path is given")

    monkeypatch.setattr(ov_export, "to_onnx", no_export)
    report = to_openvino(
        model, tmp_path / "mlp.xml", sample_shape=(2, 2), onnx_path=onnx_report.path, return_report=True
    )
    assert report.exporter == onnx_report.exporter and report.max_abs_diff <= ATOL
    assert _files(tmp_path) == ["mlp.bin", "mlp.xml", "mlp.xml.sha256"]
    x, t = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(OpenVinoDenoiser(report.path)(x, t), model(x, t), atol=ATOL, rtol=0)


def test_an_onnx_export_of_other_weights_or_inputs_is_refused(mlp, tmp_path):
    model, onnx_report = mlp
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="other weights"):
        to_openvino(other, out / "m.xml", sample_shape=(2, 2), onnx_path=onnx_report.path)
    with pytest.raises(ValueError, match="conditioning inputs"):
        to_openvino(
            model, out / "m.xml", sample_shape=(2, 2), cond_shapes={"y": (2,)}, onnx_path=onnx_report.path
        )
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        to_openvino(model, out / "m.xml", sample_shape=(2, 2), onnx_path=tmp_path / "absent.onnx")
    unlisted = tmp_path / "unlisted.onnx"
    shutil.copy(onnx_report.path, unlisted)  # no sidecar: not known to be to_onnx's
    with pytest.raises(ValueError, match="sidecar"):
        to_openvino(model, out / "m.xml", sample_shape=(2, 2), onnx_path=unlisted)
    assert _files(out) == []


# ------------------------------------------------------------------------------------------------ errors


def test_export_parity_failure_leaves_nothing(mlp, reuse_mlp_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(ov_export, "max_abs_diff", lambda got, expected: 1.0)
    with pytest.raises(FastdiffError, match="differs from eager"):
        to_openvino(mlp[0], tmp_path / "mlp.xml", sample_shape=(2, 2))
    assert _files(tmp_path) == []


def test_export_argument_errors(mlp, tmp_path, monkeypatch):
    model, _ = mlp
    with pytest.raises(ValueError, match=r"\.xml"):
        to_openvino(model, tmp_path / "m.onnx", sample_shape=(2, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_openvino(model, tmp_path / "missing" / "m.xml", sample_shape=(2, 2))
    with pytest.raises(ValueError, match="float32"):
        to_openvino(MLPDenoiser(hidden=8, num_layers=1).half(), tmp_path / "m.xml", sample_shape=(2, 2))
    with pytest.raises(TypeError, match="model"):
        to_openvino("mlp", tmp_path / "m.xml", sample_shape=(2, 2))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"fastdiff\[openvino\]"):
        to_openvino(model, tmp_path / "m.xml", sample_shape=(2, 2))
    with pytest.raises(ImportError, match=r"fastdiff\[openvino\]"):
        OpenVinoDenoiser(mlp[1].path)
    assert _files(tmp_path) == []


def test_denoiser_rejects_bad_inputs_and_options(digits):
    _, out, _ = digits
    denoiser = OpenVinoDenoiser(out)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 9]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"'sample'.*shape"):
        denoiser(torch.randn(2, 1, 16, 16), t, class_labels=y)
    with pytest.raises(ValueError, match=r"'class_labels'.*integer"):
        denoiser(x, t, class_labels=y.float())
    with pytest.raises(ValueError, match="'timestep'"):
        denoiser(x, torch.tensor([1, 2, 3]), class_labels=y)
    with pytest.raises(ValueError, match="precision"):
        OpenVinoDenoiser(out, precision="fp32")
    with pytest.raises(ValueError, match="threads"):
        OpenVinoDenoiser(out, threads=-1)
    with pytest.raises(ValueError, match="device"):
        OpenVinoDenoiser(out, device="NPU9")


def test_corrupt_truncated_and_missing_files(digits, tmp_path):
    _, out, _ = digits
    with pytest.raises(FileNotFoundError, match=r"missing\.xml"):
        OpenVinoDenoiser(tmp_path / "missing.xml")
    with pytest.raises(ValueError, match=r"\.xml or an \.onnx"):
        OpenVinoDenoiser(out.with_suffix(".bin"))

    no_weights = tmp_path / "no_weights.xml"
    shutil.copy(out, no_weights)
    with pytest.raises(FileNotFoundError, match=r"no_weights\.bin"):
        OpenVinoDenoiser(no_weights)

    truncated = tmp_path / "truncated.xml"
    shutil.copy(out, truncated)
    weights = out.with_suffix(".bin").read_bytes()
    truncated.with_suffix(".bin").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.xml"):
        OpenVinoDenoiser(truncated)

    garbled = tmp_path / "garbled.xml"
    text = out.read_text()
    garbled.write_text(text[: len(text) // 2])
    shutil.copy(out.with_suffix(".bin"), garbled.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match=r"garbled\.xml"):
        OpenVinoDenoiser(garbled)

    # flipped bits in the weights: the sidecar catches them; without one the file loads unverified
    flipped = tmp_path / "flipped.xml"
    shutil.copy(out, flipped)
    sidecar_path(flipped).write_text(sidecar_path(out).read_text().replace("digits.", "flipped."))
    data = bytearray(weights)
    data[len(data) // 2] ^= 0x40
    flipped.with_suffix(".bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.bin is corrupt"):
        OpenVinoDenoiser(flipped)
    sidecar_path(flipped).unlink()
    assert not OpenVinoDenoiser(flipped).verified

    # a valid IR that is not a denoiser
    param = ov.opset13.parameter([1, 4], ov.Type.f32, name="x")
    ov.save_model(ov.Model([ov.opset13.relu(param)], [param]), tmp_path / "relu.xml")
    with pytest.raises(CheckpointError, match="not a denoiser graph"):
        OpenVinoDenoiser(tmp_path / "relu.xml")


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert main(["export", "--format", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
    assert ".xml" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["export", "--format", "openvino", "--out", str(tmp_path / "m.xml")]) == 2
    assert "fastdiff[openvino]" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_source_weights_are_watched(digits):
    pre, out, _ = digits
    denoiser = OpenVinoDenoiser(out, source=pre.model)  # the IR carries the ONNX export's weights digest
    x = torch.randn(2, *pre.sample_shape)
    denoiser(x, 10)
    changed = copy.deepcopy(pre.model)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(StaleWeightsError, match="to_openvino"):
        OpenVinoDenoiser(out, source=changed)
    watched = copy.deepcopy(pre.model)
    denoiser = OpenVinoDenoiser(out, source=watched)
    with torch.no_grad():
        next(watched.parameters()).add_(1.0)
    with pytest.raises(StaleWeightsError, match="to_openvino"):
        denoiser(x, 10)


def test_outputs_are_independent_of_later_calls(mlp, reuse_mlp_onnx, tmp_path):
    """The request reuses its output buffer: a returned tensor must not change on the next call."""
    model, _ = mlp
    denoiser = OpenVinoDenoiser(to_openvino(model, tmp_path / "mlp.xml", sample_shape=(2, 2)))
    x = torch.randn(4, 2)
    first = denoiser(x, 10)
    kept = first.clone()
    denoiser(torch.randn(4, 2), 900)
    assert np.array_equal(first.numpy(), kept.numpy())

"""OpenVINO IR from the ONNX export, checked against eager PyTorch, and run by OpenVINO as a denoiser.

`to_openvino` exports the model with `to_onnx` (so the graph has the same signature, fused ops decomposed, and
onnxruntime parity checked), converts it with `openvino.convert_model`, checks OpenVINO's output against eager
PyTorch, and writes `<name>.xml` + `<name>.bin` with float32 weights, and the sha256 sidecar `<name>.xml.sha256`
that lists both (the mechanism of `to_onnx`). The ONNX metadata (class count, null class label) travels in the
IR's `rt_info` under "framework".

Precision: OpenVINO's CPU plugin defaults its inference precision hint to bf16 on CPUs with bf16 support, which
costs about 1e-2 of absolute error on the digits U-Net (CPU_NOTES.md); both the export check and
`OpenVinoDenoiser` run with the f32 hint unless told otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.errors import CheckpointError, FastdiffError, missing_extra
from fastdiff.export.onnx import (
    DEFAULT_ATOL,
    ExportReport,
    _DenoiserGraph,
    _first_line,
    _model_dtype_device,
    _shape,
    eager_checks,
    max_abs_diff,
    onnx_metadata,
    set_eval,
    to_onnx,
)
from fastdiff.export.runtime import (
    META_PREFIX,
    RESERVED,
    GraphDenoiser,
    Port,
    check_signature,
    denoiser_feeds,
    publish,
    verify_sidecar,
)
from fastdiff.fingerprint import state_sha256
from fastdiff.output import check_output_path

FORMAT = "fastdiff-openvino-v1"
PRECISIONS = ("f32", "bf16", "f16")  # OpenVINO's INFERENCE_PRECISION_HINT values
_OV_TYPES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
}


def import_openvino() -> Any:
    """The openvino module, or ImportError naming the `openvino` extra."""
    try:
        import openvino
    except ImportError as err:
        raise missing_extra("openvino", "openvino") from err
    return openvino


def _check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def _config(precision: str, threads: int) -> dict[str, str]:
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def _weights_path(xml: Path) -> Path:
    """Where OpenVINO keeps an IR's weights: beside the .xml, same stem, .bin."""
    return xml.with_suffix(".bin")


def to_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sample_shape: Sequence[int],
    cond_shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    atol: float | None = None,
    exporter: str = "auto",
    return_report: bool = False,
    onnx_path: str | os.PathLike | None = None,
) -> Path | ExportReport:
    """Export a float32 denoiser to OpenVINO IR at `path` (.xml, weights in the .bin beside it), verified.

    The arguments are those of `to_onnx`, which does the export (and checks onnxruntime against eager); with
    `onnx_path`, a file `to_onnx` already wrote from this model with these conditioning inputs is converted instead
    (its sidecar is verified, and its weights digest must be the model's: ValueError otherwise), which saves a
    second export of a large model (minutes and a copy of the weights for the SD 1.5 U-Net). The
    converted model is then run by OpenVINO on CPU with the f32 precision hint on the same example batches
    (two batch sizes when `dynamic_batch`) and compared with eager PyTorch: a max abs difference above `atol`
    (default 1e-4) raises FastdiffError. The .bin, the .xml and their sha256 sidecar appear only when everything
    passed; a failure leaves nothing. Returns the .xml path, or an `ExportReport` (its `max_abs_diff` is OpenVINO's).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"path must end in .xml (OpenVINO IR; the weights go to .bin), got {str(path)!r}")
    check_output_path(path)
    check_output_path(_weights_path(path))
    dtype, device = _model_dtype_device(model)
    if dtype != torch.float32:
        raise ValueError(
            f"cannot export a {dtype} model to OpenVINO: the IR is written in float32; "
            "choose the runtime precision with OpenVinoDenoiser(path, precision=...)"
        )
    ov = import_openvino()  # fail before the slow ONNX export
    used = None if onnx_path is None else _exported_from(Path(onnx_path), model, cond_shapes)

    workdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        if onnx_path is None:
            onnx_report = to_onnx(
                model,
                workdir / "model.onnx",
                sample_shape=sample_shape,
                cond_shapes=cond_shapes,
                dynamic_batch=dynamic_batch,
                opset=opset,
                atol=atol,
                exporter=exporter,
                return_report=True,
            )
            onnx_path, used = onnx_report.path, onnx_report.exporter
        try:
            converted = ov.convert_model(onnx_path)
            compiled = ov.Core().compile_model(converted, "CPU", _config("f32", 0))
        except Exception as err:
            raise FastdiffError(f"OpenVINO cannot convert the exported graph: {_first_line(err)}") from err
        # to_onnx accepted the shapes, so they are well formed
        conds = {str(k): _shape(k, v) for k, v in (cond_shapes or {}).items()}
        graph = _DenoiserGraph(model, list(conds))
        restore_modes = set_eval(graph)
        try:
            checks = eager_checks(graph, tuple(sample_shape), conds, dtype, device, dynamic_batch)
        finally:
            restore_modes()
        names = [*RESERVED, *conds]
        request = compiled.create_infer_request()
        diff = 0.0
        for inputs, expected in checks:
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
            try:
                got = request.infer(feeds)[0]
            except Exception as err:
                raise FastdiffError(f"OpenVINO cannot run the exported graph: {_first_line(err)}") from err
            diff = max(diff, max_abs_diff(got, expected))
        limit = DEFAULT_ATOL[torch.float32] if atol is None else atol
        if not diff <= limit:
            raise FastdiffError(
                f"the OpenVINO model differs from eager PyTorch by {diff:.3g} (max abs) > atol={limit:g}; "
                f"nothing was written to {path}"
            )
        converted.set_rt_info(FORMAT, ["framework", META_PREFIX + "format"])
        converted.set_rt_info(repr(diff), ["framework", META_PREFIX + "max_abs_diff"])
        tmp = workdir / path.name
        # compress_to_fp16 (OpenVINO's default) would round the weights to float16
        ov.save_model(converted, tmp, compress_to_fp16=False)
        size = publish([_weights_path(tmp), tmp], path)  # the .xml last: it appears complete
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report = ExportReport(
        path=path,
        exporter=used,
        max_abs_diff=diff,
        atol=limit,
        seconds=time.perf_counter() - start,
        size_bytes=size,
        external_data=True,
    )
    return report if return_report else path


def _exported_from(onnx_path: Path, model: nn.Module, cond_shapes: Mapping[str, Sequence[int]] | None) -> str:
    """The exporter that wrote `onnx_path`, after checking that `to_onnx` wrote it from `model`'s weights with the
    conditioning inputs `cond_shapes` (FileNotFoundError / CheckpointError / ValueError otherwise)."""
    if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path {str(onnx_path)!r} is not an existing .onnx file")
    if not verify_sidecar(onnx_path):
        raise ValueError(f"onnx_path {str(onnx_path)!r} has no sha256 sidecar: it was not written by to_onnx")
    meta = onnx_metadata(onnx_path)
    if meta.get("fastdiff.weights_sha256") != state_sha256(model.state_dict()):
        raise ValueError(f"onnx_path {str(onnx_path)!r} was exported from other weights than model's")
    conds = json.loads(meta.get("fastdiff.cond_names", "[]"))
    if conds != list(cond_shapes or {}):
        raise ValueError(
            f"onnx_path {str(onnx_path)!r} takes the conditioning inputs {conds}, cond_shapes names "
            f"{list(cond_shapes or {})}"
        )
    return meta.get("fastdiff.exporter", "unknown")


def _port(output: Any) -> Port:
    # A tensor can carry several names: OpenVINO merges an input's name with that of a node it folded into it
    # (the TorchScript exporter's Cast of `timestep`); ours are identifiers, its generated ones are paths.
    name = min((n for n in output.get_names() if n.isidentifier()), default=output.get_any_name())
    type_name = output.get_element_type().get_type_name()
    if type_name not in _OV_TYPES:
        raise ValueError(f"unsupported OpenVINO element type {type_name} for {name!r}")
    shape = tuple(d.get_length() if d.is_static else None for d in output.get_partial_shape())
    return Port(name, _OV_TYPES[type_name], shape)


class OpenVinoDenoiser(GraphDenoiser):
    """The denoiser protocol over an OpenVINO compiled model: `denoiser(x, t, **cond) -> eps` on torch tensors.

    `path` is an IR written by `to_openvino` (.xml with its .bin) or an ONNX file written by `to_onnx` (OpenVINO
    reads both); a file with a sha256 sidecar is verified first (`verified`), a corrupt one raises CheckpointError
    naming it. `precision` is OpenVINO's inference precision hint: "f32" (default; matches eager to about 1e-6),
    "bf16" or "f16" (faster where the CPU has them, about 1e-2 off). `threads`: OpenVINO's inference threads
    (0: its default, one per physical core). `device`: an OpenVINO device name ("CPU"); tensors go through
    host memory and the output comes back on x's device. A model exported with a null class has `null_cond`.
    `source`: the module the file was exported from; its weights are checked against the file's digest now and
    on every call (see `GraphDenoiser`).
    """

    _stale_fix = "re-export it: fastdiff.export.to_openvino(model, path, ...), then OpenVinoDenoiser(path, source=model)"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: str = "f32",
        threads: int = 0,
        device: str = "CPU",
        source: nn.Module | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix not in (".xml", ".onnx"):
            raise ValueError(f"path must be an OpenVINO .xml or an .onnx file, got {str(self.path)!r}")
        if not self.path.is_file():
            raise FileNotFoundError(f"OpenVINO model {str(self.path)!r} does not exist")
        if self.path.suffix == ".xml" and not _weights_path(self.path).is_file():
            raise FileNotFoundError(
                f"the weights of {str(self.path)!r}, {str(_weights_path(self.path))!r}, do not exist"
            )
        self.verified = verify_sidecar(self.path)
        self.precision = _check_precision(precision)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: OpenVINO's default), got {threads!r}")
        if not isinstance(device, str):
            raise TypeError(f"device must be an OpenVINO device name such as 'CPU', got {device!r}")
        ov = import_openvino()
        core = ov.Core()
        if device not in core.available_devices:
            raise ValueError(
                f"device {device!r} is not available; this OpenVINO has {core.available_devices}"
            )
        try:
            model = core.read_model(self.path)
            self.compiled = core.compile_model(model, device, _config(self.precision, threads))
        except Exception as err:
            raise CheckpointError(
                f"{self.path} is not a readable OpenVINO model: {_first_line(err)}"
            ) from err
        try:
            self.inputs = [_port(p) for p in self.compiled.inputs]
            self.outputs = [_port(p) for p in self.compiled.outputs]
        except (ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.path}: {err}") from err
        check_signature(self.path, "graph", self.inputs, self.outputs)
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        self._read_metadata(
            {key: framework[key].astype(str) for key in framework if key.startswith(META_PREFIX)}
        )
        self.device = device
        self.request = self.compiled.create_infer_request()
        self._bind_source(source, self.metadata.get(META_PREFIX + "weights_sha256"))

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self._check_call()
        feeds = denoiser_feeds(x, t, cond, self.inputs, self.null_label)
        arrays = {name: value.detach().cpu().contiguous().numpy() for name, value in feeds.items()}
        out = self.request.infer(arrays)[0]  # a copy: the request reuses its output buffer
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"OpenVinoDenoiser({str(self.path)!r}, precision={self.precision!r}, device={self.device!r})"

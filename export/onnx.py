"""Export a denoiser to ONNX, check it against eager PyTorch, and run it with onnxruntime as a denoiser.

The graph has one signature whatever the model: inputs `sample` (B, C, H, W) in the model's float dtype,
`timestep` (B,) float32, then the conditioning inputs in the order of `cond_shapes` (`class_labels` (B,) int64,
`encoder_hidden_states` (B, L, D) float, ...); one output `eps`. B is a dynamic axis named `batch`.

Fused ops: the model is traced inside `fastdiff.kernels.backend.decomposed()`, so `group_norm_silu` and `attention`
are recorded as their plain-PyTorch references and exported as standard ONNX ops (InstanceNormalization / Sigmoid /
Mul, MatMul / Softmax); an accelerated model exports exactly like the plain one, and no `fastdiff` op domain
reaches the file. This works for both exporters, unlike a translation table, which only the dynamo one reads.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdiff.engine.weights import wrapped_module
from fastdiff.errors import CheckpointError, FastdiffError, missing_extra
from fastdiff.export.runtime import (
    RESERVED,
    GraphDenoiser,
    Port,
    check_signature,
    denoiser_feeds,
    publish,
    verify_sidecar,
)
from fastdiff.fingerprint import state_sha256
from fastdiff.kernels.backend import decomposed
from fastdiff.output import check_output_path

log = logging.getLogger("fastdiff.export")

FORMAT = "fastdiff-onnx-v1"
# Above this many bytes of weights the file keeps them as external data (protobuf cannot exceed 2 GB).
EXTERNAL_DATA_BYTES = 1536 * 2**20
DEFAULT_ATOL = {torch.float32: 1e-4, torch.float16: 2e-2}
CPU_THREADS = 2  # CPU_NOTES.md: onnxruntime with 2 intra-op threads on our 2-core runners

_ONNX_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}


@dataclass(frozen=True)
class ExportReport:
    """What `to_onnx` did: the file, the exporter used, the measured parity against eager PyTorch."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    max_abs_diff: float
    atol: float
    seconds: float
    size_bytes: int  # the .onnx file plus its external data, if any
    external_data: bool


MIN_OPSET = 7


def max_opset() -> int:
    """The newest opset both the installed onnx and torch's ONNX exporter support."""
    from torch.onnx import _constants

    return min(_import("onnx").defs.onnx_opset_version(), _constants.ONNX_MAX_OPSET)


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:
        raise missing_extra(name, "onnx") from err


# ---------------------------------------------------------------------------------------------------- export


class _DenoiserGraph(nn.Module):
    """The exported signature: forward(sample, timestep, *cond in `cond_names` order) -> eps."""

    def __init__(self, model: nn.Module, cond_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.cond_names = tuple(cond_names)
        # diffusers U-Nets return a dataclass unless told otherwise; ours return the tensor.
        self.tuple_output = "return_dict" in inspect.signature(model.forward).parameters

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.cond_names, cond, strict=True))
        if self.tuple_output:
            kwargs["return_dict"] = False
        out = self.model(sample, timestep, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _shape(name: str, shape: object) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {shape!r}")
    dims = tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return dims


def _num_classes(model: nn.Module) -> int | None:
    """Number of class embeddings: ours keep it on the model, diffusers (as_denoiser-wrapped or not) in its config."""
    n = getattr(model, "num_classes", None)
    if n is None:
        unet = getattr(model, "unet", model)
        n = getattr(getattr(unet, "config", None), "num_class_embeds", None)
    return n if isinstance(n, int) else None


def _null_label(model: nn.Module) -> int | None:
    """The null class of classifier-free guidance where the model defines one: ours use the label num_classes,
    `as_denoiser(unet, null_class_label=...)` stores it."""
    label = getattr(model, "null_class_label", None)
    if isinstance(label, int):
        return label
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and callable(getattr(model, "null_cond", None)) else None


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _example_inputs(
    model: nn.Module,
    sample_shape: tuple[int, ...],
    cond_shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    batch: int,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of batch `batch`: N(0,1) sample and float conds, timesteps in [0, 1000), labels."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn((batch, *sample_shape[1:]), generator=gen).to(device, dtype),
        torch.randint(0, 1000, (batch,), generator=gen).float().to(device),
    ]
    num_classes = _num_classes(model)
    for name, shape in cond_shapes.items():
        if name == "class_labels":
            high = (num_classes or 0) + (1 if _null_label(model) is not None else 0)
            labels = torch.randint(0, max(high, 1), (batch, *shape[1:]), generator=gen)
            inputs.append(labels.to(device))
        else:
            inputs.append(torch.randn((batch, *shape[1:]), generator=gen).to(device, dtype))
    return tuple(inputs)


def set_eval(module: nn.Module) -> Callable[[], None]:
    """Put `module` in eval mode; the returned function gives every submodule its previous mode back."""
    training = {m: m.training for m in module.modules()}
    module.eval()

    def restore() -> None:
        for m, mode in training.items():
            m.training = mode

    return restore


def eager_checks(
    graph: _DenoiserGraph,
    sample_shape: tuple[int, ...],
    conds: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    dynamic_batch: bool,
) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """(inputs, eager output) pairs an export is checked on: the example batch, and one more when it is dynamic."""
    batch = sample_shape[0]
    with torch.no_grad():
        return [
            (inputs, graph(*inputs))
            for b in ([batch, batch + 1] if dynamic_batch else [batch])
            for inputs in [_example_inputs(graph.model, sample_shape, conds, dtype, device, b, seed=b)]
        ]


def max_abs_diff(got: np.ndarray, expected: torch.Tensor) -> float:
    """Largest |got - expected| of a runtime's output against eager; FastdiffError if the shapes differ."""
    want = expected.detach().float().cpu().numpy()
    if got.shape != want.shape:
        raise FastdiffError(f"the exported graph returns shape {got.shape}, eager {want.shape}")
    return float(np.max(np.abs(got.astype(np.float32) - want))) if got.size else 0.0


EXPORTERS = ("torchscript", "dynamo")


def _exporter_order(exporter: str, external: bool) -> tuple[str, ...]:
    """The exporters `to_onnx` tries, in order. `auto`: the TorchScript tracer first (about 1 s for the digits U-Net
    against 14-26 s for torch.export's), dynamo when tracing fails or its graph fails the parity check; weights
    that go to external data go to dynamo first, whose writer puts them in one file."""
    if exporter in EXPORTERS:
        return (exporter,)
    if exporter != "auto":
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    return EXPORTERS[::-1] if external else EXPORTERS


def _export_file(
    exporter: str,
    graph: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    out: Path,
    *,
    dynamic_batch: bool,
    opset: int | None,
    external_data: bool,
) -> None:
    """Write the graph to `out` with `exporter` ("dynamo" or "torchscript")."""
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        # forward(sample, timestep, *cond): torch.export sees the conditioning inputs as one tuple argument
        dynamic = None
        if dynamic_batch:
            dynamic = ({0: batch}, {0: batch}) + ((tuple({0: batch} for _ in args[2:]),) if args[2:] else ())
        program = torch.onnx.export(
            graph,
            args,
            None,
            dynamo=True,
            input_names=names,
            output_names=["eps"],
            dynamic_shapes=dynamic,
            opset_version=opset,
            verbose=False,
        )
        program.save(out, external_data=external_data)
        return
    with warnings.catch_warnings():
        # Chosen knowingly (see _exporter_order). The tracer warns about Python values it records as constants
        # (our input checks' shapes); a trace that baked in one that matters fails the parity check, which runs
        # a second batch size and other timesteps.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            args,
            str(out),
            dynamo=False,
            input_names=names,
            output_names=["eps"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "eps"]} if dynamic_batch else None,
            opset_version=opset or 17,
        )


def _restore_signature(
    onnx: Any, path: Path, names: list[str], inputs: Sequence[torch.Tensor], dynamic_batch: bool
) -> None:
    """Give the graph exactly the inputs `names`, in order: the TorchScript exporter drops inputs the trace does
    not use (a model that ignores its timestep), and every denoiser graph must take the same arguments."""
    proto = onnx.load(str(path), load_external_data=False)
    present = {i.name: i for i in proto.graph.input}
    if list(present) == names:
        return
    types = {
        torch.float32: onnx.TensorProto.FLOAT,
        torch.float16: onnx.TensorProto.FLOAT16,
        torch.int64: onnx.TensorProto.INT64,
    }
    restored = [
        present.get(name)
        or onnx.helper.make_tensor_value_info(
            name, types[x.dtype], ["batch" if dynamic_batch else x.shape[0], *x.shape[1:]]
        )
        for name, x in zip(names, inputs, strict=True)
    ]
    del proto.graph.input[:]
    proto.graph.input.extend(restored)
    onnx.save(proto, str(path))


def _parity(
    onnx: Any,
    ort: Any,
    path: Path,
    names: list[str],
    checks: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor]],
    device: torch.device,
) -> float:
    """The graph at `path` passes onnx.checker and onnxruntime runs it on each check's inputs: the largest max abs
    difference from the eager outputs."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise FastdiffError(f"the exported graph fails onnx.checker: {_first_line(err)}") from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = CPU_THREADS
    try:
        session = ort.InferenceSession(str(path), options, providers=_providers_for(device))
    except Exception as err:
        raise FastdiffError(f"onnxruntime cannot load the exported graph: {_first_line(err)}") from err
    diff = 0.0
    for inputs, expected in checks:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
        try:
            got = session.run(None, feeds)[0]
        except Exception as err:
            raise FastdiffError(f"onnxruntime cannot run the exported graph: {_first_line(err)}") from err
        diff = max(diff, max_abs_diff(got, expected))
    return diff


def _first_line(err: BaseException) -> str:
    """One informative line: the dynamo exporter's errors put the cause under an "Exception summary" heading."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _providers_for(device: torch.device) -> list[str]:
    ort = _import("onnxruntime")
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    sample_shape: Sequence[int],
    cond_shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    exporter: str = "auto",
    return_report: bool = False,
) -> Path | ExportReport:
    """Export a denoiser to `path` (.onnx), verify it, and return the path (or an `ExportReport`).

    `model`: our UNet, a diffusers UNet2DModel / UNet2DConditionModel, or an accelerated one (any nn.Module called
    as `model(sample, timestep, **cond)`). `sample_shape` is one example batch, e.g. (2, 1, 8, 8);
    `cond_shapes` maps each conditioning input to its example shape (`class_labels` is int64, every other input
    has the float dtype), e.g. {"class_labels": (2,)} or {"encoder_hidden_states": (2, 77, 768)}.
    With `dynamic_batch` (default) every input's first axis is dynamic; a batch of 1 is traced at 2 because the
    tracer would otherwise fix it. `dtype` casts a copy of the model (default: the model's own dtype).

    After writing, the file is checked with `onnx.checker`, run with onnxruntime on the example inputs (and on a
    second batch size when dynamic) and compared with eager PyTorch: a max abs difference above `atol` (default
    1e-4 float32, 2e-2 float16; bfloat16 models are refused) fails the exporter. `exporter`: "torchscript"
    (torch's tracer: fast, deprecated by torch), "dynamo" (torch.export: 10-20x slower here; it refuses a
    data-dependent branch where the tracer records the one taken), or "auto" (default: the
    tracer, then dynamo if the tracer fails or its graph fails the check; dynamo first for weights over 1.5 GB);
    when every exporter tried fails, `FastdiffError` says why for each. The file appears only
    when everything passed (weights over 1.5 GB go to external data `<name>.onnx.data` beside it); a failure
    leaves nothing. The exporter used and the difference are logged on the `fastdiff.export` logger and stored
    in the file's metadata (with the null class label for models that have one, and the weights' sha256,
    `fastdiff.fingerprint.state_sha256`, which `OnnxDenoiser(path, source=model)` checks).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    check_output_path(path)
    sample_shape = _shape("sample_shape", sample_shape)
    if len(sample_shape) < 2:
        raise ValueError(f"sample_shape must be (batch, *sample dims), got {sample_shape}")
    if cond_shapes is not None and not isinstance(cond_shapes, Mapping):
        raise TypeError(f"cond_shapes must be a dict of name -> shape, got {type(cond_shapes).__name__}")
    conds = {str(k): _shape(f"cond_shapes[{k!r}]", v) for k, v in (cond_shapes or {}).items()}
    for name, shape in conds.items():
        if name in RESERVED or not name.isidentifier():
            raise ValueError(f"cond_shapes: {name!r} is not a valid conditioning input name")
        if shape[0] != sample_shape[0]:
            raise ValueError(
                f"cond_shapes[{name!r}] has batch {shape[0]}, sample_shape has {sample_shape[0]}"
            )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset()
    ):
        raise ValueError(
            f"opset must be None (the exporter's default) or an int in [{MIN_OPSET}, {max_opset()}] (the newest "
            f"that both onnx and torch's ONNX exporter here support), got {opset!r}"
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    if atol is not None and (
        isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 <= atol < math.inf
    ):
        raise ValueError(f"atol must be None or a finite number >= 0, got {atol!r}")
    _exporter_order(exporter, False)  # checks the name before any work
    onnx = _import("onnx")
    ort = _import("onnxruntime")

    model_dtype, device = _model_dtype_device(model)
    # Of the module that holds the weights (a wrapper such as as_denoiser's unwrapped, as a denoiser's `source` is):
    # a wrapper's state_dict names them differently.
    digest = state_sha256(wrapped_module(model).state_dict())
    if (dtype or model_dtype) not in DEFAULT_ATOL:
        raise ValueError(
            f"cannot export a {dtype or model_dtype} model: the parity check feeds onnxruntime float32 or float16 "
            "(export float32 and let TensorRT run it in bf16: build_tensorrt_engine(..., bf16=True))"
        )
    if dtype is not None and dtype != model_dtype:
        model = copy.deepcopy(model).to(dtype)
    dtype = dtype or model_dtype
    if atol is None:
        atol = DEFAULT_ATOL[dtype]
    graph = _DenoiserGraph(model, list(conds))
    names = [*RESERVED, *conds]
    batch = sample_shape[0]
    trace_batch = max(batch, 2) if dynamic_batch else batch
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > EXTERNAL_DATA_BYTES

    restore_modes = set_eval(graph)
    workdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp = workdir / path.name
    try:
        checks = eager_checks(graph, sample_shape, conds, dtype, device, dynamic_batch)
        with torch.no_grad():
            trace_inputs = _example_inputs(model, sample_shape, conds, dtype, device, trace_batch, seed=0)
        failures = []
        for used in _exporter_order(exporter, external):
            try:
                with torch.no_grad(), decomposed():
                    _export_file(
                        used,
                        graph,
                        trace_inputs,
                        names,
                        tmp,
                        dynamic_batch=dynamic_batch,
                        opset=opset,
                        external_data=external,
                    )
                _restore_signature(onnx, tmp, names, trace_inputs, dynamic_batch)
                diff = _parity(onnx, ort, tmp, names, checks, device)
                if not diff <= atol:
                    raise FastdiffError(
                        f"the exported graph differs from eager PyTorch by {diff:.3g} (max abs) > atol={atol:g}"
                    )
                break
            except Exception as err:
                failures.append(f"{used}: {_first_line(err)}")
                log.warning("the %s ONNX exporter failed (%s)", used, _first_line(err))
                for leftover in workdir.iterdir():
                    leftover.unlink()
        else:
            tried = "both exporters" if len(failures) == 2 else "the exporter"
            raise FastdiffError(
                f"ONNX export failed with {tried} ({'; '.join(failures)}); nothing was written to {path}"
            )

        proto = onnx.load(str(tmp), load_external_data=False)
        meta = {
            "fastdiff.format": FORMAT,
            "fastdiff.exporter": used,
            "fastdiff.max_abs_diff": repr(diff),
            "fastdiff.model": type(model).__name__,
            "fastdiff.cond_names": json.dumps(list(conds)),
            "fastdiff.weights_sha256": digest,
        }
        if (n := _num_classes(model)) is not None:
            meta["fastdiff.num_classes"] = str(n)
        if (null := _null_label(model)) is not None and "class_labels" in conds:
            meta["fastdiff.null_class_label"] = str(null)
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))

        files = sorted(workdir.iterdir(), key=lambda f: f == tmp)  # the .onnx last: it appears complete
        size = publish(files, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        restore_modes()

    report = ExportReport(
        path=path,
        exporter=used,
        max_abs_diff=diff,
        atol=atol,
        seconds=time.perf_counter() - start,
        size_bytes=size,
        external_data=len(files) > 1,
    )
    log.info(
        "exported %s with the %s exporter: %.1f MB, max abs diff vs eager %.3g, %.1f s",
        path,
        used,
        size / 1e6,
        diff,
        report.seconds,
    )
    return report if return_report else path


# ---------------------------------------------------------------------------------------------------- runtime


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `to_onnx` wrote into a file (format, exporter, weights digest, ...), without its weights."""
    onnx = _import("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable ONNX model: {_first_line(err)}") from err
    return {entry.key: entry.value for entry in proto.metadata_props}


def ports_of(args: Sequence[Any]) -> list[Port]:
    ports = []
    for a in args:
        if a.type not in _ONNX_TYPES:
            raise ValueError(f"unsupported ONNX tensor type {a.type} for {a.name!r}")
        ports.append(
            Port(a.name, _ONNX_TYPES[a.type], tuple(d if isinstance(d, int) else None for d in a.shape))
        )
    return ports


class OnnxDenoiser(GraphDenoiser):
    """The denoiser protocol over an onnxruntime session: `denoiser(x, t, **cond) -> eps` on torch tensors.

    CUDA tensors run on the CUDA execution provider with IO binding (no host copies) when onnxruntime-gpu is
    installed; otherwise inputs go through the CPU provider with `intra_op_threads` threads (default 2, the
    fastest setting on our 2-core runners). `providers` overrides the choice (e.g. ["CPUExecutionProvider"]).
    A graph exported from a model with a null class has `null_cond(cond)`, so classifier-free guidance works.
    Files exported by `to_onnx` are checked against their `.sha256` sidecar first (`verified`): a corrupt one
    raises CheckpointError naming it.
    `source`: the module the file was exported from; its weights are checked against the file's digest now and
    on every call (see `GraphDenoiser`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int = CPU_THREADS,
        source: nn.Module | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"ONNX file {str(self.path)!r} is a folder, expected a .onnx file")
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {str(self.path)!r} does not exist")
        self.verified = verify_sidecar(self.path)
        if (
            isinstance(intra_op_threads, bool)
            or not isinstance(intra_op_threads, int)
            or intra_op_threads < 0
        ):
            raise ValueError(
                f"intra_op_threads must be an int >= 0 (0: onnxruntime's default), got {intra_op_threads!r}"
            )
        ort = _import("onnxruntime")
        available = ort.get_available_providers()
        if providers is None:
            wanted = "CUDAExecutionProvider" in available and torch.cuda.is_available()
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"] if wanted else ["CPUExecutionProvider"]
            )
        providers = list(providers)
        missing = [p for p in providers if p not in available]
        if missing or not providers:
            raise ValueError(
                f"providers {missing or providers} are not available; this onnxruntime has {available}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:
            raise CheckpointError(f"{self.path} is not a readable ONNX model: {_first_line(err)}") from err
        try:
            self.inputs = ports_of(self.session.get_inputs())
            self.outputs = ports_of(self.session.get_outputs())
        except ValueError as err:
            raise CheckpointError(f"{self.path}: {err}") from err
        check_signature(self.path, "graph", self.inputs, self.outputs)
        self._read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self._bind_source(source, self.metadata.get("fastdiff.weights_sha256"))

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self._check_call()
        feeds = denoiser_feeds(x, t, cond, self.inputs, self.null_label)
        if self.cuda and x.is_cuda:
            return self._run_cuda(feeds)
        arrays = {name: value.detach().cpu().contiguous().numpy() for name, value in feeds.items()}
        out = self.session.run([self.outputs[0].name], arrays)[0]
        return torch.from_numpy(out).to(x.device)

    def _run_cuda(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        x = feeds["sample"]
        binding = self.session.io_binding()
        keep = []
        for name, value in feeds.items():
            value = value.contiguous()
            keep.append(value)
            binding.bind_input(
                name=name,
                device_type="cuda",
                device_id=value.device.index or 0,
                element_type=_numpy_dtype(value.dtype),
                shape=tuple(value.shape),
                buffer_ptr=value.data_ptr(),
            )
        port = self.outputs[0]
        if any(d is None for d in port.shape[1:]):
            binding.bind_output(port.name, "cuda")  # onnxruntime allocates; copied back below
            torch.cuda.current_stream().synchronize()
            self.session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)
        out = torch.empty((x.shape[0], *port.shape[1:]), dtype=port.dtype, device=x.device)
        binding.bind_output(
            name=port.name,
            device_type="cuda",
            device_id=out.device.index or 0,
            element_type=_numpy_dtype(out.dtype),
            shape=tuple(out.shape),
            buffer_ptr=out.data_ptr(),
        )
        # onnxruntime computes on its own stream: the inputs written on torch's stream must be ready first.
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return out

    def __repr__(self) -> str:
        return f"OnnxDenoiser({str(self.path)!r}, providers={self.session.get_providers()})"


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.int64: np.int64,
        torch.int32: np.int32,
    }[dtype]

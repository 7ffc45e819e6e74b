"""TensorRT engines from exported ONNX denoisers (TensorRT 10 Python API), run behind the denoiser protocol.

`build_tensorrt_engine` parses a graph written by `fastdiff.export.to_onnx`, gives every input's batch axis one
optimization profile (min / opt / max), and writes the serialized engine atomically; `refittable=True` builds an
engine whose weights `TensorRTDenoiser.refit(onnx_path)` replaces from a re-exported file without a rebuild. `TensorRTDenoiser` runs it
on torch-allocated CUDA buffers (`set_tensor_address` + `execute_async_v3` on the current torch stream), so a
denoiser call can be captured in a CUDA graph like any torch op. Arguments are validated before tensorrt is
imported; without tensorrt both raise ImportError naming the `tensorrt` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.errors import CheckpointError, FastdiffError, StaleWeightsError, missing_extra
from fastdiff.export.onnx import onnx_metadata
from fastdiff.export.runtime import META_PREFIX, GraphDenoiser, Port, check_signature, denoiser_feeds
from fastdiff.fingerprint import state_sha256
from fastdiff.output import atomic_path, check_output_path, write_bytes_atomic

# TensorRT DataType names -> torch dtypes (names, so this table needs no tensorrt import).
_TRT_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
}


def import_tensorrt() -> Any:
    """The tensorrt module, or ImportError naming the `tensorrt` extra."""
    try:
        import tensorrt
    except ImportError as err:
        raise missing_extra("tensorrt", "tensorrt") from err
    return tensorrt


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    fp16: bool = True,
    bf16: bool = False,
    workspace_gb: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    refittable: bool = False,
) -> Path:
    """Build a TensorRT engine for the ONNX denoiser at `onnx_path` and write it to `engine_path`, atomically.

    Every input's first axis gets the profile (min_batch, opt_batch, max_batch); the other axes must be static.
    `fp16` / `bf16` allow those precisions (TensorRT picks per layer); `workspace_gb` caps the builder's scratch
    memory; `timing_cache` is a file that is read when it exists and (re)written after the build, so later builds
    on the same GPU skip kernel timing. `refittable` lets `TensorRTDenoiser.refit` swap the weights in place later
    (TensorRT may then pick slower kernels for some layers). Needs a CUDA GPU and the `tensorrt` extra.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist")
    engine_path = check_output_path(engine_path)
    cache_path = None if timing_cache is None else check_output_path(timing_cache)
    for name, value in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
        _positive_int(name, value)
    if not min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    for name, flag in (("fp16", fp16), ("bf16", bf16), ("refittable", refittable)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if workspace_gb is not None and (
        isinstance(workspace_gb, bool) or not isinstance(workspace_gb, (int, float)) or not workspace_gb > 0
    ):
        raise ValueError(f"workspace_gb must be a positive number or None, got {workspace_gb!r}")
    trt = import_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise FastdiffError(
                f"input {tensor.name!r} of {onnx_path} has dynamic axes besides the batch: {shape}; "
                "export it with static sample and conditioning shapes"
            )
        profile.set_shape(tensor.name, *((b, *shape[1:]) for b in (min_batch, opt_batch, max_batch)))
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastdiffError(
            f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)"
        )
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return engine_path


class TensorRTDenoiser(GraphDenoiser):
    """The denoiser protocol over a TensorRT engine: `denoiser(x, t, **cond) -> eps` on CUDA torch tensors.

    Inputs and the output live in torch-allocated device memory and the engine runs on the current torch CUDA
    stream, so calls order with surrounding torch work without syncs and can be captured in a CUDA graph.
    The null class label stored by `to_onnx` is not carried into engines: pass it with `null_label=`
    (e.g. `OnnxDenoiser(onnx_path).null_label`) to get `null_cond` for classifier-free guidance.
    `source`: the module the engine was built from, whose weights every call checks (see `GraphDenoiser`); after
    they change, re-export and `refit(onnx_path)` (a `refittable` engine) or rebuild.
    """

    _no_null_label = "no null_label was given for this engine"
    _stale_fix = (
        "re-export it (fastdiff.export.to_onnx(model, onnx_path, ...)) and refit the engine from that file: "
        "denoiser.refit(onnx_path) (engines built with refittable=True), or rebuild it"
    )

    def __init__(
        self,
        engine_path: str | os.PathLike,
        *,
        null_label: int | None = None,
        source: nn.Module | None = None,
    ) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TensorRT engine {str(self.path)!r} does not exist")
        if null_label is not None and (isinstance(null_label, bool) or not isinstance(null_label, int)):
            raise TypeError(f"null_label must be an int or None, got {null_label!r}")
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise FastdiffError("TensorRTDenoiser needs a CUDA GPU")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as err:  # some TensorRT versions raise instead of returning None
            raise CheckpointError(
                f"{self.path} is not a TensorRT engine this TensorRT/GPU can load: {err}"
            ) from err
        if self.engine is None:
            raise CheckpointError(f"{self.path} is not a TensorRT engine this TensorRT/GPU can load")
        self.context = self.engine.create_execution_context()
        inputs, outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype_name = self.engine.get_tensor_dtype(name).name
            if dtype_name not in _TRT_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
            shape = tuple(None if d < 0 else d for d in self.engine.get_tensor_shape(name))
            port = Port(name, _TRT_DTYPES[dtype_name], shape)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(port)
        check_signature(self.path, "engine", inputs, outputs)
        self.inputs, self.output = inputs, outputs[0]
        self.null_label = null_label
        lo, _, hi = self.engine.get_tensor_profile_shape("sample", 0)
        self.batch_range = (lo[0], hi[0])
        self._bind_source(source, None)

    def refit(self, onnx_path: str | os.PathLike) -> None:
        """Replace the engine's weights, in place, by those of `onnx_path` (the same graph re-exported with new
        weights); the engine must have been built with `refittable=True`. TensorRT's ONNX parser hands the
        refitter the file's weights under their initializer names. With a `source`, a
        file exported from other weights than the source's current ones is refused (StaleWeightsError) before
        the engine is touched, and after the refit calls are checked against the source's weights as they are."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist")
        trt = import_tensorrt()
        if not self.engine.refittable:
            raise FastdiffError(
                f"{self.path} was not built refittable; rebuild it: build_tensorrt_engine(onnx_path, engine_path, "
                "refittable=True)"
            )
        current = None
        if self._watch is not None:
            current = state_sha256(self._watch.module.state_dict())
            exported = onnx_metadata(onnx_path).get(META_PREFIX + "weights_sha256")
            if exported is not None and exported != current:
                raise StaleWeightsError(
                    f"{onnx_path} was exported from other weights than source's current ones; re-export it "
                    "(fastdiff.export.to_onnx(model, onnx_path, ...)) and refit from that file"
                )
        refitter = trt.Refitter(self.engine, self._logger)
        parser = trt.OnnxParserRefitter(refitter, self._logger)
        if not parser.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CheckpointError(f"TensorRT cannot refit {self.path} from {onnx_path}: {errors}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise CheckpointError(
                f"{onnx_path} lacks {len(missing)} weight(s) of {self.path} ({missing[:5]}): it is not an export "
                "of the graph the engine was built from"
            )
        if not refitter.refit_cuda_engine():
            raise FastdiffError(
                f"TensorRT could not refit {self.path} from {onnx_path} (see the TensorRT log)"
            )
        if current is not None:
            self._digest = current
            self._confirm(self._watch.state(), current)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            raise ValueError("input 'sample' must be a CUDA tensor for a TensorRT engine")
        self._check_call()
        feeds = denoiser_feeds(x, t, cond, self.inputs, self.null_label)
        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise ValueError(f"input 'sample' has batch {x.shape[0]}; this engine was built for {lo}..{hi}")
        # Temporaries freed after the launch are safe: torch's allocator reuses them in this stream's order.
        for name, value in feeds.items():
            value = value.contiguous()
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output.name)), dtype=self.output.dtype, device=x.device
        )
        self.context.set_tensor_address(self.output.name, out.data_ptr())
        stream = torch.cuda.current_stream(x.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise FastdiffError(f"TensorRT failed to run {self.path}")
        return out

    def __repr__(self) -> str:
        return f"TensorRTDenoiser({str(self.path)!r}, batch {self.batch_range[0]}..{self.batch_range[1]})"

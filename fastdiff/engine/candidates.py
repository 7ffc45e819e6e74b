"""The ways the planner can run a (denoiser, sampler): how each is built, whether it can run here, its tolerance.

Every candidate ends in the engine's loop (`SamplingEngine`: static buffers, the fused table step), so an exported
runtime gets the fast loop too, not only the fast model:

| name          | the denoiser                                      | built                                           |
|---------------|---------------------------------------------------|-------------------------------------------------|
| `eager`       | the model as given                                | nothing to build: the reference                 |
| `compile`     | `accelerate(model)`                               | `SamplingEngine(compile=True)`, per table+shape |
| `cuda-graphs` | `accelerate(model)`                               | `SamplingEngine(cuda_graphs=True)`, captured    |
| `onnxruntime` | `OnnxDenoiser(<cache>/model.onnx, source=model)`  | `to_onnx` into the cache (once per weights)     |
| `openvino`    | `OpenVinoDenoiser(<cache>/model.onnx, source=model)` | the same ONNX file, compiled by OpenVINO     |
| `tensorrt`    | `TensorRTDenoiser(<cache>/model.engine)`          | ONNX, then `build_tensorrt_engine` (GPU)        |
| `aoti`        | `AotiDenoiser(<cache>/model.pt2, source=model)`   | torch.export + AOTInductor into the cache       |

The denoiser backends (`eager`, `onnxruntime`, `openvino`, `tensorrt`) do not depend on the table: the planner times
them on the first rows of the table only. `compile` and `cuda-graphs` build for one table and shape, and are timed
on whole runs. An exported denoiser watches the model it came from (`source=model`) and raises `StaleWeightsError`
when its weights change; the planner then plans again, which exports the new weights (another cache key).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastdiff.cache import DiskCache
from fastdiff.samplers.base import Sampler

# Build-cost priors (seconds) for a model never built on this machine: a + b * millions of parameters, measured
# here on 2 shared cores and rounded up (conservative: a candidate skipped by mistake costs speed, one built by
# mistake costs a minute). ONNX export with its parity check, TorchScript tracer: digits U-Net (1.1M) 0.9-1.5 s,
# DDPM-CIFAR10 U-Net (35.7M) 3.7 s; the SD 1.5 U-Net (860M, 16x16 latents, weights over 1.5 GB: the dynamo
# exporter) 83 s with the session load. OpenVINO reading and compiling that file:
# digits 0.3-2.5 s, SD 1.5 35 s. Engine compile (inductor, cold cache): swiss-roll MLP 12 s, digits 40-60 s
# (CPU_NOTES.md: about a minute); AOTInductor: digits 23-107 s. How those two grow with the model is not measured
# here: 0.5 s per million parameters is assumed (a per-parameter slope fitted to digits alone put SD 1.5 at
# 10-19 hours, so the planner never built anything for it). A build measured once is recorded in the cache and
# replaces the prior for that model.
EXPORT_PRIOR = (3.0, 0.1)
COMPILE_PRIOR = (60.0, 0.5)
OPENVINO_LOAD_PRIOR = (2.0, 0.04)
TENSORRT_PRIOR = (30.0, 30.0)
# AOTInductor (torch.export + aoti_compile_and_package) then loads in 0.01 s (export/aoti.py's C++ loader), which an
# in-process compile cannot.
AOTI_PRIOR = (60.0, 0.5)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(*modules: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


@dataclass
class Target:
    """What is planned: the denoiser, its weights' hash (None: not an nn.Module), the sampler and one call's key."""

    denoiser: Any
    weights: str | None
    sampler: Sampler
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    cond: dict[str, Any]
    cfg: bool
    cache: DiskCache
    environment: dict[str, Any]
    # Built denoisers shared between candidates (the ONNX file serves onnxruntime and openvino).
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> torch.nn.Module | None:
        return self.denoiser if isinstance(self.denoiser, torch.nn.Module) else None

    @property
    def millions_of_parameters(self) -> float:
        module = self.module
        return 0.0 if module is None else sum(p.numel() for p in module.parameters()) / 1e6

    def model_batch(self) -> int:
        """The batch the denoiser sees: twice the samples with classifier-free guidance."""
        return self.shape[0] * (2 if self.cfg else 1)


def engine(denoiser: Any, sampler: Sampler, **options: Any) -> Any:
    """A SamplingEngine that runs exactly as told (never planned again)."""
    from fastdiff.engine import SamplingEngine

    return SamplingEngine(denoiser, sampler, **options)


class Candidate:
    """One backend: `unavailable` says why it cannot run here (None: it can), `estimate_build_s` what building it
    would cost, `build_key` the cache key of its recorded build time, `runner(target, sampler)` an object with
    `sample(shape, **kwargs)` for that sampler (building what it needs on first use)."""

    name: ClassVar[str] = ""
    # Whole runs (True: built per table and shape) or the first rows of the table (False) are timed.
    per_table: ClassVar[bool] = False
    # Max abs difference to eager of the verification run, divided by max(1, max |eager|), per dtype.
    tolerance: ClassVar[Mapping[torch.dtype, float]] = {
        torch.float32: 1e-3,
        torch.float16: 5e-2,
        torch.bfloat16: 1e-1,
    }

    def unavailable(self, target: Target) -> str | None:
        return None

    def estimate_build_s(self, target: Target) -> float:
        """Seconds to build from nothing (the prior; the planner prefers a recorded build)."""
        return 0.0

    def cached(self, target: Target) -> bool:
        """Whether what it builds is already on disk (then building is only loading)."""
        return False

    def build_key(self, target: Target) -> dict[str, Any]:
        return {
            "backend": self.name,
            "weights": target.weights,
            "dtype": str(target.dtype),
            "device": target.device.type,
            "environment": target.environment,
        }

    def runner(self, target: Target, sampler: Sampler) -> Any:
        raise NotImplementedError


class Eager(Candidate):
    """The model as given in the engine without graphs or compile: the same samples as `fastdiff.sample`."""

    name = "eager"

    def runner(self, target: Target, sampler: Sampler) -> Any:
        return engine(target.denoiser, sampler, cuda_graphs=False)


class _Accelerated(Candidate):
    per_table = True

    def _denoiser(self, target: Target) -> Any:
        if "accelerated" not in target.shared:
            from fastdiff.accelerate import accelerate

            target.shared["accelerated"] = (
                accelerate(target.module) if target.module is not None else target.denoiser
            )
        return target.shared["accelerated"]

    def build_key(self, target: Target) -> dict[str, Any]:
        return {**super().build_key(target), "shape": list(target.shape), "cfg": target.cfg}


class Compile(_Accelerated):
    """`SamplingEngine(accelerate(model), compile=True)`: inductor compiles the step or the whole loop."""

    name = "compile"

    def estimate_build_s(self, target: Target) -> float:
        a, b = COMPILE_PRIOR
        return a + b * target.millions_of_parameters

    def runner(self, target: Target, sampler: Sampler) -> Any:
        return engine(self._denoiser(target), sampler, compile=True)


class CudaGraphs(_Accelerated):
    """`SamplingEngine(accelerate(model), cuda_graphs=True)`: each step (or the loop) replayed as a CUDA graph."""

    name = "cuda-graphs"

    def unavailable(self, target: Target) -> str | None:
        if target.device.type != "cuda":
            return "needs a CUDA device (this runs on " + target.device.type + ")"
        return None

    def runner(self, target: Target, sampler: Sampler) -> Any:
        return engine(self._denoiser(target), sampler, cuda_graphs=True)


class _Exported(Candidate):
    """A denoiser read from an exported file in the cache, run in the engine's loop."""

    packages: ClassVar[tuple[str, ...]] = ()

    def unavailable(self, target: Target) -> str | None:
        if target.module is None:
            return "the denoiser is not an nn.Module, so it cannot be exported"
        if target.dtype not in (torch.float32, torch.float16):
            return f"exports float32 or float16 models, not {str(target.dtype).removeprefix('torch.')}"
        return _missing(*self.packages)

    def onnx_key(self, target: Target) -> dict[str, Any]:
        """The ONNX file's key: the weights and the input signature, not the batch (its axis is dynamic)."""
        return {
            "format": "onnx",
            "weights": target.weights,
            "dtype": str(target.dtype),
            "sample": list(target.shape[1:]),
            "cond": {k: [str(v.dtype), *v.shape[1:]] for k, v in sorted(target.cond.items())},
            "versions": {p: package_version(p) for p in ("torch", "onnx", "fastdiff")},
        }

    def onnx_cached(self, target: Target) -> bool:
        return target.cache.find_artifact("onnx", self.onnx_key(target)) is not None

    def cached(self, target: Target) -> bool:
        """The ONNX export in the cache (what onnxruntime and OpenVINO load; TensorRT and AOTI say their own)."""
        return self.onnx_cached(target)

    def onnx_file(self, target: Target) -> Path:
        """The verified ONNX export of the target's model in the cache, exported now if absent."""
        if "onnx" not in target.shared:
            from fastdiff.export import to_onnx

            conds = {k: (2, *v.shape[1:]) for k, v in target.cond.items()}

            def build(folder: Path) -> None:
                to_onnx(
                    target.module,
                    folder / "model.onnx",
                    sample_shape=(2, *target.shape[1:]),
                    cond_shapes=conds,
                )

            found = target.cache.artifact("onnx", self.onnx_key(target), build)
            target.shared["onnx"] = found.path / "model.onnx"
        return target.shared["onnx"]

    def export_estimate(self, target: Target) -> float:
        if self.onnx_cached(target):
            return 0.0
        a, b = EXPORT_PRIOR
        return a + b * target.millions_of_parameters

    def runner(self, target: Target, sampler: Sampler) -> Any:
        key = "denoiser:" + self.name
        if key not in target.shared:
            path = self.build(target)
            # timed apart from the build: what a later run that finds the artifact cached pays (the planner's
            # estimate of it, `Result.load_s`)
            start = time.perf_counter()
            target.shared[key] = self.load(target, path)
            target.shared["load_s:" + self.name] = time.perf_counter() - start
        return engine(target.shared[key], sampler, cuda_graphs=False)

    def build(self, target: Target) -> Path:
        """The file this candidate runs, built into the cache now if it is not there."""
        return self.onnx_file(target)

    def load(self, target: Target, path: Path) -> Callable[..., torch.Tensor]:
        """The denoiser reading `path` (what `build` returned)."""
        raise NotImplementedError


class OnnxRuntime(_Exported):
    """`OnnxDenoiser` over the cached ONNX export."""

    name = "onnxruntime"
    packages = ("onnx", "onnxruntime")

    def estimate_build_s(self, target: Target) -> float:
        return self.export_estimate(target)

    def load(self, target: Target, path: Path) -> Callable[..., torch.Tensor]:
        from fastdiff.export import OnnxDenoiser

        return OnnxDenoiser(path, source=target.module)


class OpenVino(_Exported):
    """`OpenVinoDenoiser` (f32 precision hint) over the same cached ONNX export."""

    name = "openvino"
    packages = ("onnx", "onnxruntime", "openvino")

    def unavailable(self, target: Target) -> str | None:
        if target.device.type != "cpu":
            return "runs on the CPU only here (OpenVINO's CPU plugin)"
        if target.dtype != torch.float32:
            return "runs float32 models (the precision is a runtime hint)"
        return super().unavailable(target)

    def estimate_build_s(self, target: Target) -> float:
        a, b = OPENVINO_LOAD_PRIOR
        return self.export_estimate(target) + a + b * target.millions_of_parameters

    def load(self, target: Target, path: Path) -> Callable[..., torch.Tensor]:
        from fastdiff.export import OpenVinoDenoiser

        return OpenVinoDenoiser(path, source=target.module)


class TensorRT(_Exported):
    """`TensorRTDenoiser` over an engine built from the cached ONNX export for this batch (GPU only)."""

    name = "tensorrt"
    packages = ("onnx", "tensorrt")

    def unavailable(self, target: Target) -> str | None:
        if target.device.type != "cuda":
            return "needs a CUDA device (this runs on " + target.device.type + ")"
        return super().unavailable(target)

    def engine_key(self, target: Target) -> dict[str, Any]:
        return {
            **self.onnx_key(target),
            "format": "tensorrt",
            "batch": self.model_batch(target),
            "gpu": torch.cuda.get_device_name(target.device),
            "tensorrt": package_version("tensorrt"),
        }

    @staticmethod
    def model_batch(target: Target) -> int:
        return target.model_batch()

    def cached(self, target: Target) -> bool:
        return target.cache.find_artifact("tensorrt", self.engine_key(target)) is not None

    def estimate_build_s(self, target: Target) -> float:
        if self.cached(target):
            return 0.0
        a, b = TENSORRT_PRIOR
        return self.export_estimate(target) + a + b * target.millions_of_parameters

    def build_key(self, target: Target) -> dict[str, Any]:
        return {**super().build_key(target), "batch": self.model_batch(target)}

    def build(self, target: Target) -> Path:
        from fastdiff.export import build_tensorrt_engine

        onnx_path = self.onnx_file(target)
        batch = self.model_batch(target)

        def make(folder: Path) -> None:
            build_tensorrt_engine(
                onnx_path,
                folder / "model.engine",
                min_batch=1,
                opt_batch=batch,
                max_batch=batch,
                fp16=target.dtype == torch.float16,
            )

        return target.cache.artifact("tensorrt", self.engine_key(target), make).path / "model.engine"

    def load(self, target: Target, path: Path) -> Callable[..., torch.Tensor]:
        from fastdiff.export import TensorRTDenoiser
        from fastdiff.export.onnx import onnx_metadata

        null = onnx_metadata(self.onnx_file(target)).get("fastdiff.null_class_label")
        return TensorRTDenoiser(path, null_label=None if null is None else int(null), source=target.module)


class Aoti(_Exported):
    """The model compiled ahead of time by AOTInductor into the cache (dynamic batch), in the engine's loop."""

    name = "aoti"
    packages = ()

    def aoti_key(self, target: Target) -> dict[str, Any]:
        return {**self.onnx_key(target), "format": "aoti", "device": target.device.type}

    def cached(self, target: Target) -> bool:
        return target.cache.find_artifact("aoti", self.aoti_key(target)) is not None

    def estimate_build_s(self, target: Target) -> float:
        a, b = AOTI_PRIOR
        return a + b * target.millions_of_parameters

    def build(self, target: Target) -> Path:
        import inspect

        from fastdiff.kernels.backend import decomposed

        module = target.module
        x_name, t_name = list(inspect.signature(module.forward).parameters)[:2]

        def make(folder: Path) -> None:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            x = torch.randn(2, *target.shape[1:], device=target.device, dtype=target.dtype)
            t = torch.full((2,), 500.0, device=target.device)
            cond = {k: torch.cat([v, v])[:2] for k, v in target.cond.items()}
            dynamic = {x_name: {0: batch}, t_name: {0: batch}, **{k: {0: batch} for k in cond}}
            # torch.export's deprecation warnings about its own internals say nothing a user can act on
            with torch.no_grad(), decomposed(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.export.export(module, (x, t), cond, dynamic_shapes=dynamic)
                torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "model.pt2"))

        return target.cache.artifact("aoti", self.aoti_key(target), make).path / "model.pt2"

    def load(self, target: Target, path: Path) -> Callable[..., torch.Tensor]:
        from fastdiff.export.aoti import AotiDenoiser

        return AotiDenoiser(path, target.module)


CANDIDATES: dict[str, type[Candidate]] = {
    c.name: c for c in (Eager, Compile, CudaGraphs, OnnxRuntime, OpenVino, TensorRT, Aoti)
}

"""The ways the sampling benchmark runs a workload, from the eager PyTorch reference to TensorRT.

| backend           | model                                          | sampling loop                                   |
|-------------------|------------------------------------------------|-------------------------------------------------|
| `eager`           | the plain PyTorch model                        | the sampler's diffusers scheduler `step()`      |
| `eager-sdpa`      | eager, attention through `F.scaled_dot_product_attention` | the same diffusers loop              |
| `torch-compile`   | `torch.compile(model)` (max-autotune on GPU)   | the same diffusers loop                         |
| `fastdiff`        | `fastdiff.accelerate(model)`                   | `fastdiff.sample` (table + fused sampler step)  |
| `fastdiff-graphs` | `fastdiff.accelerate(model)`                   | `SamplingEngine`: CUDA graphs on GPU, `compile=True` on CPU |
| `fastdiff-auto`   | the planner's choice (`fastdiff.engine.planner`, backend "auto"), per batch size | the engine's loop     |
| `onnxruntime`     | `fastdiff.export.to_onnx` + `OnnxDenoiser`     | `fastdiff.sample`                               |
| `openvino`        | `fastdiff.export.to_openvino` + `OpenVinoDenoiser` (f32 precision hint) | `fastdiff.sample`      |
| `tensorrt`        | ONNX -> `build_tensorrt_engine` + `TensorRTDenoiser` | `fastdiff.sample`                         |

The eager loop is what a diffusers pipeline does per step: concatenate cond/uncond, call the model, combine the
guidance on the host side of the graph, call the scheduler's `step()`, with the diffusers scheduler that computes
the registered sampler's numbers (`DIFFUSERS_LOOPS`: DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++, UniPC,
LCM). Without diffusers it falls back to fastdiff's reference loop (`run_table` with the plain-PyTorch step), and
says so in the results.

`eager-sdpa` on our U-Net: every `AttentionBlock`'s forward is replaced, on a copy of the model, by the same
computation with `F.scaled_dot_product_attention` instead of `fastdiff.kernels.attention` (whose plain-PyTorch
path is matmul-softmax-matmul). diffusers models already use SDPA by default (`AttnProcessor2_0`), so there
`eager-sdpa` is skipped as identical to `eager`, as it is for models without attention.

A backend that cannot run (a missing package, a module not built yet, no GPU) raises `BackendSkipped` with the
reason, which the harness records.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastdiff.engine.candidates import package_version
from fastdiff.loop import initial_state
from fastdiff.samplers import batch_conds, run_table

from .workloads import Workload

BACKENDS = (
    "eager",
    "eager-sdpa",
    "torch-compile",
    "fastdiff",
    "fastdiff-graphs",
    "fastdiff-auto",
    "onnxruntime",
    "openvino",
    "tensorrt",
)


class BackendSkipped(Exception):
    """The backend cannot run on this machine or workload; the message is the reason kept in the results."""


@dataclass
class Case:
    """One measured configuration: starting noise, conditioning, guidance and the seed of the step noise."""

    x_T: torch.Tensor
    cond: dict[str, Any] | None
    uncond: dict[str, Any] | None
    guidance_scale: float
    seed: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_T.shape)

    def generator(self) -> torch.Generator:
        """A fresh generator for the noise the sampler draws, so that every run draws the same noise."""
        return torch.Generator(self.x_T.device).manual_seed(self.seed)

    def model_inputs(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x, kwargs) of one denoiser call, cond and uncond batched when guiding."""
        x = self.x_T
        if self.uncond is not None:
            return torch.cat([x, x]), batch_conds(self.cond, self.uncond)
        return x, dict(self.cond or {})


def _tensor_output(model: Callable) -> Callable[..., torch.Tensor]:
    """model(x, t, **kw) returning a tensor also for diffusers models (which return an output object)."""

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = model(x, t, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.sample

    return call


def _sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """fastdiff.models.unet.AttentionBlock.forward with the attention itself through SDPA."""
    b, c, height, width = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
    q, k, v = qkv.transpose(-1, -2).unbind(1)
    a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, height, width)
    out = x + self.proj_out(a)
    return out * (1 / math.sqrt(2)) if self.rescale_residual else out


class Backend:
    """A prepared backend for one workload and dtype; `sample(case)` runs one whole sampling loop."""

    name = ""

    def __init__(self, workload: Workload, dtype: torch.dtype) -> None:
        self.workload = workload
        self.dtype = dtype
        self.sampler = workload.sampler()
        self.setup_s = 0.0
        self.info: dict[str, Any] = {}
        # the model call of one step, for the per-step profile; None where it cannot be separated
        self.denoise: Callable[..., torch.Tensor] | None = None

    def sample(self, case: Case) -> torch.Tensor:
        raise NotImplementedError

    def model_timestep(self, batch: int) -> torch.Tensor:
        """The first step's timestep in the form this backend's loop passes it to the model: (batch,) on device."""
        return self.sampler.timesteps[0].to(self.workload.device).expand(batch)


# The diffusers scheduler (class, options beyond the shared ones) that computes each registered sampler's samples
# with its registered defaults (leading spacing, no offset, an epsilon model), the eager reference's loop.
DIFFUSERS_LOOPS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "ddpm": ("DDPMScheduler", {"clip_sample": True, "variance_type": "fixed_small"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


class EagerBackend(Backend):
    """The reference: the PyTorch model in a diffusers scheduler loop."""

    name = "eager"

    def __init__(self, workload: Workload, dtype: torch.dtype, model: torch.nn.Module | None = None) -> None:
        super().__init__(workload, dtype)
        self.model = workload.model_as(dtype) if model is None else model
        self.denoise = _tensor_output(self.model)
        self.scheduler, why = self._diffusers_scheduler()
        if self.scheduler is None:
            self.info["loop"] = f"fastdiff.samplers.run_table with the plain-PyTorch step ({why})"
        else:
            self.info["loop"] = (
                f"diffusers {type(self.scheduler).__name__}.step() ({package_version('diffusers')})"
            )

    def _diffusers_scheduler(self) -> tuple[Any, str]:
        """(the diffusers scheduler of this workload's sampler, or None; why there is none)."""
        if self.workload.sampler_kind not in DIFFUSERS_LOOPS:
            return None, "no diffusers scheduler for it on an alpha-bar schedule"
        try:
            import diffusers
        except ImportError:
            return None, "diffusers not installed"
        schedule = self.workload.schedule
        class_name, options = DIFFUSERS_LOOPS[self.workload.sampler_kind]
        return getattr(diffusers, class_name)(
            num_train_timesteps=schedule.num_train_timesteps,
            trained_betas=schedule.betas.numpy(),
            timestep_spacing="leading",
            steps_offset=0,
            prediction_type="epsilon",
            **options,
        ), ""

    def model_timestep(self, batch: int) -> torch.Tensor:
        # diffusers pipelines pass the scheduler's 0-d host tensor
        return super().model_timestep(batch) if self.scheduler is None else self.sampler.timesteps[0]

    def sample(self, case: Case) -> torch.Tensor:
        generator = case.generator()
        if self.scheduler is None:
            return run_table(
                self.denoise,
                self.sampler.table,
                initial_state(self.sampler.table, case.x_T),
                generator=generator,
                cond=case.cond,
                uncond=case.uncond,
                guidance_scale=case.guidance_scale,
            )
        scheduler = self.scheduler
        scheduler.set_timesteps(self.workload.steps)
        guided = case.uncond is not None
        kwargs = batch_conds(case.cond, case.uncond) if guided else dict(case.cond or {})
        # deterministic schedulers (UniPC) take no generator
        noise = (
            {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        )
        x = case.x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = self.denoise(torch.cat([x_in, x_in]) if guided else x_in, t, **kwargs)
            if guided:
                out_c, out_u = out.chunk(2)
                out = out_u + case.guidance_scale * (out_c - out_u)
            x = scheduler.step(out, t, x, **noise).prev_sample
        return x


class EagerSdpaBackend(EagerBackend):
    """Eager with every attention through `F.scaled_dot_product_attention` (see the module docstring)."""

    name = "eager-sdpa"

    def __init__(self, workload: Workload, dtype: torch.dtype) -> None:
        from fastdiff.models.unet import AttentionBlock

        if workload.is_diffusers:
            raise BackendSkipped("diffusers models use SDPA by default (AttnProcessor2_0): same as eager")
        model = copy.deepcopy(workload.model_as(dtype))
        blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        if not blocks:
            raise BackendSkipped("the model has no attention layers: same as eager")
        for block in blocks:
            block.forward = types.MethodType(_sdpa_attention_forward, block)
        super().__init__(workload, dtype, model)
        self.info["attention"] = f"F.scaled_dot_product_attention in {len(blocks)} AttentionBlocks"


class TorchCompileBackend(EagerBackend):
    """torch.compile of the eager model in the eager loop; compilation happens in the first (untimed) run."""

    name = "torch-compile"

    def __init__(self, workload: Workload, dtype: torch.dtype) -> None:
        mode = "max-autotune" if workload.device.type == "cuda" else "default"
        # a fresh dynamo cache, so earlier workloads do not use up the recompile limit
        torch._dynamo.reset()
        model = torch.compile(workload.model_as(dtype), mode=mode, dynamic=False)
        super().__init__(workload, dtype, model)
        self.info.update(mode=mode, compiled="lazily: first_run_s includes compilation for each batch size")


def _accelerated(workload: Workload, dtype: torch.dtype) -> tuple[Callable, dict[str, Any], float]:
    """(denoiser, info, seconds): fastdiff.accelerate on a copy of the model, as a denoiser."""
    try:
        from fastdiff.accelerate import accelerate, as_denoiser, report
    except ImportError as err:
        raise BackendSkipped(f"fastdiff.accelerate is not available: {err}") from None
    start = time.perf_counter()
    module = accelerate(workload.model_as(dtype), dtype=dtype)
    denoiser = as_denoiser(module)
    seconds = time.perf_counter() - start
    done = report(module)
    info = {
        "accelerate": f"fastdiff.accelerate(model, dtype={str(dtype).removeprefix('torch.')})",
        "kernels": done.backend,
        "channels_last": done.channels_last,
        "fused": {kind: f"{c.fused}/{c.found}" for kind, c in done.coverage.items() if c.found},
    }
    return denoiser, info, seconds


class FastdiffBackend(Backend):
    """A denoiser in `fastdiff.sample`: the step table and the fused sampler step."""

    name = "fastdiff"

    def __init__(self, workload: Workload, dtype: torch.dtype) -> None:
        super().__init__(workload, dtype)
        self.denoise, info, self.setup_s = self._denoiser()
        self.info.update(info, loop="fastdiff.sample")

    def _denoiser(self) -> tuple[Callable, dict[str, Any], float]:
        return _accelerated(self.workload, self.dtype)

    def sample(self, case: Case) -> torch.Tensor:
        from fastdiff.samplers import sample

        return sample(
            self.denoise,
            self.sampler,
            case.shape,
            x_T=case.x_T,
            generator=case.generator(),
            cond=case.cond,
            uncond=case.uncond,
            guidance_scale=case.guidance_scale,
        )


class FastdiffGraphsBackend(Backend):
    """SamplingEngine: CUDA-graph replay on GPU; on CPU (no graphs) the engine's `compile=True` path."""

    name = "fastdiff-graphs"

    def __init__(self, workload: Workload, dtype: torch.dtype, graph_mode: str = "auto") -> None:
        super().__init__(workload, dtype)
        try:
            from fastdiff.engine import SamplingEngine
        except ImportError as err:
            raise BackendSkipped(f"fastdiff.engine is not available: {err}") from None
        denoiser, info, seconds = _accelerated(workload, dtype)
        cuda = workload.device.type == "cuda"
        start = time.perf_counter()
        self.engine = SamplingEngine(
            denoiser, self.sampler, backend="cuda-graphs" if cuda else "compile", graph_mode=graph_mode
        )
        self.setup_s = seconds + time.perf_counter() - start
        # The engine runs model and step as one captured / compiled unit: no separate model time.
        self.info.update(
            info,
            loop="fastdiff.engine.SamplingEngine",
            cuda_graphs=cuda,
            graph_mode=graph_mode,
            compile=not cuda,
            captured="lazily: first_run_s includes graph capture or compilation for each batch size",
        )

    def sample(self, case: Case) -> torch.Tensor:
        return self.engine.sample(
            case.shape,
            x_T=case.x_T,
            generator=case.generator(),
            cond=case.cond,
            uncond=case.uncond,
            guidance_scale=case.guidance_scale,
        )


class FastdiffAutoBackend(Backend):
    """What `backend="auto"` picks for each case: `PlannedSampler` over the model, planned (`plan(case)`, which the
    harness times apart from the runs as `planning_s`) for a job of `expected_calls` calls of the case.
    The planner's cache is the user's (`FASTDIFF_CACHE`): a second benchmark run loads its decisions."""

    name = "fastdiff-auto"

    def __init__(self, workload: Workload, dtype: torch.dtype, expected_calls: int) -> None:
        super().__init__(workload, dtype)
        from fastdiff.accelerate import as_denoiser
        from fastdiff.engine.planner import PlannedSampler

        self.planned = PlannedSampler(
            as_denoiser(workload.model_as(dtype)), self.sampler, expected_calls=expected_calls
        )
        self.info.update(loop="fastdiff.engine.planner.PlannedSampler (SamplingEngine loops)", plans={})

    def plan(self, case: Case) -> None:
        """Plan the case's key now (measuring, building, or loading the cached decision)."""
        plan = self.planned.plan_for(
            case.shape,
            device=case.x_T.device,
            dtype=case.x_T.dtype,
            cond=case.cond,
            uncond=case.uncond,
            guidance_scale=case.guidance_scale,
        )
        self.info["plans"][str(case.shape[0])] = {**plan.to_json(), "line": plan.line()}

    def sample(self, case: Case) -> torch.Tensor:
        return self.planned.sample(
            case.shape,
            x_T=case.x_T,
            generator=case.generator(),
            cond=case.cond,
            uncond=case.uncond,
            guidance_scale=case.guidance_scale,
        )


EXPORT_BATCH = 2  # to_onnx traces at this batch size; the batch axis of the graph stays dynamic


def _export_shapes(workload: Workload) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]] | None]:
    """(sample_shape, cond_shapes) of the example batch `to_onnx` traces."""
    cond, _ = workload.conds(EXPORT_BATCH, torch.device("cpu"), torch.float32)
    shapes = None if not cond else {key: tuple(value.shape) for key, value in cond.items()}
    return (EXPORT_BATCH, *workload.sample_shape), shapes


class OnnxRuntimeBackend(FastdiffBackend):
    """The model exported with `fastdiff.export.to_onnx`, run by `OnnxDenoiser` inside `fastdiff.sample`."""

    name = "onnxruntime"

    def __init__(self, workload: Workload, dtype: torch.dtype, workdir: Path, max_batch: int) -> None:
        self.workdir = workdir
        self.max_batch = max_batch
        super().__init__(workload, dtype)

    def _export(self) -> tuple[Path, float]:
        try:
            from fastdiff.export import to_onnx
        except ImportError as err:
            raise BackendSkipped(f"fastdiff.export.to_onnx is not available: {err}") from None
        return self._export_with(to_onnx, ".onnx")

    def _export_path(self, suffix: str) -> Path:
        return self.workdir / f"{self.workload.name}-{str(self.dtype).removeprefix('torch.')}{suffix}"

    def _export_with(self, export: Callable[..., Any], suffix: str, **options: Any) -> tuple[Path, float]:
        """(file, seconds): `export(model, path, sample_shape=..., cond_shapes=..., **options)` into the work
        folder."""
        path = self._export_path(suffix)
        sample_shape, cond_shapes = _export_shapes(self.workload)
        start = time.perf_counter()
        export(
            self.workload.model_as(self.dtype),
            path,
            sample_shape=sample_shape,
            cond_shapes=cond_shapes,
            **options,
        )
        return path, time.perf_counter() - start

    def _denoiser(self) -> tuple[Callable, dict[str, Any], float]:
        try:
            from fastdiff.export import OnnxDenoiser
        except ImportError as err:
            raise BackendSkipped(f"fastdiff.export.OnnxDenoiser is not available: {err}") from None
        if package_version("onnxruntime") is None:
            raise BackendSkipped('onnxruntime is not installed (pip install "fastdiff[onnx]")')
        path, export_s = self._export()
        start = time.perf_counter()
        denoiser = OnnxDenoiser(path)
        providers = getattr(getattr(denoiser, "session", None), "get_providers", lambda: None)()
        info = {"export_s": export_s, "onnxruntime": package_version("onnxruntime"), "providers": providers}
        return denoiser, info, export_s + time.perf_counter() - start


class OpenVinoBackend(OnnxRuntimeBackend):
    """The model exported with `fastdiff.export.to_openvino` (via ONNX), run by `OpenVinoDenoiser` at the f32
    precision hint inside `fastdiff.sample`: what a CPU user would pick instead of PyTorch. When the onnxruntime
    backend of the same run exported the model first, its file is converted (`setup_s` then leaves out the ONNX
    export, which that backend's `setup_s` counts)."""

    name = "openvino"

    def _denoiser(self) -> tuple[Callable, dict[str, Any], float]:
        if self.dtype != torch.float32:
            raise BackendSkipped(
                "OpenVINO IR is exported in float32 (its precision is a runtime hint, measured here at f32)"
            )
        if package_version("openvino") is None:
            raise BackendSkipped('openvino is not installed (pip install "fastdiff[openvino]")')
        try:
            from fastdiff.export import OpenVinoDenoiser, to_openvino
        except ImportError as err:
            raise BackendSkipped(f"fastdiff.export's OpenVINO support is not available: {err}") from None
        # the onnxruntime backend's export of the same model, when it ran first: converted, not exported again
        onnx_path = self._export_path(".onnx")
        reused = onnx_path.is_file()
        path, export_s = self._export_with(to_openvino, ".xml", onnx_path=onnx_path if reused else None)
        start = time.perf_counter()
        denoiser = OpenVinoDenoiser(path)
        info = {
            "export_s": export_s,
            "onnx": "the onnxruntime backend's export, converted" if reused else "exported by to_openvino",
            "openvino": package_version("openvino"),
            "precision": denoiser.precision,
            "threads": int(denoiser.compiled.get_property("INFERENCE_NUM_THREADS")),
        }
        return denoiser, info, export_s + time.perf_counter() - start


class TensorRTBackend(OnnxRuntimeBackend):
    """ONNX export, then a TensorRT engine built by `fastdiff.export.build_tensorrt_engine`, in `fastdiff.sample`."""

    name = "tensorrt"

    def _denoiser(self) -> tuple[Callable, dict[str, Any], float]:
        if self.workload.device.type != "cuda":
            raise BackendSkipped("TensorRT needs a CUDA GPU")
        if package_version("tensorrt") is None:
            raise BackendSkipped('tensorrt is not installed (pip install "fastdiff[tensorrt]")')
        try:
            from fastdiff.export import TensorRTDenoiser, build_tensorrt_engine
        except ImportError as err:
            raise BackendSkipped(f"fastdiff.export's TensorRT support is not available: {err}") from None
        onnx_path, export_s = self._export()
        start = time.perf_counter()
        # classifier-free guidance doubles the batch the engine sees
        batch = self.max_batch * (2 if self.workload.guidance_scale != 1.0 else 1)
        engine_path = build_tensorrt_engine(
            onnx_path,
            onnx_path.with_suffix(".engine"),
            min_batch=1,
            opt_batch=batch,
            max_batch=batch,
            fp16=self.dtype == torch.float16,
            bf16=self.dtype == torch.bfloat16,
        )
        denoiser = TensorRTDenoiser(engine_path)
        build_s = time.perf_counter() - start
        info = {"export_s": export_s, "build_s": build_s, "tensorrt": package_version("tensorrt")}
        return denoiser, info, export_s + build_s


def prepare(
    name: str,
    workload: Workload,
    dtype: torch.dtype,
    *,
    workdir: Path,
    max_batch: int,
    graph_mode: str = "auto",
    auto_calls: int = 1,
) -> Backend:
    """Build backend `name` for `workload` in `dtype` (files such as ONNX exports go to `workdir`).

    `max_batch` is the largest batch it will sample (TensorRT builds its engine for it); `graph_mode` is the
    SamplingEngine's ("step" or "loop"); `auto_calls` the sample() calls fastdiff-auto plans each case for (the
    work its builds must pay for). Raises `BackendSkipped` with the reason when it cannot run here.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    exported = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend, "tensorrt": TensorRTBackend}
    if name in exported:
        return exported[name](workload, dtype, workdir, max_batch)
    if name == "fastdiff-graphs":
        return FastdiffGraphsBackend(workload, dtype, graph_mode)
    if name == "fastdiff-auto":
        return FastdiffAutoBackend(workload, dtype, auto_calls)
    classes = {
        "eager": EagerBackend,
        "eager-sdpa": EagerSdpaBackend,
        "torch-compile": TorchCompileBackend,
        "fastdiff": FastdiffBackend,
    }
    return classes[name](workload, dtype)

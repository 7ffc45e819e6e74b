"""The cost of a weight swap: seconds from new weights to the first correct sample, per backend and path.

`fastdiff bench --weight-swap eager,engine,compile,onnxruntime` adds this section to the results. The model is
the shipped digits U-Net at the first batch size, DDIM at the run's step count; its weights alternate between the
shipped ones and a perturbed copy (a stand-in for another fine-tune of the same architecture), so every timed
swap is a real change. A row times, per swap: writing the new weights, then one full sample, which is checked
against eager sampling with those weights (`max_abs_diff`, `correct`). The paths:

- `in_place`: `fastdiff.update_weights` copies the new weights into the storage graphs and compiled loops read;
  nothing is captured or compiled again (`rebuilds`, the engine entries built during the swaps, says so).
- `new_tensors`: `load_state_dict(..., assign=True)` gives new parameter storage: the engine builds a new entry
  (a CUDA graph capture; on the CPU compile, dynamo decides whether its guards need a recompile).
- `reexport` (onnxruntime): `to_onnx` and a new `OnnxDenoiser`, the only way to new weights in a session.
- `refit` / `rebuild` (tensorrt, CUDA only): re-export, then `TensorRTDenoiser.refit` or a new engine.

`sample_s` is one sample with unchanged weights on the same backend (what a swap adds to), and the section's
`fingerprint_check_us` is one `WeightsWatch.state()` of the model: the check the engine pays per `sample()` call
and per callback, the diffusers U-Net replayer per U-Net call, next to `step_ms`, one step of the engine.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastdiff
from fastdiff.engine.weights import WeightsWatch

MODEL = "digits"
SWAP_BACKENDS = ("eager", "engine", "compile", "onnxruntime", "tensorrt")
# Max abs difference from eager sampling with the same weights (uint8-scale images are in [-1, 1]).
TOLERANCE = {"eager": 0.0, "engine": 1e-3, "compile": 1e-3, "onnxruntime": 1e-3, "tensorrt": 5e-2}


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=gen).to(v)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }


class _Case:
    """The model, sampler, inputs and the two weight sets every backend swaps between."""

    def __init__(self, device: str, steps: int, batch_size: int, seed: int) -> None:
        pre = fastdiff.load_pretrained(MODEL, device=device)
        self.model = pre.model.eval()
        self.device = torch.device(device)
        self.sampler = fastdiff.DDIMSampler(pre.schedule, num_steps=steps)
        self.shape = (batch_size, pre.channels, pre.image_size, pre.image_size)
        self.cond = {"class_labels": torch.arange(batch_size, device=device) % pre.num_classes}
        gen = torch.Generator().manual_seed(seed)
        self.x_T = torch.randn(self.shape, generator=gen).to(device)
        shipped = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.weights = [shipped, _perturbed(shipped, seed)]
        self.reference = []
        for sd in self.weights:
            self.model.load_state_dict(sd)
            self.reference.append(self.sample_eager())
        self.model.load_state_dict(shipped)

    def sample_eager(self) -> torch.Tensor:
        with torch.inference_mode():
            return fastdiff.sample(self.model, self.sampler, self.shape, x_T=self.x_T, cond=self.cond)

    def engine_sampler(self, **kwargs: Any) -> tuple[Callable[[], torch.Tensor], Any]:
        if (
            not kwargs
        ):  # the engine as it was measured before backend="auto": graphs on CUDA, its loop elsewhere
            kwargs = {"backend": "cuda-graphs" if self.device.type == "cuda" else "eager"}
        engine = fastdiff.SamplingEngine(self.model, self.sampler, **kwargs)
        return lambda: engine.sample(self.shape, x_T=self.x_T, cond=self.cond), engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _skipped(backend: str, path: str, reason: str) -> dict[str, Any]:
    return {"backend": backend, "path": path, "status": "skipped", "reason": reason}


def _measure(
    case: _Case,
    backend: str,
    path: str,
    swap: Callable[[dict[str, torch.Tensor]], Callable[[], torch.Tensor] | None],
    run: Callable[[], torch.Tensor],
    repeats: int,
    entries: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Time `swap(weights)` (which may return a new sampling function) plus the first sample after it, alternating
    the two weight sets `repeats` times; every sample is checked against eager sampling with those weights."""
    run()  # builds the graph / compiled loop / session for the first weights, untimed
    _sync(case.device)
    start = time.perf_counter()
    run()
    _sync(case.device)
    sample_s = time.perf_counter() - start
    before = entries() if entries is not None else None
    seconds, diffs = [], []
    for i in range(repeats):
        which = (i + 1) % 2
        _sync(case.device)
        start = time.perf_counter()
        run = swap(case.weights[which]) or run
        out = run()
        _sync(case.device)
        seconds.append(time.perf_counter() - start)
        diffs.append(float((out.float() - case.reference[which].float()).abs().max()))
    # fresh tensors for the next row: assigning the weight set itself would let in-place swaps overwrite it
    case.model.load_state_dict({k: v.clone() for k, v in case.weights[0].items()}, assign=True)
    row = {
        "backend": backend,
        "path": path,
        "status": "ok",
        "reason": None,
        "seconds": seconds,
        "median_s": float(np.median(seconds)),
        "sample_s": sample_s,
        "max_abs_diff": max(diffs),
        "correct": max(diffs) <= TOLERANCE[backend],
        "rebuilds": None if entries is None else entries() - before,
    }
    return row


def _engine_rows(case: _Case, backend: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for path in ("in_place", "new_tensors"):
        kwargs = {"compile": True} if backend == "compile" else {}
        run, engine = case.engine_sampler(**kwargs) if backend != "eager" else (case.sample_eager, None)

        def swap(sd: dict[str, torch.Tensor], path: str = path, target: Any = engine) -> None:
            if path == "in_place":
                fastdiff.update_weights(target if target is not None else case.model, sd)
            else:
                case.model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)

        count = None
        if engine is not None:

            def count(engine: Any = engine) -> int:
                return engine.stats.cache_misses

        rows.append(_measure(case, backend, path, swap, run, repeats, count))
    return rows


def _onnx_rows(case: _Case, folder: Path, repeats: int) -> list[dict[str, Any]]:
    from fastdiff.export import OnnxDenoiser, to_onnx

    cond_shapes = {"class_labels": (case.shape[0],)}
    counter = iter(range(1_000_000))

    def export() -> Callable[[], torch.Tensor]:
        path = to_onnx(
            case.model,
            folder / f"swap-{next(counter)}.onnx",
            sample_shape=case.shape,
            cond_shapes=cond_shapes,
        )
        denoiser = OnnxDenoiser(path, source=case.model)
        return lambda: fastdiff.sample(denoiser, case.sampler, case.shape, x_T=case.x_T, cond=case.cond)

    def swap(sd: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        fastdiff.update_weights(case.model, sd)
        return export()

    return [_measure(case, "onnxruntime", "reexport", swap, export(), repeats)]


def _tensorrt_rows(case: _Case, folder: Path, repeats: int) -> list[dict[str, Any]]:
    if case.device.type != "cuda":
        return [_skipped("tensorrt", p, "needs a CUDA GPU") for p in ("refit", "rebuild")]
    if importlib.util.find_spec("tensorrt") is None:
        return [_skipped("tensorrt", p, "tensorrt is not installed") for p in ("refit", "rebuild")]
    from fastdiff.export import TensorRTDenoiser, build_tensorrt_engine, to_onnx

    batch = case.shape[0]
    cond_shapes = {"class_labels": (batch,)}
    counter = iter(range(1_000_000))

    def onnx_file() -> Path:
        return to_onnx(
            case.model, folder / f"trt-{next(counter)}.onnx", sample_shape=case.shape, cond_shapes=cond_shapes
        )

    def build(onnx: Path) -> Any:
        engine = build_tensorrt_engine(
            onnx, folder / f"trt-{next(counter)}.engine", max_batch=batch, refittable=True
        )
        return TensorRTDenoiser(engine, source=case.model)

    def runner(denoiser: Any) -> Callable[[], torch.Tensor]:
        return lambda: fastdiff.sample(denoiser, case.sampler, case.shape, x_T=case.x_T, cond=case.cond)

    denoiser = build(onnx_file())

    def refit(sd: dict[str, torch.Tensor]) -> None:
        fastdiff.update_weights(case.model, sd)
        denoiser.refit(onnx_file())

    def rebuild(sd: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        fastdiff.update_weights(case.model, sd)
        return runner(build(onnx_file()))

    return [
        _measure(case, "tensorrt", "refit", refit, runner(denoiser), repeats),
        _measure(case, "tensorrt", "rebuild", rebuild, runner(build(onnx_file())), repeats),
    ]


def fingerprint_cost(model: torch.nn.Module, calls: int = 2000) -> float:
    """Microseconds of one `WeightsWatch.state()` of `model` (the check before every replay), median of 5 runs."""
    watch = WeightsWatch(model)
    watch.state()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            watch.state()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(runs))


def run_weight_swap(
    backends: Sequence[str], *, device: str, steps: int, batch_size: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """Measure every backend's swap paths and return the results section (see schema.json, `weight_swap`)."""
    bad = [b for b in backends if b not in SWAP_BACKENDS]
    if bad or not backends:
        raise ValueError(f"weight-swap backends must be among {SWAP_BACKENDS}, got {list(backends)!r}")
    case = _Case(device, steps, batch_size, seed)
    run, _ = case.engine_sampler()
    run()
    _sync(case.device)
    start = time.perf_counter()
    run()
    _sync(case.device)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    check_us = fingerprint_cost(case.model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastdiff-swap-") as tmp:
        for backend in dict.fromkeys(backends):
            if backend in ("eager", "engine", "compile"):
                rows += _engine_rows(case, backend, repeats)
            elif backend == "onnxruntime":
                rows += _onnx_rows(case, Path(tmp), repeats)
            else:
                rows += _tensorrt_rows(case, Path(tmp), repeats)
    return {
        "model": MODEL,
        "sampler": "ddim",
        "steps": steps,
        "batch_size": batch_size,
        "device": device,
        "step_ms": step_ms,
        "fingerprint_check_us": check_us,
        "check_fraction_of_step": check_us / 1e3 / step_ms,
        "rows": rows,
    }


def markdown_lines(section: dict[str, Any], heading: str = "### weight swap") -> list[str]:
    """The section as a markdown table."""
    lines = [
        "",
        heading,
        "",
        f"{section['model']}, DDIM {section['steps']} steps, batch {section['batch_size']}, {section['device']}: "
        f"one engine step {section['step_ms']:.2f} ms; the weights fingerprint checked per sample() call "
        f"{section['fingerprint_check_us']:.1f} us ({100 * section['check_fraction_of_step']:.2f}% of a step).",
        "",
        "| backend | path | new weights -> first correct sample (s) | plain sample (s) | rebuilds | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['path']} | skipped: {r['reason']} | | | |")
            continue
        rebuilds = "-" if r["rebuilds"] is None else str(r["rebuilds"])
        mark = "" if r["correct"] else " (WRONG)"
        lines.append(
            f"| {r['backend']} | {r['path']} | {r['median_s']:.3f} | {r['sample_s']:.3f} | {rebuilds} | "
            f"{r['max_abs_diff']:.2g}{mark} |"
        )
    return lines

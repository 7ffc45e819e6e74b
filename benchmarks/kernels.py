"""Kernel micro-benchmarks: our fused Triton kernels against eager PyTorch and torch.compile, on real model shapes.

    python -m benchmarks.kernels --out benchmarks/results/kernels-h100.json     (or python -m fastdiff.benchmarks.kernels)

For each op (group_norm_silu, attention, sampler_step) and each shape of the SD 1.5 U-Net at 64x64 latents, the
ADM 64x64 U-Net and the DDPM CIFAR-10 U-Net, it times our kernel (backend="triton"), the eager PyTorch ops (for
attention: F.scaled_dot_product_attention under each SDPA backend) and torch.compile of the eager code. Times are
medians over repeats (CUDA events after a synchronize; each repeat runs enough calls to last about a millisecond, so
small tensors stay in L2 between calls, as they do inside a sampling loop). Throughput is GB/s for the memory-bound
ops (the minimum traffic: every input read once, the output written once) and TFLOP/s for attention (4 * B * H *
Sq * Sk * D), each as a percentage of a peak measured in the same run: a device-to-device copy for bandwidth, a
large bf16 matmul for FLOP/s. The JSON goes to --out (written atomically), a markdown table to stdout.

Without a GPU it runs a smoke version in seconds: tiny shapes, Triton under the interpreter (TRITON_INTERPRET=1 is
set before the kernels are defined), torch.compile with the aot_eager backend. Its numbers mean nothing; it
exists so that this script cannot rot.

`--static --arch sm_80,sm_90 [--json out.json]` instead compiles every kernel ahead of time for those GPUs, without
one, and reports registers, spills, shared memory, occupancy and tensor-core use (benchmarks/kernels_static.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when fastdiff.kernels is first imported. Run as
# `python -m fastdiff.benchmarks.kernels`, `import fastdiff` has done that before this line: main() then starts
# the process again with the variable set.
# `--static` (the ahead-of-time compile report, benchmarks/kernels_static.py) needs compiled kernels instead.
_STATIC = __name__ == "__main__" and "--static" in sys.argv[1:]
_RESTART_FOR_INTERPRETER = (
    not _STATIC
    and not torch.cuda.is_available()
    and "TRITON_INTERPRET" not in os.environ
    and "fastdiff.kernels" in sys.modules
)
if not torch.cuda.is_available() and not _STATIC:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from fastdiff.kernels import attention, group_norm_silu, sampler_step, sampler_step_reference  # noqa: E402
from fastdiff.output import write_bytes_atomic  # noqa: E402
from fastdiff.samplers import DDPMSampler, build_sampler  # noqa: E402
from fastdiff.schedule import NoiseSchedule  # noqa: E402
from fastdiff.table import StepTable  # noqa: E402

from .environment import device_name, versions  # noqa: E402

SCHEMA = "fastdiff.benchmarks.kernels/1"
OPS = ("group_norm_silu", "attention", "sampler_step")
WORKLOADS = ("sd15-64", "adm-64", "ddpm-cifar10")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (channels, spatial size) of the GroupNorms of each U-Net, one per resolution level; ADM uses scale-shift norm.
GROUP_NORM_SHAPES = {
    "sd15-64": ([(320, 64), (640, 32), (1280, 16), (1280, 8)], False),
    "adm-64": ([(192, 64), (384, 32), (576, 16), (768, 8)], True),
    "ddpm-cifar10": ([(128, 32), (256, 16), (256, 8), (256, 4)], False),
}
# (label, heads, seq_q, seq_k, head_dim) of the attention layers.
ATTENTION_SHAPES = {
    "sd15-64": [("self 64x64", 8, 4096, 4096, 40), ("cross 64x64 x 77 tokens", 8, 4096, 77, 40)],
    "adm-64": [
        ("self 32x32", 6, 1024, 1024, 64),
        ("self 16x16", 9, 256, 256, 64),
        ("self 8x8", 12, 64, 64, 64),
    ],
    "ddpm-cifar10": [("self 16x16", 1, 256, 256, 256)],
}
# (label, per-sample shape, sampler kind, classifier-free guidance) of the sampler updates.
SAMPLER_SHAPES = {
    "sd15-64": [
        ("latent 4x64x64 ddim cfg", (4, 64, 64), "ddim", True),
        ("latent 4x64x64 dpmpp-2m cfg", (4, 64, 64), "dpmpp-2m", True),
    ],
    "adm-64": [("pixel 3x64x64 ddpm", (3, 64, 64), "ddpm", False)],
    "ddpm-cifar10": [("pixel 3x32x32 ddpm", (3, 32, 32), "ddpm", False)],
}
SMOKE = {
    "group_norm_silu": {"sd15-64": ([(16, 4)], False), "adm-64": ([(16, 4)], True)},
    "attention": {"sd15-64": [("self", 1, 32, 32, 16), ("cross", 1, 32, 7, 16)]},
    "sampler_step": {
        "sd15-64": [
            ("latent cfg", (4, 8, 8), "ddim", True),
            ("latent dpmpp-2m cfg", (4, 8, 8), "dpmpp-2m", True),
        ],
        "adm-64": [("pixel", (3, 8, 8), "ddpm", False)],
    },
}


@dataclass
class Case:
    """One op at one shape, with the implementations to time on it (each a no-argument callable)."""

    op: str
    workload: str
    label: str
    shape: dict[str, Any]
    bytes: int | None = None
    flops: int | None = None
    baseline: str = "eager"
    impls: dict[str, Callable[[], Any]] = field(default_factory=dict)


def _compiled(fn: Callable, backend: str) -> Callable:
    # A fresh dynamo state per case (cases are built one at a time, right before they run): otherwise the
    # recompile limit of the one code object is soon reached and torch.compile silently falls back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False)


def _group_norm_cases(workloads, batch_sizes, dtype, device, compile_backend, smoke) -> Iterator[Case]:
    specs = SMOKE["group_norm_silu"] if smoke else GROUP_NORM_SHAPES
    groups = 4 if smoke else 32
    for workload, (shapes, scale_shift) in specs.items():
        if workload not in workloads:
            continue
        for channels, size in shapes:
            for batch in batch_sizes:
                x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
                weight = torch.randn(channels, device=device, dtype=dtype)
                bias = torch.randn(channels, device=device, dtype=dtype)
                scale = shift = None
                if scale_shift:
                    scale = torch.randn(batch, channels, device=device, dtype=dtype)
                    shift = torch.randn(batch, channels, device=device, dtype=dtype)

                def eager(x=x, weight=weight, bias=bias, scale=scale, shift=shift):
                    y = F.group_norm(x, groups, weight, bias, 1e-5)
                    if scale is not None:
                        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
                    return F.silu(y)

                def ours(x=x, weight=weight, bias=bias, scale=scale, shift=shift):
                    return group_norm_silu(
                        x, groups, weight, bias, 1e-5, scale=scale, shift=shift, backend="triton"
                    )

                case = Case(
                    "group_norm_silu",
                    workload,
                    f"{channels}ch {size}x{size}" + (" scale-shift" if scale_shift else ""),
                    {"x": list(x.shape), "groups": groups, "scale_shift": scale_shift},
                    bytes=2 * x.numel() * x.element_size(),
                )
                case.impls = {"fastdiff-triton": ours, "eager": eager}
                if compile_backend:
                    case.impls["torch.compile"] = _compiled(eager, compile_backend)
                yield case


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {
        "math": "MATH",
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
    }
    return {
        name: getattr(SDPBackend, member) for name, member in names.items() if hasattr(SDPBackend, member)
    }


def _attention_cases(workloads, batch_sizes, dtype, device, compile_backend, smoke) -> Iterator[Case]:
    from torch.nn.attention import sdpa_kernel

    specs = SMOKE["attention"] if smoke else ATTENTION_SHAPES
    for workload, shapes in specs.items():
        if workload not in workloads:
            continue
        for label, heads, seq_q, seq_k, head_dim in shapes:
            for batch in batch_sizes:
                q = torch.randn(batch, heads, seq_q, head_dim, device=device, dtype=dtype)
                k = torch.randn(batch, heads, seq_k, head_dim, device=device, dtype=dtype)
                v = torch.randn(batch, heads, seq_k, head_dim, device=device, dtype=dtype)

                def sdpa(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v)

                def ours(q=q, k=k, v=v):
                    return attention(q, k, v, backend="triton")

                case = Case(
                    "attention",
                    workload,
                    label,
                    {"q": list(q.shape), "k": list(k.shape)},
                    flops=4 * batch * heads * seq_q * seq_k * head_dim,
                    baseline="sdpa",
                )
                case.impls = {"fastdiff-triton": ours, "sdpa": sdpa}
                for name, member in _sdpa_backends().items():

                    def pinned(member=member, sdpa=sdpa):
                        with sdpa_kernel([member]):
                            return sdpa()

                    case.impls[f"sdpa-{name}"] = pinned
                if compile_backend:
                    case.impls["torch.compile"] = _compiled(sdpa, compile_backend)
                yield case


def _step_table(kind: str) -> StepTable:
    """A realistic table: SD's DDIM (scaled-linear betas, 50 steps) or DPM-Solver++ 2M (20 steps, one x0 history
    slot), or pixel-space DDPM (linear betas, clipped)."""
    if kind == "ddpm":
        return DDPMSampler(NoiseSchedule.from_kind("linear"), 250).table
    sd = NoiseSchedule.from_kind("scaled_linear", beta_start=0.00085, beta_end=0.012)
    return build_sampler(kind, sd, 50 if kind == "ddim" else 20).table


def _sampler_cases(workloads, batch_sizes, dtype, device, compile_backend, smoke) -> Iterator[Case]:
    specs = SMOKE["sampler_step"] if smoke else SAMPLER_SHAPES
    for workload, shapes in specs.items():
        if workload not in workloads:
            continue
        for label, sample_shape, kind, cfg in shapes:
            spec = _step_table(kind)
            table, clip, step = spec.on(device), spec.clip, len(spec) // 2
            for batch in batch_sizes:
                x, eps, u, z = (
                    torch.randn(batch, *sample_shape, device=device, dtype=dtype) for _ in range(4)
                )
                u = u if cfg else None
                z = z if kind == "ddpm" else None
                w = 7.5 if cfg else 1.0
                # multistep rows read every history slot and rotate them in place (a write each)
                slots = spec.history_slots
                history = torch.randn(slots, *x.shape, device=device, dtype=dtype) if slots else None
                state = {"history": history, "history_kind": spec.history}

                def eager(x=x, eps=eps, u=u, z=z, table=table, step=step, clip=clip, w=w, state=state):
                    return sampler_step_reference(
                        x, eps, table, step, z, eps_uncond=u, guidance_scale=w, clip=clip, **state
                    )

                def ours(x=x, eps=eps, u=u, z=z, table=table, step=step, clip=clip, w=w, state=state):
                    return sampler_step(
                        x,
                        eps,
                        table,
                        step,
                        z,
                        eps_uncond=u,
                        guidance_scale=w,
                        clip=clip,
                        backend="triton",
                        **state,
                    )

                # x, eps, [u], [z] read; x_prev written; each history slot read and written
                tensors = 3 + (u is not None) + (z is not None) + 2 * slots
                case = Case(
                    "sampler_step",
                    workload,
                    label,
                    {
                        "x": list(x.shape),
                        "cfg": cfg,
                        "noise": z is not None,
                        "clip": clip,
                        "history_slots": slots,
                    },
                    bytes=tensors * x.numel() * x.element_size(),
                )
                case.impls = {"fastdiff-triton": ours, "eager": eager}
                if compile_backend:
                    case.impls["torch.compile"] = _compiled(eager, compile_backend)
                yield case


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2
) -> tuple[float, float]:
    """(median seconds per call, seconds of the first call, which includes any compilation)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    # Enough calls per repeat to last about a millisecond, so that timer resolution and launch jitter of
    # microsecond kernels do not dominate.
    inner = max(1, min(100, math.ceil(1e-3 / max(time.perf_counter() - start, 1e-7))))
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start) / inner)
    return statistics.median(times), first


def measure_peaks(device: torch.device, repeats: int, smoke: bool) -> dict[str, Any]:
    """Copy bandwidth (GB/s, read + write) and matmul throughput (TFLOP/s) measured now, on this device."""
    nbytes = (8 if smoke else 1024) * 2**20
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_s, _ = time_call(lambda: dst.copy_(src), device, repeats)
    # bf16 is emulated (slow) on CPUs without AVX512-BF16; the smoke run only needs a number.
    n, mm_dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_s, _ = time_call(lambda: a @ b, device, repeats)
    return {
        "copy_bytes": 2 * nbytes,
        "copy_gbs": 2 * nbytes / copy_s / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
    }


def run_case(case: Case, device: torch.device, repeats: int, peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """Time every implementation of `case`; a failing one is recorded with its error, not raised."""
    rows = []
    for impl, fn in case.impls.items():
        row: dict[str, Any] = {
            "op": case.op,
            "workload": case.workload,
            "case": case.label,
            "shape": case.shape,
            "impl": impl,
            "time_ms": None,
            "first_call_s": None,
            "gbs": None,
            "tflops": None,
            "pct_peak": None,
            "speedup_vs_baseline": None,
            "baseline": case.baseline,
            "error": None,
        }
        try:
            seconds, first = time_call(fn, device, repeats)
        except Exception as exc:  # an unsupported backend/shape is a result to report, not a crash
            row["error"] = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            continue
        row["time_ms"] = seconds * 1e3
        row["first_call_s"] = first
        if case.bytes is not None:
            row["gbs"] = case.bytes / seconds / 1e9
            row["pct_peak"] = 100 * row["gbs"] / peaks["copy_gbs"]
        if case.flops is not None:
            row["tflops"] = case.flops / seconds / 1e12
            row["pct_peak"] = 100 * row["tflops"] / peaks["matmul_tflops"]
        rows.append(row)
    base = next((r["time_ms"] for r in rows if r["impl"] == case.baseline), None)
    for row in rows:
        if base is not None and row["time_ms"] is not None:
            row["speedup_vs_baseline"] = base / row["time_ms"]
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def markdown(report: dict[str, Any]) -> str:
    """The results as one markdown table per op, with the device and the peaks on top."""
    peak = report["peak"]
    lines = [
        f"Device: {report['device']['name']}; torch {report['versions']['torch']}, triton {report['versions']['triton']};"
        f" dtype {report['settings']['dtype']}{' (smoke run: numbers mean nothing)' if report['smoke'] else ''}",
        f"Peaks measured in this run: copy {peak['copy_gbs']:.4g} GB/s, {peak['matmul_dtype']} matmul"
        f" {peak['matmul_tflops']:.4g} TFLOP/s",
    ]
    for op in OPS:
        rows = [r for r in report["results"] if r["op"] == op]
        if not rows:
            continue
        unit = "TFLOP/s" if op == "attention" else "GB/s"
        lines += [
            "",
            f"### {op}",
            "",
            f"| workload | case | shape | impl | ms | {unit} | % peak | x {rows[0]['baseline']} |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            shape = "x".join(map(str, r["shape"].get("x") or r["shape"].get("q")))
            rate = r["tflops"] if op == "attention" else r["gbs"]
            if r["error"] is not None:
                lines.append(
                    f"| {r['workload']} | {r['case']} | {shape} | {r['impl']} | {r['error'][:60]} | | | |"
                )
                continue
            lines.append(
                f"| {r['workload']} | {r['case']} | {shape} | {r['impl']} | {r['time_ms']:.4g} | {_fmt(rate)}"
                f" | {_fmt(r['pct_peak'])} | {_fmt(r['speedup_vs_baseline'])} |"
            )
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode())


def _csv(value: str, choices: Sequence[str], name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{name}: expected a comma list of {', '.join(choices)}, got {value!r}"
        )
    return items


def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"--batch-sizes: expected positive integers like 1,4,16, got {value!r}"
        )
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON report here (atomically)")
    p.add_argument("--ops", type=lambda v: _csv(v, OPS, "--ops"), default=list(OPS))
    p.add_argument("--workloads", type=lambda v: _csv(v, WORKLOADS, "--workloads"), default=list(WORKLOADS))
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, help="default 1,4,16 (smoke: 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16" if cuda else "float32")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per measurement (default 20; smoke 2)"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--smoke", action="store_true", default=not cuda, help="tiny shapes (the default without a GPU)"
    )
    args = p.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = [1] if args.smoke else [1, 4, 16]
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 20
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    """Run the benchmark described by parsed `args` and return the report (the JSON document)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    compile_backend = None
    if not args.no_compile:
        compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    if args.smoke and device.type == "cpu":
        # Tiny shapes gain nothing from intra-op threads, and on a shared machine each parallel region can stall
        # for a scheduler tick waiting on a busy core.
        torch.set_num_threads(1)
    torch.manual_seed(0)
    peaks = measure_peaks(device, args.repeats, args.smoke)
    builders = {
        "group_norm_silu": _group_norm_cases,
        "attention": _attention_cases,
        "sampler_step": _sampler_cases,
    }
    results = []
    with torch.inference_mode():
        for op in args.ops:
            for case in builders[op](
                args.workloads, args.batch_sizes, dtype, device, compile_backend, args.smoke
            ):
                results += run_case(case, device, args.repeats, peaks)
                case.impls.clear()  # free this case's tensors before the next one
    return {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "smoke": args.smoke,
        "device": {"type": device.type, "name": device_name(device)},
        "versions": versions(),
        "settings": {
            "dtype": args.dtype,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "compile_backend": compile_backend,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        },
        "peak": peaks,
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print the markdown table, write the JSON to --out."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:
        from .kernels_static import main as static_main

        return static_main([a for a in argv if a != "--static"])
    if _RESTART_FOR_INTERPRETER:
        os.execv(sys.executable, [sys.executable, "-m", "fastdiff.benchmarks.kernels", *argv])
    args = parse_args(argv)
    report = run(args, " ".join(["python -m benchmarks.kernels", *argv]))
    print(markdown(report))
    if args.out is not None:
        write_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

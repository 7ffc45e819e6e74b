"""Static report of our Triton kernels for sm_80 (A100) and sm_90 (H100), built on a machine without a GPU.

    python -m fastdiff.benchmarks.kernels --static --arch sm_80,sm_90 [--json out.json] [--subset ci]

For every op in OPS and every shape of the SD 1.5 (512 px) and SDXL (1024 px) U-Nets, the DDPM CIFAR-10 U-Net and
the ADM 64x64 U-Net (GroupNorm in NCHW and in channels-last memory), in float16, bfloat16 and float32, it calls the
op's wrapper on meta tensors with the kernels' launches recorded (the configuration the wrapper picks for a GPU of the
target's SM count), compiles each launch for each target (benchmarks/aot_compile.py) and reports registers, spill
bytes, shared memory, warps, stages, the grid against the SM count, the estimated occupancy, whether the PTX uses
tensor cores (mma / wgmma) and 16-byte async copies, and for GroupNorm the fraction of channel lanes that hold a
channel. `violations()` is the CI gate (tests/kernels/test_static_compile.py). A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdiff.kernels.backend import simulated_gpu
from fastdiff.output import write_bytes_atomic

from .aot_compile import TARGETS, Target, compile_launch, ptxas_usable, record_launches
from .environment import versions

SCHEMA = "fastdiff.benchmarks.kernels_static/1"
# "float32+tf32": float32 tensors with TF32 products allowed (attention's allow_tf32=True)
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float32+tf32": torch.float32,
}
LOW_PRECISION = ("float16", "bfloat16")
TENSOR_CORE_DTYPES = (*LOW_PRECISION, "float32+tf32")  # attention in these must use mma / wgmma
GATED_WORKLOAD = "sd15-512"  # the grid-fill gate applies to these shapes
GRID_FILL_GPU = "sm_80"  # ... and measures against half this target's SMs (A100: 108)

# A case, as the builders yield it: (workload, label, shape description, call of the wrapper on meta tensors, given
# a name from DTYPES).
CaseSpec = tuple[str, str, dict[str, Any], Callable[[str], None]]

# Batch 2: one image with classifier-free guidance (latent models); 16 for the pixel models, sampled in batches.
SD_BATCH, PIXEL_BATCH = 2, 16

# (channels, size) of the GroupNorms (32 groups) of each U-Net, resnet inputs after the skip concatenations included.
GROUP_NORM_SHAPES: dict[str, tuple[list[tuple[int, int]], bool]] = {
    "sd15-512": (
        [
            *[(320, 64), (640, 64), (960, 64)],
            *[(320, 32), (640, 32), (960, 32), (1280, 32), (1920, 32)],
            *[(640, 16), (1280, 16), (1920, 16), (2560, 16)],
            *[(1280, 8), (2560, 8)],
        ],
        False,
    ),
    "sdxl-1024": (
        [
            *[(320, 128), (640, 128), (960, 128)],
            *[(320, 64), (640, 64), (960, 64), (1280, 64), (1920, 64)],
            *[(640, 32), (1280, 32), (1920, 32), (2560, 32)],
        ],
        False,
    ),
    "ddpm-cifar10": ([(128, 32), (256, 32), (256, 16), (512, 16), (256, 8), (256, 4)], False),
    "adm-64": ([(192, 64), (384, 32), (576, 16), (768, 8)], True),
}
# (label, heads, seq_q, seq_k, head_dim) of the attention layers; text context of 77 tokens.
ATTENTION_SHAPES: dict[str, list[tuple[str, int, int, int, int]]] = {
    "sd15-512": [
        ("self 64x64", 8, 4096, 4096, 40),
        ("cross 64x64", 8, 4096, 77, 40),
        ("self 32x32", 8, 1024, 1024, 80),
        ("cross 32x32", 8, 1024, 77, 80),
        ("self 16x16", 8, 256, 256, 160),
        ("cross 16x16", 8, 256, 77, 160),
        ("self 8x8 (mid)", 8, 64, 64, 160),
        ("cross 8x8 (mid)", 8, 64, 77, 160),
    ],
    "sdxl-1024": [
        ("self 64x64", 10, 4096, 4096, 64),
        ("cross 64x64", 10, 4096, 77, 64),
        ("self 32x32", 20, 1024, 1024, 64),
        ("cross 32x32", 20, 1024, 77, 64),
    ],
    "ddpm-cifar10": [("self 16x16", 1, 256, 256, 256)],
    "adm-64": [
        ("self 32x32", 6, 1024, 1024, 64),
        ("self 16x16", 9, 256, 256, 64),
        ("self 8x8", 12, 64, 64, 64),
    ],
}
SAMPLER_SHAPES: dict[str, list[tuple[str, tuple[int, ...], bool, bool]]] = {
    # (label, per-sample shape, classifier-free guidance, fresh noise)
    "sd15-512": [("latent 4x64x64 ddim cfg", (4, 64, 64), True, False)],
    "sdxl-1024": [("latent 4x128x128 ddim cfg", (4, 128, 128), True, False)],
    "ddpm-cifar10": [("pixel 3x32x32 ddpm", (3, 32, 32), False, True)],
    "adm-64": [("pixel 3x64x64 ddpm", (3, 64, 64), False, True)],
}

# SD 1.5 launches with fewer programs than an A100 has SMs (108), and why more programs would not pay: (op, label)
# -> why. The gate fails a launch under half the SMs (54) unless it is listed here. Bytes at batch 2, float16; a
# launch costs about 3 us whatever its size, and an A100 moves about 1.5 MB per microsecond.
GRID_EXEMPT = {
    ("sampler_step", "latent 4x64x64 ddim cfg"): (
        "32 programs of 1024 elements: the 2x4x64x64 update reads x and the two model outputs and writes x, "
        "4 x 64 KB = 0.26 MB (0.5 MB in float32), about 0.2 us of memory traffic, under the launch itself"
    ),
    ("attention", "self 8x8 (mid)"): (
        "64 programs (4 tiles of 16 queries, the smallest tl.dot takes, x 16 batch-heads): q, k, v and the output "
        "are 4 x 0.33 MB = 1.3 MB and 42 MFLOP (0.13 us of A100 tensor cores); more programs would mean splitting "
        "the 64 keys and a second pass to merge them, which costs more than the 0.9 us of memory traffic"
    ),
    ("attention", "cross 8x8 (mid)"): (
        "64 programs (4 tiles of 16 queries x 16 batch-heads) against 77 text tokens: 1.4 MB and 50 MFLOP, "
        "as the self-attention beside it"
    ),
    ("group_norm_silu", "1280ch 8x8"): (
        "64 programs, one per group of 40 channels x 64 positions (2560 elements, 5 KB): 0.33 MB read and written "
        "in all (0.2 us); splitting a group takes a second launch (statistics, then normalise)"
    ),
    ("group_norm_silu", "1280ch 8x8 NHWC"): (
        "64 programs, one per group, as in NCHW: runs of 3 groups would make 22 programs and need the two-launch "
        "split to fill the GPU again, for 0.33 MB (0.2 us)"
    ),
}


def _batch(workload: str) -> int:
    return SD_BATCH if workload.startswith("sd") else PIXEL_BATCH


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _group_norm_cases(workloads: Sequence[str]) -> Iterator[CaseSpec]:
    from fastdiff.kernels.group_norm_triton import group_norm_silu_triton

    for workload in workloads:
        shapes, scale_shift = GROUP_NORM_SHAPES[workload]
        batch = _batch(workload)
        # NCHW, and channels-last (NHWC: the layout accelerate() gives every U-Net)
        for layout in ("contiguous", "channels_last"):
            for channels, size in shapes:

                def launch(
                    dtype_name,
                    batch=batch,
                    channels=channels,
                    size=size,
                    scale_shift=scale_shift,
                    layout=layout,
                ):
                    dtype = DTYPES[dtype_name]
                    x = _meta(batch, channels, size, size, dtype=dtype)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    w, b = _meta(channels, dtype=dtype), _meta(channels, dtype=dtype)
                    # ADM's scale and shift are the halves of one (N, 2C) embedding
                    sc, sh = (
                        _meta(batch, 2 * channels, dtype=dtype).chunk(2, 1) if scale_shift else (None, None)
                    )
                    group_norm_silu_triton(x, 32, w, b, 1e-5, sc, sh, True)

                label = (
                    f"{channels}ch {size}x{size}"
                    + (" NHWC" if layout == "channels_last" else "")
                    + (" scale-shift" if scale_shift else "")
                )
                shape = {"x": [batch, channels, size, size], "groups": 32, "layout": layout}
                yield workload, label, shape, launch


def _attention_cases(workloads: Sequence[str]) -> Iterator[CaseSpec]:
    from fastdiff.kernels.attention_triton import attention_triton

    for workload in workloads:
        batch = _batch(workload)
        for label, heads, seq_q, seq_k, head_dim in ATTENTION_SHAPES[workload]:

            def launch(dtype_name, batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim):
                dtype = DTYPES[dtype_name]
                # (batch, seq, heads * head_dim) projections viewed per head, as diffusers' attention does
                q, k, v = (
                    _meta(batch, s, heads, head_dim, dtype=dtype).transpose(1, 2)
                    for s in (seq_q, seq_k, seq_k)
                )
                attention_triton(q, k, v, head_dim**-0.5, allow_tf32=dtype_name == "float32+tf32")

            yield workload, label, {"q": [batch, heads, seq_q, head_dim], "seq_k": seq_k}, launch


def _sampler_cases(workloads: Sequence[str]) -> Iterator[CaseSpec]:
    from fastdiff.kernels.sampler_step import TABLE_COLUMNS
    from fastdiff.kernels.sampler_step_triton import sampler_step_triton

    for workload in workloads:
        batch = _batch(workload)
        for label, shape, cfg, noise in SAMPLER_SHAPES[workload]:

            def launch(dtype_name, batch=batch, shape=shape, cfg=cfg, noise=noise):
                dtype = DTYPES[dtype_name]
                x, m, u, z, out = (_meta(batch, *shape, dtype=dtype) for _ in range(5))
                table = _meta(50, len(TABLE_COLUMNS), dtype=torch.float32)
                sampler_step_triton(
                    out, x, m, table, 25, None, z if noise else None, u if cfg else None, 7.5, None, None
                )

            yield workload, label, {"x": [batch, *shape], "cfg": cfg, "noise": noise}, launch


@dataclass(frozen=True)
class KernelOp:
    """A fused op for the report: the module holding its @triton.jit kernels, their names, and its cases."""

    module: str
    kernels: tuple[str, ...]
    cases: Callable[[Sequence[str]], Iterator[CaseSpec]]
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")

    def jit_functions(self) -> list[Any]:
        mod = importlib.import_module(self.module)
        return [getattr(mod, name) for name in self.kernels]


# The report discovers kernels through this list only: a new kernel is one entry here.
OPS: dict[str, KernelOp] = {
    "group_norm_silu": KernelOp(
        "fastdiff.kernels.group_norm_triton",
        ("_group_norm_silu_fused_kernel", "_group_norm_stats_kernel", "_group_norm_apply_kernel"),
        _group_norm_cases,
    ),
    "attention": KernelOp(
        "fastdiff.kernels.attention_triton", ("_attention_fwd_kernel",), _attention_cases, tuple(DTYPES)
    ),
    "sampler_step": KernelOp(
        "fastdiff.kernels.sampler_step_triton", ("_sampler_step_kernel",), _sampler_cases
    ),
}
WORKLOADS = tuple(GROUP_NORM_SHAPES)

# The CI subset: SD 1.5 everywhere the gate looks, every op, the dtypes the gate checks (+ float32 attention).
CI_SUBSET = {
    "workloads": ("sd15-512",),
    "dtypes": {
        "group_norm_silu": LOW_PRECISION,
        "attention": tuple(DTYPES),
        "sampler_step": ("float16",),
    },
}


def run_static(
    ops: Sequence[str],
    workloads: Sequence[str],
    dtypes: dict[str, Sequence[str]],
    targets: Sequence[Target],
    cache_dir: Path | None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (op, case, dtype, target, kernel launched): the launch's configuration and its compile report."""
    rows = []
    memo: dict[str, Any] = {}
    for op_name in ops:
        op = OPS[op_name]
        kernels = op.jit_functions()
        for workload, label, shape, launch in op.cases(workloads):
            for dtype_name in (d for d in dtypes[op_name] if d in op.dtypes):
                for target in targets:
                    with simulated_gpu(target.sm_count), record_launches(kernels) as launches:
                        launch(dtype_name)
                    for rec in launches:
                        start = time.perf_counter()
                        row = {
                            "op": op_name,
                            "workload": workload,
                            "case": label,
                            "shape": shape,
                            "dtype": dtype_name,
                            "arch": target.name,
                            "gpu": target.gpu,
                            "sm_count": target.sm_count,
                            "smem_limit": target.smem_per_block,
                            "config": {
                                k: v for k, v in rec.kwargs.items() if isinstance(v, (bool, int, str))
                            },
                        }
                        row.update(compile_launch(rec, target, cache_dir, memo))
                        rows.append(row)
                        if progress is not None:
                            progress(
                                f"{op_name} {workload} {label} {dtype_name} {target.name} {rec.name}: "
                                f"{time.perf_counter() - start:.1f} s"
                            )
    return rows


def violations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the CI gate rejects, one line per problem (empty when every row passes)."""
    half_a100 = TARGETS[GRID_FILL_GPU].sm_count / 2
    found = []
    for r in rows:
        where = f"{r['op']} {r['workload']} {r['case']} {r['dtype']} {r['arch']} {r['kernel']}"
        if r["error"] is not None:
            found.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["dtype"] in LOW_PRECISION and r["spill_bytes"] > 0:
            found.append(f"{where}: spills {r['spill_bytes']} bytes ({r['registers']} registers)")
        if r["smem"] > r["smem_limit"]:
            found.append(f"{where}: {r['smem']} bytes of shared memory, over the {r['smem_limit']} limit")
        if r["op"] == "attention" and r["dtype"] in TENSOR_CORE_DTYPES and r["mma"] + r["wgmma"] == 0:
            found.append(f"{where}: no tensor-core instruction (mma / wgmma) in the PTX")
        if (
            r["workload"] == GATED_WORKLOAD
            and r["programs"] < half_a100
            and (r["op"], r["case"]) not in GRID_EXEMPT
        ):
            found.append(f"{where}: {r['programs']} programs fill fewer than half of an A100's 108 SMs")
    return found


def _cfg_text(config: dict[str, Any]) -> str:
    keys = [k for k in config if k.startswith("BLOCK") or k in ("ALIGN", "PRECISION", "EVEN_C", "GROUPS")]
    return " ".join(f"{k.removeprefix('BLOCK_')}={config[k]}" for k in keys)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table per target; one row per launch."""
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        sel = [r for r in rows if r["arch"] == arch]
        lines += [
            f"#### {arch} ({sel[0]['gpu']}, {sel[0]['sm_count']} SMs)",
            "",
            "| op | workload | case | dtype | kernel | config | warps/stages | regs | spill st/ld B | smem KB"
            " | programs | occ. | waves | TC | cp.async16 | lanes |",
            "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in sel:
            head = f"| {r['op']} | {r['workload']} | {r['case']} | {r['dtype']} | {r['kernel'].strip('_')}"
            if r["error"] is not None:
                lines.append(f"{head} | {r['error'][:80]} | | | | | | | | | | |")
                continue
            tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "—")
            lanes = _channel_lane_use(r)
            lines.append(
                f"{head} | {_cfg_text(r['config'])} | {r['num_warps']}/{r['num_stages']} | {r['registers']}"
                f" | {r['spill_stores']}/{r['spill_loads']} | {r['smem'] / 1024:.1f} | {r['programs']} | {r['occupancy']:.2f}"
                f" | {r['waves']:.2f} | {tc} | {r['cp_async_16']} | {'—' if lanes is None else f'{lanes:.2f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def _pair(values: dict[str, Any], fmt: str = "{}") -> str:
    return " / ".join("—" if v is None else fmt.format(v) for v in values.values())


def _channel_lane_use(row: dict[str, Any]) -> float | None:
    """GroupNorm: a sample's channels over the channel lanes its programs' tiles take (a program holds GROUPS
    adjacent groups, in channel tiles of BLOCK_C lanes); None for other ops."""
    if "groups" not in row["shape"] or "BLOCK_C" not in row["config"]:
        return None
    channels, num_groups = row["shape"]["x"][1], row["shape"]["groups"]
    block_c, groups = row["config"]["BLOCK_C"], row["config"].get("GROUPS", 1)
    programs = -(-num_groups // groups)
    tiles = -(-groups * (channels // num_groups) // block_c)
    return channels / (programs * tiles * block_c)


def _layout(row: dict[str, Any]) -> str:
    return "NHWC" if row["shape"].get("layout") == "channels_last" else ""


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per (op, kernel, dtype) over all shapes, each figure given per target as `sm_80 / sm_90`: the worst
    registers, spill bytes, shared memory and occupancy, the fewest programs at SD 1.5 / SDXL shapes, the tensor-core
    instruction used, how many cases load 16-byte vectors (cp.async or ld.global.v4), and for GroupNorm the fraction
    of its tiles' channel lanes that hold a channel. GroupNorm in channels-last memory has rows of its own (NHWC)."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], _layout(r), r["kernel"], r["dtype"]), []).append(r)
    lines = [
        f"Each figure per target: {' / '.join(archs)}.",
        "",
        "| op | kernel | dtype | cases | registers (max) | spill B (sum) | smem KB (max) | occupancy (min)"
        " | programs at SD shapes (min) | tensor cores | 16-byte loads | channel lanes used (min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for (op, layout, kernel, dtype), sel in groups.items():
        per = {a: [r for r in sel if r["arch"] == a and r["error"] is None] for a in archs}
        errors = sum(r["error"] is not None for r in sel)

        def agg(fn, key, per=per):
            return {a: (fn(r[key] for r in rs) if rs else None) for a, rs in per.items()}

        sd = {a: [r["programs"] for r in rs if r["workload"].startswith("sd")] for a, rs in per.items()}
        tc = {
            a: "/".join(k for k in ("wgmma", "mma") if any(r[k] for r in rs)) or "none"
            for a, rs in per.items()
        }
        vec = {
            a: f"{sum(r['cp_async_16'] + r['ld_global_v4'] > 0 for r in rs)}/{len(rs)}"
            for a, rs in per.items()
        }
        lanes = [_channel_lane_use(r) for r in sel if r["error"] is None]
        lanes_text = "—" if None in lanes or not lanes else f"{min(lanes):.2f}"
        lines.append(
            f"| {op}{f' ({layout})' if layout else ''} | {kernel.strip('_')} | {dtype} | {_pair({a: sum(r['arch'] == a for r in sel) for a in archs})}"
            + (f" ({errors} errors)" if errors else "")
            + f" | {_pair(agg(max, 'registers'))} | {_pair(agg(sum, 'spill_bytes'))}"
            f" | {_pair({a: v / 1024 if v is not None else None for a, v in agg(max, 'smem').items()}, '{:.0f}')}"
            f" | {_pair(agg(min, 'occupancy'), '{:.2f}')}"
            f" | {_pair({a: min(v) if v else None for a, v in sd.items()})} | {_pair(tc)} | {_pair(vec)}"
            f" | {lanes_text} |"
        )
    return "\n".join(lines)


def _csv(value: str, choices: Sequence[str], name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{name}: expected a comma list of {', '.join(choices)}, got {value!r}"
        )
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastdiff.benchmarks.kernels --static", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", type=lambda v: _csv(v, list(TARGETS), "--arch"), default=list(TARGETS))
    p.add_argument("--json", type=Path, help="write the JSON report here (atomically)")
    p.add_argument("--ops", type=lambda v: _csv(v, list(OPS), "--ops"), default=list(OPS))
    p.add_argument("--workloads", type=lambda v: _csv(v, WORKLOADS, "--workloads"), default=list(WORKLOADS))
    p.add_argument(
        "--dtypes",
        type=lambda v: _csv(v, list(DTYPES), "--dtypes"),
        default=list(DTYPES),
        help="default: all (float32+tf32: attention only)",
    )
    p.add_argument(
        "--subset", choices=["ci"], help="the CI gate's cases (overrides --workloads and --dtypes)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "fastdiff"
        / "static-compile",
        help="compile results by Triton source hash, target and options (default %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="compile everything afresh, write no cache")
    p.add_argument("--gate", action="store_true", help="exit 1 when the CI gate finds a violation")
    p.add_argument("--quiet", action="store_true", help="no per-compile progress on stderr")
    p.add_argument("--summary", action="store_true", help="print only the per-kernel summary table")
    p.add_argument(
        "--from-json",
        type=Path,
        help="render the tables of an earlier report instead of compiling (no GPU target)",
    )
    return p.parse_args(argv)


def _kernels_are_compiled() -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(
        importlib.import_module("fastdiff.kernels.attention_triton")._attention_fwd_kernel, JITFunction
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: compile, print the tables and the gate's findings, write the JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        print(summary_markdown(report["results"]) if args.summary else markdown(report["results"]))
        return 1 if args.gate and report["violations"] else 0
    ok, why = ptxas_usable()
    if not ok:
        print(f"static compile unavailable: {why}", file=sys.stderr)
        return 2
    if not _kernels_are_compiled():
        # Kernels defined under TRITON_INTERPRET=1 are interpreter objects, which triton.compile cannot take.
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execve(sys.executable, [sys.executable, "-m", "fastdiff.benchmarks.kernels_static", *argv], env)
    workloads, dtypes = args.workloads, {op: args.dtypes for op in OPS}
    if args.subset == "ci":
        workloads, dtypes = list(CI_SUBSET["workloads"]), dict(CI_SUBSET["dtypes"])
    start = time.perf_counter()
    rows = run_static(
        args.ops,
        workloads,
        dtypes,
        [TARGETS[a] for a in args.arch],
        None if args.no_cache else args.cache_dir,
        None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    found = violations(rows)
    report = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastdiff.benchmarks.kernels --static", *argv]),
        "versions": versions(),
        "targets": {a: TARGETS[a].__dict__ for a in args.arch},
        "seconds": time.perf_counter() - start,
        "results": rows,
        "violations": found,
        "grid_exempt": {f"{op}: {case}": why for (op, case), why in GRID_EXEMPT.items()},
    }
    print(summary_markdown(rows) if args.summary else markdown(rows))
    print(f"gate: {len(found)} violation(s)" + "".join(f"\n- {v}" for v in found))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 1 if args.gate and found else 0


if __name__ == "__main__":
    sys.exit(main())

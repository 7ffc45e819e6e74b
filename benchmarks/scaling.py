"""Data-parallel scaling: images/s of sharded sampling (`fastdiff.sample_to_dir`) with 1, 2, ... processes.

`fastdiff bench --processes 1,2` adds this section to the results: the shipped digits model, DDIM, one shard per
batch, each process a torch.distributed rank (gloo on CPU with `threads` intra-op threads each; NCCL on CUDA with
one GPU each). Every row's `speedup_vs_1` is its images/s over the 1-process row's, measured in the same run, and
`efficiency` is that speedup per unit of hardware the row uses more than the 1-process row (processes x threads;
per added GPU on CUDA). On a CPU the section also measures one process with as many threads as the largest job
has in all, the alternative a user has on the same cores.

On a multi-GPU machine, the same figure for a real run is what `fastdiff sample` prints at the end:

    torchrun --standalone --nproc-per-node N -m fastdiff sample --model digits --num-samples 50000 \\
        --batch-size 256 --out fid/
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.distributed import measure_throughput

MODEL = "digits"


def plan(processes: Sequence[int], threads: int, device: str) -> list[tuple[int, int]]:
    """(processes, threads per process) of every row: the requested counts, then on CPU one process with all of
    the largest job's threads (when that is not already a row)."""
    rows = [(n, threads) for n in dict.fromkeys(processes)]
    if device == "cpu":
        single = (1, max(processes) * threads)
        if single not in rows:
            rows.append(single)
    return rows


def run_scaling(
    processes: Sequence[int],
    *,
    threads: int,
    device: str,
    num_samples: int,
    steps: int,
    batch_size: int,
    guidance_scale: float,
    repeats: int,
    seed: int,
    on_row: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Measure every row of `plan(...)` and return the results section (see schema.json, `scaling`)."""
    if not processes or 1 not in processes:
        raise ValueError(f"processes must include 1 (the reference of the speedups), got {list(processes)!r}")
    rows: list[dict[str, Any]] = []
    for nprocs, per_process in plan(processes, threads, device):
        row: dict[str, Any] = {"processes": nprocs, "threads_per_process": per_process}
        if device == "cuda" and nprocs > torch.cuda.device_count():
            row.update(
                status="skipped",
                reason=f"needs {nprocs} GPUs (one per process), {torch.cuda.device_count()} visible",
            )
        else:
            measured = measure_throughput(
                MODEL,
                nprocs=nprocs,
                threads=per_process,
                num_samples=num_samples,
                steps=steps,
                batch_size=batch_size,
                guidance_scale=guidance_scale,
                seed=seed,
                repeats=repeats,
                device=device,
            )
            row.update(
                status="ok", reason=None, seconds=measured["seconds"], images_per_s=measured["images_per_s"]
            )
        rows.append(row)
        if on_row is not None:
            on_row()
    base = next(r for r in rows if r["processes"] == 1 and r["threads_per_process"] == threads)
    for row in rows:
        ok = row["status"] == "ok" and base["status"] == "ok"
        row["speedup_vs_1"] = row["images_per_s"] / base["images_per_s"] if ok else None
        cores = row["processes"] * row["threads_per_process"] / threads
        row["efficiency"] = row["speedup_vs_1"] / cores if ok else None
    return {
        "model": MODEL,
        "sampler": "ddim",
        "steps": steps,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
        "device": device,
        "backend": "nccl" if device == "cuda" else "gloo",
        "rows": rows,
    }


def markdown_lines(section: dict[str, Any], heading: str = "### data-parallel scaling") -> list[str]:
    """The scaling section as a markdown table under `heading`."""
    s = section
    lines = [
        "",
        heading,
        "",
        f"`sample_to_dir` on {s['model']}, {s['sampler'].upper()} {s['steps']} steps, guidance "
        f"{s['guidance_scale']:g}, batch (= shard) {s['batch_size']}, {s['num_samples']} images per run, "
        f"{s['backend']} ranks on {s['device']}; speedup over the 1-process row of the same run.",
        "",
        "| processes | threads/process | images/s | median s (min–max) | x 1 process | efficiency |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        if r["status"] != "ok":
            lines.append(
                f"| {r['processes']} | {r['threads_per_process']} | — | {r['status']}: {r['reason']} | — | — |"
            )
            continue
        secs = r["seconds"]
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['images_per_s']:.4g} | "
            f"{np.median(secs):.3g} ({min(secs):.3g}–{max(secs):.3g}) | {r['speedup_vs_1']:.2f} | "
            f"{r['efficiency']:.2f} |"
        )
    return lines

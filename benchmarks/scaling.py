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

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdiff.checks import check_int
from fastdiff.distributed import (
    init_distributed,
    local_device,
    sample_to_dir,
    shard_counter,
)
from fastdiff.engine import engine_for
from fastdiff.output import write_bytes_atomic
from fastdiff.pretrained import Pretrained, load_model
from fastdiff.samplers import build_sampler

MODEL = "digits"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT of a local job)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world: int, port: int) -> None:
    """Set the torchrun environment of `rank` in a job of `world` processes on this machine."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _throughput_worker(rank: int, world: int, port: int, threads: int, tmp: str, job: dict) -> None:
    local_rank_env(rank, world, port)
    torch.set_num_threads(threads)
    model, n, batch = job.pop("model"), job.pop("num_samples"), job["batch_size"]
    repeats, steps = job.pop("repeats"), job.pop("steps")
    device = local_device(torch.device(job["device"]))
    group = init_distributed(device)
    pre = load_model(model, str(device)) if isinstance(model, str) else model
    sampler = build_sampler("ddim", pre.schedule, steps)
    # As `fastdiff sample --out DIR/` does: CUDA graphs on a GPU, fastdiff.sample on a CPU.
    engine = engine_for(pre.model, sampler, device, compile=False)
    job.update(sampler=sampler, engine=engine)
    # One batch per rank first, so that start-up costs (allocator, first calls, graph capture) stay out.
    sample_to_dir(pre, num_samples=batch * world, out_dir=Path(tmp) / "warm", **job)
    runs = []
    for r in range(repeats):
        made, on_shard = shard_counter(job["shard_size"], n)
        group.barrier()
        start = time.perf_counter()
        sample_to_dir(pre, num_samples=n, out_dir=Path(tmp) / f"run{r}", on_shard=on_shard, **job)
        group.barrier()
        runs.append({"seconds": time.perf_counter() - start, "images": made[0]})
    if rank == 0:
        write_bytes_atomic(Path(tmp) / "result.json", json.dumps(runs).encode())


def measure_throughput(
    model: str | Pretrained = "digits",
    *,
    nprocs: int = 1,
    threads: int = 1,
    num_samples: int = 256,
    steps: int = 50,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    seed: int = 0,
    repeats: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Images/s of `sample_to_dir` (DDIM) with `nprocs` processes of `threads` intra-op threads each.

    On "cpu" the processes form a gloo group; on "cuda" an NCCL group with one GPU per process (nprocs must not
    exceed the GPUs visible). Shards are `batch_size` samples, so the work splits evenly. Process start-up, model
    loading and one warm-up batch per rank are excluded; sampling, shard writing and manifest updates are
    included. Each of the `repeats` runs samples `num_samples` images into a fresh folder; `seconds` lists them
    and `images_per_s` is taken from their median.
    """
    import torch.multiprocessing as mp

    check_int("nprocs", nprocs, 1)
    check_int("threads", threads, 1)
    check_int("num_samples", num_samples, 1)
    check_int("batch_size", batch_size, 1)
    check_int("repeats", repeats, 1)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and nprocs > torch.cuda.device_count():
        raise ValueError(
            f"nprocs={nprocs} needs {nprocs} CUDA GPUs (one per process); {torch.cuda.device_count()} visible"
        )
    job = {
        "model": model,
        "num_samples": num_samples,
        "steps": steps,
        "repeats": repeats,
        "batch_size": batch_size,
        "shard_size": batch_size,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "device": device,
        "progress": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_throughput_worker, args=(nprocs, free_port(), threads, tmp, job), nprocs=nprocs)
        runs = json.loads((Path(tmp) / "result.json").read_text())
    seconds = [run["seconds"] for run in runs]
    return {
        "nprocs": nprocs,
        "threads": threads,
        "device": device,
        "num_samples": runs[0]["images"],
        "steps": steps,
        "batch_size": batch_size,
        "guidance_scale": guidance_scale,
        "seconds": seconds,
        "images_per_s": runs[0]["images"] / float(np.median(seconds)),
    }


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

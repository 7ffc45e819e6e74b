"""What a step costs with each sampler: the same workload, batch and step count sampled through the engine and the
eager reference, every sampler in one run.

    python -m benchmarks.sampler_cost --workload swissroll --samplers ddim,dpmpp-2m,dpmpp-3m,unipc,euler \
        --steps 50 --batch-size 1 --rounds 7 --out benchmarks/results/cpu-sampler-cost-DATE.json

A multistep table reads and rotates history buffers that DDIM's rows do not have; this measures what that costs
per step where per-step overhead matters most (the swiss-roll MLP at batch 1, whose model call is a few dozen
microseconds). The engine is the benchmark's `fastdiff-graphs` backend (`--graph-mode`, default `loop`: on a CPU
the whole loop compiled as one `torch.while_loop`; on CUDA, graphs); the reference is the `eager` backend (the
model in the sampler's diffusers scheduler loop). Each is compiled / warmed once, then timed `--rounds` times,
the samplers in rotated order each round so load changes hit them alike. Reported per sampler: median seconds a
run, milliseconds a step, the ratio of its engine step to the first sampler's (`--samplers` starts with the
baseline, ddim by default), the engine's speedup over eager and its samples against eager's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdiff.cli.arguments import positive_int
from fastdiff.engine import GRAPH_MODES
from fastdiff.samplers import SAMPLERS

from .backends import EagerBackend, FastdiffGraphsBackend
from .environment import device_info, git_revision, load_average, versions, write_json
from .harness import compare_samples, make_case, timed
from .workloads import build_workload

FORMAT = "fastdiff-sampler-cost-v1"
DEFAULT_SAMPLERS = "ddim,dpmpp-2m,dpmpp-3m,unipc,euler"


def measure(
    workload: str,
    samplers: Sequence[str],
    steps: int,
    batch: int,
    rounds: int,
    graph_mode: str = "loop",
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per sampler: engine and eager timings (seconds per run), per-step cost and the engine's samples
    against eager's. The first sampler is the baseline of `step_vs_baseline`."""
    runs: dict[tuple[str, str], list[float]] = {}
    prepared = {}
    with torch.inference_mode():
        for name in samplers:
            load = build_workload(workload, torch.device(device), steps=steps, sampler=name)
            case = make_case(load, batch, torch.float32, seed)
            engine = FastdiffGraphsBackend(load, torch.float32, graph_mode=graph_mode)
            eager = EagerBackend(load, torch.float32)
            # the first run compiles (or captures): untimed, as is one warm run of each
            samples = {
                which: backend.sample(case) for which, backend in (("engine", engine), ("eager", eager))
            }
            for backend in (engine, eager):
                backend.sample(case)
            prepared[name] = (case, {"engine": engine, "eager": eager}, samples)
        for turn in range(rounds):
            order = list(samplers[turn % len(samplers) :]) + list(samplers[: turn % len(samplers)])
            for name in order:
                case, backends, _ = prepared[name]
                for which, backend in backends.items():
                    seconds, _ = timed(lambda b=backend, c=case: b.sample(c), torch.device(device))
                    runs.setdefault((name, which), []).append(seconds)
    rows = []
    for name in samplers:
        engine_s = statistics.median(runs[(name, "engine")])
        eager_s = statistics.median(runs[(name, "eager")])
        _, _, samples = prepared[name]
        rows.append(
            {
                "sampler": name,
                "engine_s": engine_s,
                "eager_s": eager_s,
                "engine_runs_s": runs[(name, "engine")],
                "eager_runs_s": runs[(name, "eager")],
                "engine_step_ms": 1e3 * engine_s / steps,
                "eager_step_ms": 1e3 * eager_s / steps,
                "speedup_vs_eager": eager_s / engine_s,
                "numerics": compare_samples(samples["engine"], samples["eager"]),
            }
        )
    for row in rows:
        row["step_vs_baseline"] = row["engine_s"] / rows[0]["engine_s"]
        row["eager_step_vs_baseline"] = row["eager_s"] / rows[0]["eager_s"]
    return rows


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The results document: settings, where it ran and `measure`'s rows."""
    samplers = args.samplers.split(",")
    start = time.perf_counter()
    rows = measure(
        args.workload, samplers, args.steps, args.batch_size, args.rounds, args.graph_mode, args.device
    )
    return {
        "format": FORMAT,
        "settings": {
            "workload": args.workload,
            "samplers": samplers,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "graph_mode": args.graph_mode,
            "device": args.device,
        },
        "device": device_info(torch.device(args.device)),
        "versions": versions(),
        "git": git_revision(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": load_average(),
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }


def summary(doc: dict[str, Any]) -> str:
    """One line per sampler for the terminal."""
    base = doc["settings"]["samplers"][0]
    return "\n".join(
        f"{r['sampler']:<9} engine {r['engine_step_ms']:.3f} ms/step ({r['step_vs_baseline']:.2f}x {base}), "
        f"eager {r['eager_step_ms']:.3f} ms/step ({r['eager_step_vs_baseline']:.2f}x {base}), "
        f"engine {r['speedup_vs_eager']:.2f}x eager, max |engine - eager| {r['numerics']['max_abs']}"
        for r in doc["rows"]
    )


def _samplers(text: str) -> str:
    names = text.split(",")
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names of {sorted(SAMPLERS)}, got {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_cost", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="swissroll", help="a benchmark workload (default swissroll)")
    p.add_argument(
        "--samplers",
        type=_samplers,
        default=DEFAULT_SAMPLERS,
        help=f"comma list, baseline first ({DEFAULT_SAMPLERS})",
    )
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--rounds", type=positive_int, default=7, help="timed runs of each sampler and backend")
    p.add_argument("--graph-mode", choices=GRAPH_MODES, default="loop")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (atomically)")
    args = p.parse_args(argv)
    doc = report(args)
    print(summary(doc))
    if args.out is not None:
        write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

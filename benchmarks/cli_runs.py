"""Whole `fastdiff sample` commands timed as a user runs them: `--backend auto` against `--backend eager`.

    python -m benchmarks.cli_runs --rounds 4 --out benchmarks/results/cpu-cli-DATE.json

Each run is a new process (start-up, imports, model load, planning or loading the plan, sampling, writing the
file: everything the command does), timed by its wall clock. With a fresh cache folder (a temporary one unless
`--cache DIR`): one auto run first (the planning one), then `--rounds` rounds alternating eager and auto, so
load changes on the machine hit both alike. Reported: every run (its backend line as printed, wall seconds), the
medians of the later runs, their ratio (eager / auto: the speedup of a run that finds its plan cached) and the
first run's ratio to the eager median. The sample arguments default to the CLI target's command (digits, 256
samples, written as a PNG grid as the target's command does); `--args` replaces them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdiff.cli.arguments import positive_int

from .environment import device_info, git_revision, load_average, versions, write_json

DEFAULT_ARGS = "--model digits --num-samples 256"
FORMAT = "fastdiff-cli-runs-v1"


def run_once(sample_args: Sequence[str], backend: str, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """One `fastdiff sample ... --backend B` process: its wall seconds and the backend line it printed."""
    command = [sys.executable, "-m", "fastdiff", "sample", *sample_args, "--backend", backend]
    command += ["--out", str(out), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("backend:")), None)
    return {"backend": backend, "wall_s": round(seconds, 3), "line": line}


def measure(sample_args: Sequence[str], rounds: int, cache: Path, workdir: Path) -> dict[str, Any]:
    """The first auto run, then `rounds` of eager and auto alternated, all with `cache` as FASTDIFF_CACHE."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    env = {
        k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"
    }  # inductor's under the cache
    env["FASTDIFF_CACHE"] = str(cache)
    out = workdir / "out.png"
    runs = [{**run_once(sample_args, "auto", out, env), "round": 0}]
    for r in range(1, rounds + 1):
        for backend in ("eager", "auto") if r % 2 else ("auto", "eager"):
            runs.append({**run_once(sample_args, backend, out, env), "round": r})
    later = {
        b: [x["wall_s"] for x in runs if x["backend"] == b and x["round"] > 0] for b in ("eager", "auto")
    }
    eager, auto = (statistics.median(later[b]) for b in ("eager", "auto"))
    return {
        "runs": runs,
        "eager_median_s": eager,
        "auto_median_s": auto,
        "speedup_cached": round(eager / auto, 3),
        "first_auto_s": runs[0]["wall_s"],
        "first_vs_eager": round(eager / runs[0]["wall_s"], 3),
    }


def report(sample_args: Sequence[str], rounds: int, cache: Path | None) -> dict[str, Any]:
    """The results document: what ran, where, and `measure`'s numbers."""
    with tempfile.TemporaryDirectory(prefix="fastdiff-cli-runs-") as tmp:
        folder = cache if cache is not None else Path(tmp) / "cache"
        result = measure(sample_args, rounds, folder, Path(tmp))
    return {
        "format": FORMAT,
        "command": "fastdiff sample " + " ".join(sample_args) + " --backend {auto|eager} --out OUT --quiet",
        "rounds": rounds,
        "fresh_cache": cache is None,
        "device": device_info(torch.device("cpu")),
        "versions": versions(),
        "git": git_revision(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": load_average(),
        **result,
    }


def summary(doc: dict[str, Any]) -> str:
    """A few lines for the terminal: each run, then the medians and ratios."""
    lines = [
        f"{r['round']:>2} {r['backend']:<5} {r['wall_s']:7.2f} s  {r['line'] or ''}" for r in doc["runs"]
    ]
    lines.append(
        f"eager median {doc['eager_median_s']:.2f} s, auto median {doc['auto_median_s']:.2f} s: "
        f"{doc['speedup_cached']:.2f}x with the plan cached; first auto run {doc['first_auto_s']:.2f} s "
        f"({doc['first_vs_eager']:.2f}x eager)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_runs", description=__doc__.splitlines()[0])
    p.add_argument("--args", default=DEFAULT_ARGS, help=f"the sample arguments (default: {DEFAULT_ARGS!r})")
    p.add_argument(
        "--rounds", type=positive_int, default=4, help="eager/auto rounds after the first auto run"
    )
    p.add_argument("--cache", type=Path, default=None, help="FASTDIFF_CACHE to use (default: a fresh one)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (atomically)")
    args = p.parse_args(argv)
    doc = report(args.args.split(), args.rounds, args.cache)
    print(summary(doc))
    if args.out is not None:
        write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

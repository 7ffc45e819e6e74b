"""Where a benchmark ran: device, driver, library versions, git revision and machine load, for the results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastdiff.engine.candidates import package_version
from fastdiff.engine.planner import cpu_model
from fastdiff.output import write_bytes_atomic

PACKAGES = (
    "fastdiff",
    "torch",
    "triton",
    "onnx",
    "onnxruntime",
    "openvino",
    "tensorrt",
    "diffusers",
    "numpy",
)
# Environment variables that change what is measured (threads, interpreter, compile caches).
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_CACHE_DIR",
)


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None: not installed), plus Python and CUDA."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    found.update({name: package_version(name) for name in PACKAGES})
    found["cuda"] = torch.version.cuda
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return found


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_info(device: torch.device) -> dict[str, Any]:
    """Type, name, driver and CUDA version of `device`, the CPU threads torch uses and the settings in `ENV_VARS`."""
    info: dict[str, Any] = {
        "type": device.type,
        "name": device_name(device),
        "driver": None,
        "cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            driver=_nvidia_driver(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


def git_revision(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """{"sha", "dirty"} of the git checkout holding `path` (default: this file), or None outside one."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status)}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work skews CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Write a results document as indented JSON (atomically: a reader never sees half a file) and say where."""
    write_bytes_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    print(f"wrote {path}")

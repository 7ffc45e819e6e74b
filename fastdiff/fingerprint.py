"""Content hashes of tensors and of a model's weights (checkpoint verification, shard-folder settings)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from os import PathLike

import torch


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over the dtype, shape and bytes of each tensor, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every tensor's name and `tensor_sha256`, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_sha256(state[name]).encode())
    return h.hexdigest()


def file_sha256(path: str | PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

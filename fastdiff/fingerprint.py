"""Content hashes of tensors and of a model's weights (checkpoint verification, shard-folder settings), and the
cheap content checksum that tells an exported graph's weights from its source module's once per sampling run."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
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


def weights_checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A cheap checksum of weights' content: each tensor's sum, accumulated and returned in float32, stacked
    (one read of each tensor, on its own device; no copy to the host).

    A sum moves to first order with every element, so a new fine-tune, a merged LoRA or a rescale changes it
    even when the change is small and orthogonal to the weights (to which a norm is blind in float32); values
    permuted within a tensor are not seen. It costs about what `torch._foreach_norm` does (one pass).
    Float sums may differ in their last bits between thread counts or devices: a mismatch is a hint, to be
    confirmed with `state_sha256`.
    """
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors]
    if len({s.device for s in sums}) > 1:
        sums = [s.cpu() for s in sums]
    return torch.stack(sums) if sums else torch.zeros(0)


def file_sha256(path: str | PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

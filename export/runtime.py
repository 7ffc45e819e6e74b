"""What every exported-graph runtime shares: the denoiser signature, input checks and the null class label.

An exported denoiser (ONNX, OpenVINO IR, TensorRT engine) takes `sample` (B, C, H, W), `timestep` (B,) and the
conditioning inputs in a fixed order, and returns one output `eps`. The runners turn `denoiser(x, t, **cond)` on
torch tensors into validated feeds for those inputs (`denoiser_feeds`) and share the `GraphDenoiser` base.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.engine.weights import WeightsState, WeightsWatch, wrapped_module
from fastdiff.errors import CheckpointError, StaleWeightsError
from fastdiff.fingerprint import file_sha256, state_sha256
from fastdiff.guidance import null_class_cond
from fastdiff.output import write_bytes_atomic

RESERVED = ("sample", "timestep")
# Keys the exporters store beside the graph (ONNX metadata_props, OpenVINO rt_info under "fastdiff").
META_PREFIX = "fastdiff."


def sidecar_path(path: str | os.PathLike) -> Path:
    """The hash sidecar of an exported file: `model.onnx` -> `model.onnx.sha256` (the `sha256sum` format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def publish(files: Sequence[Path], path: Path) -> int:
    """Move the finished `files` (the one named like `path` last, so it appears complete) into `path`'s folder and
    write the sha256 sidecar of `path` listing them all; returns their total size in bytes."""
    size = sum(f.stat().st_size for f in files)
    listing = "".join(f"{file_sha256(f)}  {f.name}\n" for f in files)
    # An old sidecar must not outlive the files it describes: gone first, the new one written last.
    sidecar_path(path).unlink(missing_ok=True)
    for f in files:
        os.replace(f, path.parent / f.name)
    write_bytes_atomic(sidecar_path(path), listing.encode())
    return size


def verify_sidecar(path: str | os.PathLike) -> bool:
    """Check every file listed in `path`'s sidecar against its sha256 (CheckpointError naming a corrupt or missing
    one); False when there is no sidecar (a file exported elsewhere), True when all match."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return False
    for line in sidecar.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or Path(name).name != name:
            raise CheckpointError(f"{sidecar} is not a sha256 listing (line {line[:80]!r})")
        file = path.parent / name
        if not file.is_file():
            raise CheckpointError(f"{file}, listed in {sidecar}, is missing")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{file} is corrupt: its sha256 does not match {sidecar}")
    return True


@dataclass(frozen=True)
class Port:
    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]  # None for a dynamic axis


def check_input(port_name: str, value: torch.Tensor, dtype: torch.dtype, shape: Sequence[int | None]) -> None:
    """ValueError naming the input when `value` does not have `dtype` and `shape` (None: any size)."""
    if value.dtype != dtype:
        raise ValueError(f"input {port_name!r} must have dtype {dtype}, got {value.dtype}")
    if value.dim() != len(shape) or any(
        d is not None and d != s for d, s in zip(shape, value.shape, strict=True)
    ):
        want = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise ValueError(f"input {port_name!r} must have shape {want}, got {tuple(value.shape)}")


def denoiser_feeds(
    x: torch.Tensor,
    t: torch.Tensor | float,
    cond: Mapping[str, Any],
    inputs: Sequence[Port],
    null_label: int | None,
) -> dict[str, torch.Tensor]:
    """Validated, typed tensors for every graph input, on x's device (shared by the ONNX and TensorRT runners).

    `t` may be a number, a 0-d / 1-element tensor or (B,): it is broadcast and cast to the graph's timestep dtype.
    Integer conditioning (class labels) of any integer dtype is cast; float inputs must match the graph's dtype.
    A missing `class_labels` means the null label when the model has one.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    by_name = {p.name: p for p in inputs}
    unknown = sorted(set(cond) - set(by_name) - set(RESERVED))
    if unknown or set(RESERVED) & set(cond):
        raise ValueError(
            f"unexpected conditioning input(s) {unknown or sorted(set(RESERVED) & set(cond))}; "
            f"this graph takes {[p.name for p in inputs[2:]]}"
        )
    sample, timestep = by_name["sample"], by_name["timestep"]
    check_input("sample", x, sample.dtype, sample.shape)
    batch = x.shape[0]
    if sample.shape[0] is not None and sample.shape[0] != batch:
        raise ValueError(
            f"input 'sample' must have batch {sample.shape[0]} (static batch graph), got {batch}"
        )
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"input 'timestep' must be a number or have shape ({batch},), got {tuple(t.shape)}"
            )
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.full((batch,), float(t))
    else:
        raise TypeError(f"t must be a tensor or a number, got {type(t).__name__}")
    feeds = {"sample": x, "timestep": t.to(x.device, timestep.dtype)}
    for port in inputs[2:]:
        value = cond.get(port.name)
        if value is None and port.name == "class_labels" and null_label is not None:
            value = torch.full((batch,), null_label, dtype=torch.int64)
        if value is None:
            raise ValueError(f"missing conditioning input {port.name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {port.name!r} must be a torch.Tensor, got {type(value).__name__}")
        if not port.dtype.is_floating_point:
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"input {port.name!r} must be an integer tensor, got {value.dtype}")
            value = value.to(port.dtype)
        check_input(port.name, value, port.dtype, (batch, *port.shape[1:]))
        feeds[port.name] = value.to(x.device)
    return feeds


def check_signature(path: os.PathLike, what: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> None:
    """CheckpointError unless the graph takes (sample, timestep, *cond) and returns one output."""
    if [p.name for p in inputs[:2]] != list(RESERVED) or len(outputs) != 1:
        raise CheckpointError(
            f"{path} is not a denoiser {what}: expected inputs (sample, timestep, *cond) and one output, "
            f"got inputs {[p.name for p in inputs]} and {len(outputs)} outputs"
        )


class GraphDenoiser:
    """What the ONNX, OpenVINO and TensorRT denoisers share: ports (sample, timestep, *cond), the metadata the
    exporter stored, the null class label, and the module the graph was exported from, when given (`source`),
    whose weights every call checks.

    An exported graph holds a copy of the weights. With `source`, a change of the source's weights raises
    `StaleWeightsError` naming the call that makes the graph right again (`_stale_fix`), before any output is
    computed from the old copy; without it, the denoiser cannot know. Two checks, each confirmed by the full
    digest (so a rewrite of the same values is no change):

    - every call made outside a sampling run (`check_source`): the `fastdiff.engine.weights` fingerprint (layout
      and version counters), which sees `load_state_dict`, `fastdiff.update_weights`, `copy_` under no_grad, new
      parameters and casts, and a few bytes of every CPU weight (`WeightsWatch.sampled`), which see a
      `param.data` write (no version counter records it) that changes any of them, as new weights, a merged
      LoRA or a rescale do (inside `fastdiff.sample` and the engine no user code runs between calls but
      callbacks, after which the run checks again: `fastdiff.checks.denoiser_run`);
    - once per sampling run (`check_weights`, called by `fastdiff.sample`, the loops built on it and
      `SamplingEngine.sample`): also a content checksum of every weight (`WeightsWatch.checksum`) against the one
      taken when the source was bound, which sees any `param.data` write. So a direct call misses only a
      `param.data` write confined to elements the sample does not read, or to CUDA weights: call
      `check_weights()` first to rule that out.
    """

    inputs: list[Port]
    null_label: int | None
    _no_null_label = "this graph has no null class label (exported from a model without one)"
    _watch: WeightsWatch | None = None
    _runs: threading.local  # set per instance in _bind_source
    _stale_fix = (
        "re-export it: fastdiff.export.to_onnx(model, path, ...), then OnnxDenoiser(path, source=model)"
    )

    def _read_metadata(self, metadata: Mapping[str, str]) -> None:
        """Keep `metadata` and take the class count and null class label from it (absent: None)."""
        self.metadata = dict(metadata)
        null = self.metadata.get(META_PREFIX + "null_class_label")
        self.null_label = int(null) if null is not None else None
        n = self.metadata.get(META_PREFIX + "num_classes")
        self.num_classes = int(n) if n is not None else None

    @property
    def cond_names(self) -> list[str]:
        """Names of the conditioning inputs, in graph order."""
        return [p.name for p in self.inputs[2:]]

    @property
    def null_cond(self):
        """`null_cond(cond)` for classifier-free guidance; only with a null class label."""
        if self.null_label is None:
            raise AttributeError(self._no_null_label)
        return self._null_cond

    def _null_cond(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        return null_class_cond(cond, self.null_label)

    def _bind_source(self, source: nn.Module | None, digest: str | None) -> None:
        """Watch `source` (None: nothing). `digest`: the weights the graph holds, when its file says."""
        self._runs = threading.local()
        if source is None:
            return
        module = wrapped_module(source)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"source must be the nn.Module the graph was exported from, got {type(source).__name__}"
            )
        self._watch = WeightsWatch(module)
        self._digest = state_sha256(module.state_dict())
        if digest is not None and digest != self._digest:
            raise StaleWeightsError(
                f"{self.path} was exported from other weights than source's; {self._stale_fix}"
            )
        self._state = self._watch.state()
        self._checksum = self._watch.checksum()
        self._sampled = self._watch.sampled()

    def check_source(self, *, full: bool = False) -> None:
        """Raise `StaleWeightsError` if the source's fingerprint or sampled content changed and its weights differ
        from those in the graph (a no-op without a source). `full` compares the digest even when neither saw a
        change."""
        if self._watch is None:
            return
        state = self._watch.state()
        if state != self._state or full or not torch.equal(self._watch.sampled(), self._sampled):
            self._confirm(state)

    def check_weights(self) -> None:
        """`check_source`, and a checksum of the source's weights' content, which also sees writes no fingerprint
        sees (`param.data.copy_`): what a sampling run calls once before its first step (a no-op without a
        source)."""
        if self._watch is None:
            return
        state = self._watch.state()
        if state != self._state or not torch.equal(self._watch.checksum(), self._checksum):
            self._confirm(state)

    def _fastdiff_check_weights(self) -> None:  # what every sampling run calls (fastdiff.checks)
        self.check_weights()

    @contextlib.contextmanager
    def _fastdiff_run(self) -> Iterator[None]:
        """Within a sampling run (`fastdiff.checks.denoiser_run`, in this thread) calls skip `check_source`."""
        self._runs.depth = getattr(self._runs, "depth", 0) + 1
        try:
            yield
        finally:
            self._runs.depth -= 1

    def _check_call(self) -> None:
        """What every call checks first: `check_source`, unless a sampling run checked the weights already."""
        if not getattr(self._runs, "depth", 0):
            self.check_source()

    def _confirm(self, state: WeightsState, digest: str | None = None) -> None:
        """The full digest (`digest`: the source's, when just computed) decides: StaleWeightsError if the weights
        changed, else `state` is the new normal."""
        if digest is None:
            digest = state_sha256(self._watch.module.state_dict())
        if digest != self._digest:
            raise StaleWeightsError(
                f"the weights of the module {self.path} was exported from have changed; {self._stale_fix}"
            )
        self._state = state
        self._checksum = self._watch.checksum()
        self._sampled = self._watch.sampled()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """An exported graph cannot take new weights in place: raises `StaleWeightsError` saying what to call."""
        raise StaleWeightsError(f"{type(self).__name__} holds its own copy of the weights; {self._stale_fix}")

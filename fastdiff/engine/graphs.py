"""CUDA-graph capture and replay, and the LRU cache of captured graphs: used by `SamplingEngine` and by the
diffusers U-Net replayer (`fastdiff.integrations.diffusers.graph_unet`).

A runner captures a function once and replays it: `CudaGraphRunner` on CUDA, `EagerRunner` (no capture: the
function itself runs on every replay) elsewhere or after a failed capture. Callers name their runner class in a
class attribute (`_graph_runner`, with the device type it captures on in `_graph_device`), so that tests substitute
a CPU fake with the same contract and run the cache, buffer and fallback logic without a GPU.

Runner contract: `runner(step, body, reset)` captures `body` (raising `CaptureError` when that fails; errors of an
eager warm-up step propagate as they are), `replay()` runs it and returns its outputs, and `captures` says whether
anything was captured.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, ValuesView
from typing import Any, Generic, TypeVar

import torch

V = TypeVar("V")


class CaptureError(RuntimeError):
    """A runner could not capture the step (as opposed to the step itself failing when run eagerly)."""


class EagerRunner:
    """Runs the step function itself on every replay: the path without graphs (CPU, or after a failed capture)."""

    captures = False

    def __init__(self, step: Callable[[], Any], body: Callable[[], Any], reset: Callable[[], None]) -> None:
        self._step = step

    def replay(self) -> Any:
        """Run the step."""
        return self._step()


class CudaGraphRunner:
    """Warms `step` up on a side stream, then captures `body` (one step or the whole loop) as one CUDA graph.

    `reset` zeroes the step counter before each warm-up step and before the capture, so that warm-up never reads
    past the table. Each runner owns its graph's private memory pool, freed with the runner (on cache eviction).
    """

    captures = True
    warmup_steps = 2

    def __init__(self, step: Callable[[], Any], body: Callable[[], Any], reset: Callable[[], None]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Lazy initialisation (cuBLAS handles, Triton and torch.compile compilation) must happen outside capture.
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_steps):
                reset()
                step()
        torch.cuda.current_stream().wait_stream(stream)
        reset()
        self._graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self._graph):
                self._outputs = body()
        except Exception as err:
            raise CaptureError(f"{type(err).__name__}: {err}") from err

    def replay(self) -> Any:
        """Replay the captured graph; returns the outputs `body` returned during capture (static buffers)."""
        self._graph.replay()
        return self._outputs


class GraphCache(Generic[V]):
    """The least recently used captures by key. `put` evicts beyond the size it is given (the owner's current
    `max_graphs`) and calls `on_evict(value)` for each value evicted: a runner that its value refers back to must
    be dropped there, so that the graph's memory is freed now, not at the next garbage collection."""

    def __init__(self, on_evict: Callable[[V], None] | None = None) -> None:
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first."""
        return iter(self._entries)

    def values(self) -> ValuesView[V]:
        """The values, least recently used first."""
        return self._entries.values()

    def get(self, key: Hashable) -> V | None:
        """The value of `key`, now the most recently used; None on a miss."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V, max_size: int) -> None:
        """Insert `value` as the most recently used, evicting the least recently used beyond `max_size`."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > max_size:
            _, evicted = self._entries.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(evicted)

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """File the value of `old` under `new` (kept as it is when `new` already has a value), without eviction."""
        value = self._entries.pop(old)
        self._entries.setdefault(new, value)


def copy_leaves(buffers: list[Any], leaves: list[Any]) -> None:
    """Copy a call's flattened inputs into the static buffers of its key (constants are part of the key)."""
    for buf, leaf in zip(buffers, leaves, strict=True):
        if isinstance(buf, torch.Tensor):
            buf.copy_(leaf)


def leaf_key(name: str, leaf: Any) -> Any:
    """The part of a cache key that one flattened input contributes: a tensor's shape, dtype and device, or a
    constant's value (which a graph bakes in; TypeError naming `name` when it is not hashable)."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        raise TypeError(
            f"{name} values must be tensors, None or hashable constants (a graph bakes them in), "
            f"got {type(leaf).__name__}"
        ) from None
    return ("const", type(leaf), leaf)

"""Which implementation of a fused op runs: the Triton kernel or the plain PyTorch reference."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from fastdiff.errors import BackendUnavailableError

BACKENDS = ("auto", "triton", "torch")

# Process-wide rather than thread-local: torch.compile reads a module global with a guard, without a graph break.
_decomposed = False
# SM count that launches on the meta device plan for, inside `simulated_gpu` (the static compile report).
_simulated_sm_count: int | None = None


@functools.cache
def triton_importable() -> bool:
    """True when the `triton` package imports."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1, which lets Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of `device` in this process."""
    # The device first: a CPU tensor without the interpreter never needs Triton imported (about 0.3 s).
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return triton_importable()
    return False


def check_backend(backend: str) -> None:
    """ValueError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `backend` ("auto", "triton", "torch") to the one that runs for tensors on `device`."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    runs = triton_runs_on(device)
    if backend == "triton" and not runs:
        if not triton_importable():
            why = 'triton is not installed (pip install "fastdiff[triton]")'
        elif device.type == "cpu":
            why = "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        else:
            why = f"Triton has no backend for device {device}"
        raise BackendUnavailableError(f"backend='triton' cannot run here: {why}")
    return "triton" if runs else "torch"


def decomposing() -> bool:
    """True inside `decomposed()`: the public fused-op wrappers run their `*_reference` twins."""
    return _decomposed


@contextlib.contextmanager
def decomposed() -> Iterator[None]:
    """Within this block the public wrappers (`group_norm_silu`, `attention`, `sampler_step`) skip their custom op
    and call the plain-PyTorch reference directly, whatever their `backend=` says (it must still be a valid name).

    Tracers that cannot look inside a `fastdiff::` custom op (the ONNX exporters, torch.jit.trace) then record
    standard aten ops (group_norm, matmul, softmax, ...): `fastdiff.export.to_onnx` traces inside it. The switch is
    process-wide; other threads computing meanwhile get the reference's numbers too.
    """
    global _decomposed
    previous, _decomposed = _decomposed, True
    try:
        yield
    finally:
        _decomposed = previous


def available() -> dict[str, object]:
    """What can run here: triton installed, CUDA present, interpreter on, and the backend `auto` picks per device."""
    cuda = torch.cuda.is_available()
    info: dict[str, object] = {
        "triton_installed": triton_importable(),
        "cuda": cuda,
        "triton_interpreter": interpreter_enabled(),
        "auto_backend_cpu": resolve_backend("auto", torch.device("cpu")),
    }
    if cuda:
        info["auto_backend_cuda"] = resolve_backend("auto", torch.device("cuda"))
    return info


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int | None:
    """Streaming multiprocessors that a launch on `device` spreads over: the GPU's count on CUDA, the simulated
    count on the meta device inside `simulated_gpu`, None elsewhere (the CPU interpreter runs programs one by one)."""
    if device.type == "cuda":
        return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)
    if device.type == "meta":
        return _simulated_sm_count
    return None


@contextlib.contextmanager
def simulated_gpu(sm_count: int) -> Iterator[None]:
    """Within this block the kernel wrappers plan launches on meta tensors as for a GPU of `sm_count` SMs, so that
    `fastdiff.benchmarks.kernels_static` can record the exact launch a real GPU would get, without one."""
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    global _simulated_sm_count
    previous, _simulated_sm_count = _simulated_sm_count, sm_count
    try:
        yield
    finally:
        _simulated_sm_count = previous


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The dense layout a kernel works in and returns: channels-last when x is (and not also contiguous)."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call(*tensors: torch.Tensor | None) -> bool:
    """Whether an op wrapper may run its body directly instead of through its `torch.library` custom op: plain
    tensors in eager execution that no gradient flows through. The custom op is what torch.compile, torch.export,
    jit tracing, fake tensors and autograd need; in plain eager it only adds the dispatcher, and its first call in a
    process imports torch._dynamo (1.7 s of a `fastdiff sample` run here)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN and not (grad and t.requires_grad)) for t in tensors)

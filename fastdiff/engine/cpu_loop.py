"""The engine's compiled path off CUDA: one step, or the whole loop as one `torch.while_loop`, compiled by inductor.

Compiling the whole loop removes the per-call cost a small model is bound by (swiss-roll MLP, batch 1, DDPM 1000
on 2 cores: 0.04 ms a step against 0.14 ms replaying a compiled step). `graph_mode="auto"` times the first
compiled steps (`AUTO_TIMED_STEPS`) and switches to the loop when they are quick (`choose_mode`).
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from fastdiff.kernels.backend import decomposed

# graph_mode="auto" with the CPU compile: steps compiled one at a time are timed (after the first, which compiles)
# for this many steps, and the rest of the loop runs as one compiled while_loop when a step took less than
# LOOP_BELOW_SECONDS. The while_loop saves the ~0.1 ms per-call cost of a compiled step, which matters for small
# models (swiss-roll MLP, batch 1: 0.14 ms a step as steps, 0.04 ms in the loop) and not for large ones, where
# it costs twice the compile time and ran ~5% slower (digits U-Net, batch 64, 37 ms a step).
# Five, and their median: with two, the slower one decided, and a step still paying a one-off cost after the
# compile sent the swiss-roll MLP (0.3 ms a compiled step) down the step path in a benchmark run (1.28x eager
# against 6.3x in the loop).
AUTO_TIMED_STEPS = 5
LOOP_BELOW_SECONDS = 1e-3

# A function of the carried (step counter, x, history, xs) -> (the next x, history, xs), None where absent.
Advance = Callable[
    [torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
    tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
]


def _call_decomposed(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    # Inside decomposed() our fused ops trace as their plain-PyTorch references, which inductor fuses with their
    # neighbours; opaque custom ops it cannot. On CPU the custom ops run those same references, so only speed
    # changes: the compiled digits U-Net (batch 128, one thread) took 160 ms a call this way against 191 ms
    # compiled with the custom ops and 200 ms eager. Inductor's freezing gained nothing measurable in the
    # engine (DDIM 50 steps, digits, batch 64 with CFG: 7.79 s against 7.82 s) and would fold the weights into
    # the compiled code, so it is left off.
    with decomposed():
        return fn(*args, **kwargs)


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a step or the while_loop) compiled by inductor with its C++ wrapper, traced inside
    `fastdiff.kernels.backend.decomposed()`. torch.compile is lazy: nothing compiles before the first call."""
    # The C++ wrapper removes most of what is left of the per-call Python (0.21 s against 0.29 s in one run of
    # the swiss-roll MLP, batch 1, DDPM 1000, on 2 cores) for a longer first compile.
    options = {"cpp_wrapper": True}

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return functools.partial(_call_decomposed, torch.compile(_own_code(call), dynamic=False, options=options))


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of function `fn` (closure included) with a code object of its own."""
    # Dynamo keeps its compiled variants, and counts them against torch's recompile limit (8), per code object of
    # the frame it compiles: every engine entry compiled one shared frame (torch's own wrapper of a partial), so
    # past eight table structures and shapes in a process the rest ran uncompiled (five samplers benchmarked in
    # one process reached it). A code object per compiled entry gives each its own budget, freed with the entry.
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__qualname__ = fn.__qualname__
    return copy


def while_loop(
    advance: Advance,
    num_steps: int,
    counter: torch.Tensor,
    x: torch.Tensor,
    history: torch.Tensor | None,
    xs: torch.Tensor | None,
) -> None:
    """The steps from `counter` to `num_steps` as one `torch.while_loop`: functional steps over a carried
    (counter, x, history, xs), written back into those buffers once at the end (so a loop that fails to compile
    leaves them as they were)."""
    has_h, has_xs = history is not None, xs is not None

    def cond(i: torch.Tensor, x: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        return i < num_steps

    def body(i: torch.Tensor, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = state[0] if has_h else None
        s = state[-1] if has_xs else None
        x_next, h, s = advance(i, x, h, s)
        return (i + 1, x_next, *(b for b in (h, s) if b is not None))

    buffers = [b for b in (history, xs) if b is not None]
    i, x_last, *state = torch.while_loop(
        cond, body, (counter.clone(), x.clone(), *(b.clone() for b in buffers))
    )
    x.copy_(x_last)
    counter.copy_(i)
    for buf, value in zip(buffers, state, strict=True):
        buf.copy_(value)


def run_compiled_loop(loop: Callable[[], None], verified: bool) -> str | None:
    """Run the compiled while_loop; None when it ran, else why it could not compile (one line).

    Once the loop has run (`verified`), an error is the denoiser's own and is raised. Before that any failure
    counts as a failure to compile: the caller goes on step by step, whose step raises a genuine error again.
    """
    try:
        loop()
    except Exception as err:  # any failure to compile the loop; the step path re-raises genuine errors
        if verified:
            raise
        first_line = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {first_line}"
    return None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of `fn()`: host time, which is the step's time on the CPU the auto mode serves."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def choose_mode(seconds: list[float]) -> str:
    """graph_mode="auto" on the CPU compile: "loop" when the median compiled step took under
    `LOOP_BELOW_SECONDS`, else "step"."""
    return "loop" if sorted(seconds)[len(seconds) // 2] < LOOP_BELOW_SECONDS else "step"

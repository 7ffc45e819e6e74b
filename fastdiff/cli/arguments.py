"""Argument types shared by the subcommands: numbers checked by argparse, so that a bad one is a usage error."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# The largest finite float32 (the dtype the sampling loop computes in), without importing torch to parse.
FLOAT32_MAX = (2 - 2**-23) * 2.0**127
# The largest seed torch.Generator.manual_seed takes (an int64).
MAX_SEED = 2**63 - 1


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """The type of an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high:.3g}], got {text}")
        return value

    return parse


def finite_float(text: str) -> float:
    """A float that is finite in float32 (the dtype the sampling loop computes in)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not abs(value) <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number within float32's range, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63 - 1] (what torch.Generator.manual_seed takes)."""
    return bounded_int(0, MAX_SEED)(text)


def guidance_scale(text: str) -> float:
    """A classifier-free guidance scale: a number in [-MAX_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE] (fastdiff.guidance)."""
    from fastdiff.guidance import MAX_GUIDANCE_SCALE

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not abs(value) <= MAX_GUIDANCE_SCALE:
        raise argparse.ArgumentTypeError(
            f"must be a number in [-{MAX_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}] (pipelines use 1 to about 30), "
            f"got {text}"
        )
    return value

"""The `fastdiff` command line (also `python -m fastdiff`): sample, merge, train, export, bench, info.

One module per subcommand, each with `add_parser(sub)` and its command function. Parsing stays cheap: the modules
import argparse-level things only, the command functions import what they run, and a subcommand whose options
name what only its own code knows (the benchmark's workloads and backends) adds them when it is the one parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fastdiff.cli import bench, export, info, merge, sample, train
from fastdiff.errors import FastdiffError

# Errors that are the user's to fix: one line on stderr and exit code 2, never a traceback. OSError covers the
# file system's refusals (disk full, a name too long, a folder where a file should be); its message names the path.
USER_ERRORS = (ValueError, TypeError, OSError, FastdiffError, ImportError)


def out_of_memory(err: BaseException) -> str | None:
    """One line for an allocation that failed (torch's CPU allocator, a CUDA out-of-memory, Python's MemoryError),
    else None: the model, batch or image size asks for more memory than there is, which the user can change."""
    import re

    text = str(err)
    cpu = "can't allocate memory" in text
    if not (cpu or isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"):
        return None
    asked = re.search(r"(?:tried to allocate|Tried to allocate) ([\d.]+) ?(bytes|[KMGT]iB)", text)
    size = ""
    if asked:
        amount, unit = float(asked.group(1)), asked.group(2)
        if unit == "bytes":
            amount, unit = amount / 2**30, "GiB"
        size = f" (an allocation of {amount:,.1f} {unit} failed)"
    return (
        f"out of memory{size}: the model, image size or --batch-size needs more memory than this machine has; "
        "try a smaller --batch-size (or a smaller model)"
    )


class LazyParser(argparse.ArgumentParser):
    """A subcommand's parser that calls `populate(self)` to add its arguments the first time it parses."""

    def __init__(
        self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast diffusion-model sampling.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    for command in (sample, train, info, export, bench, merge):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastdiff` console script and `python -m fastdiff`."""
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("fastdiff: error: --device cuda: no CUDA GPU is available", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"fastdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        line = out_of_memory(err)
        if line is None:
            raise
        print(f"fastdiff {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130

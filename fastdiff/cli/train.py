"""`fastdiff train`: train the preset model of a dataset (L_simple, EMA) and write its checkpoint."""

from __future__ import annotations

import argparse
import time

from fastdiff.cli.arguments import positive_int, seed


def cmd_train(args: argparse.Namespace) -> int:
    """Train the preset model of a dataset and write its EMA checkpoint."""
    from fastdiff.train import train_dataset

    start = time.perf_counter()
    result = train_dataset(args.dataset, args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    tail = result.losses[-100:]
    print(
        f"trained {args.dataset} for {len(result.losses)} steps in {time.perf_counter() - start:.0f} s, "
        f"final loss {sum(tail) / len(tail):.4f} -> {args.out}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `fastdiff train`."""
    p = sub.add_parser("train", help="train the preset model of a dataset (L_simple, EMA)")
    p.add_argument("--dataset", choices=("digits", "swissroll"), default="digits")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=0, help="in [0, 2**63 - 1]")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

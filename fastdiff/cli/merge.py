"""`fastdiff merge DIR --out samples.npz`: one .npz from the shards of `fastdiff sample --out DIR/`."""

from __future__ import annotations

import argparse


def cmd_merge(args: argparse.Namespace) -> int:
    """`fastdiff merge DIR --out samples.npz`."""
    from pathlib import Path

    from fastdiff.distributed import merge, read_manifest

    path = merge(args.dir, args.out)
    print(f"merged {read_manifest(Path(args.dir))['num_samples']} images -> {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `fastdiff merge`."""
    p = sub.add_parser("merge", help="merge a shard folder into one .npz (keys images, arr_0, labels)")
    p.add_argument("dir", help="shard folder written by `fastdiff sample --out DIR/`")
    p.add_argument("--out", required=True, help="merged .npz file")
    p.set_defaults(func=cmd_merge)

"""`fastdiff sample`: generate images with a shipped or trained model into a PNG grid, an .npz or a shard folder."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastdiff.cli.arguments import bounded_int, finite_float, guidance_scale, positive_int, seed
from fastdiff.errors import FastdiffError
from fastdiff.output import MAX_SAMPLES

if TYPE_CHECKING:
    import torch

    from fastdiff.pretrained import Pretrained
    from fastdiff.samplers import Sampler

# Upper bounds of the sampling arguments, checked before anything is allocated (and stated in --help).
# A .png or .npz output holds every sample in memory (float32) before it is written; beyond this, use DIR/.
MAX_FILE_BYTES = 4 << 30


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_sample_args(args: argparse.Namespace) -> None:
    """Checks of `fastdiff sample`'s arguments that need no model: run before anything is loaded."""
    if not 0 <= args.eta <= 1 and not args.allow_large_eta:
        raise ValueError(
            f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta:g}; "
            "pass --allow-large-eta to use a larger one"
        )
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta:g}")


def guidance_scale_for(pre: Pretrained, requested: float | None) -> float:
    """--guidance-scale: default 2 for class-conditional models, 1 (off) otherwise; refused without classes."""
    if pre.num_classes is None:
        if requested not in (None, 1.0):
            raise ValueError("--guidance-scale needs a class-conditional model")
        return 1.0
    return 2.0 if requested is None else requested


def _labels(pre: Pretrained, args: argparse.Namespace) -> torch.Tensor | None:
    import torch

    if pre.num_classes is None:
        if args.class_label is not None:
            raise ValueError("--class-label: this model is not class-conditional")
        return None
    if args.class_label is None:
        return torch.arange(args.num_samples) % pre.num_classes
    if not 0 <= args.class_label < pre.num_classes:
        raise ValueError(f"--class-label must be in [0, {pre.num_classes - 1}], got {args.class_label}")
    return torch.full((args.num_samples,), args.class_label)


DTYPES = ("float32", "bfloat16", "float16")


def sample_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype as a torch dtype; float16 is refused on a CPU (which runs its convolutions slowly, if at all)."""
    import torch

    if args.dtype == "float16" and args.device == "cpu":
        raise ValueError("--dtype float16 needs --device cuda; on a CPU use --dtype bfloat16 (or float32)")
    return getattr(torch, args.dtype)


def _load_x_T(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np
    import torch

    if Path(path).is_dir():
        raise ValueError(f"--x-T {path!r} is a folder, expected a .npy file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--x-T file {path!r} does not exist")
    try:
        # Memory-mapped: the shape and dtype are checked before any data is read.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FastdiffError(f"--x-T: {path} is not a readable .npy file: {err or 'empty file'}") from err
    if not isinstance(array, np.ndarray):
        raise FastdiffError(f"--x-T: {path} is an .npz archive, expected one array in a .npy file")
    if array.dtype.kind != "f":
        raise TypeError(f"--x-T holds {array.dtype} values, expected real floating point (float16/32/64)")
    if tuple(array.shape) != shape:
        raise ValueError(f"--x-T has shape {tuple(array.shape)}, expected {shape}")
    x = torch.from_numpy(np.array(array, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise ValueError("--x-T contains NaN or infinite values (or values beyond float32's range)")
    return x


def _sampler(args: argparse.Namespace, pre: Pretrained) -> Sampler:
    """The sampler the flags ask for on the model's schedule; a refusal names the flag (--steps, --eta, --sampler)."""
    from fastdiff.errors import OptionError
    from fastdiff.samplers import SAMPLERS, build_sampler

    try:
        return build_sampler(
            args.sampler, pre.schedule, args.steps, eta=args.eta, prediction_type=pre.prediction_type
        )
    except OptionError as err:
        if err.option == "num_steps":
            total = pre.schedule.num_train_timesteps
            raise ValueError(
                f"--steps {args.steps} is larger than the model's schedule ({total} steps)"
            ) from None
        if err.option == "eta":
            takers = sorted(n for n, entry in SAMPLERS.items() if entry.accepts("eta"))
            raise ValueError(
                f"--eta {args.eta}: --sampler {args.sampler} has no eta (samplers with one: {', '.join(takers)})"
            ) from None
        raise ValueError(f"--sampler {args.sampler}: {err}") from None
    except ValueError as err:
        raise ValueError(
            f"--sampler {args.sampler} (model prediction_type {pre.prediction_type!r}): {err}"
        ) from None


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate images with a shipped or trained model and write a PNG grid, an .npz or a shard folder."""
    import math

    import torch

    from fastdiff.engine import engine_for
    from fastdiff.engine.planner import check_backend
    from fastdiff.output import check_output_path, save_npz, save_png_grid
    from fastdiff.pretrained import load_model

    if not args.out:
        raise ValueError("--out is empty: give a .png or .npz file, or a shard folder DIR/")
    check_sample_args(args)
    # A name ending in .png or .npz is a file, even where a folder of that name exists (refused below).
    if args.out.endswith(("/", "\\")) or (
        Path(args.out).is_dir() and not args.out.endswith((".png", ".npz"))
    ):
        return cmd_sample_to_dir(args)
    if not args.out.endswith((".png", ".npz")):
        raise ValueError(f"--out must end in .png, .npz or / (a shard folder), got {args.out!r}")
    for flag in ("merge_to", "shard_size"):
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')} is for a shard folder (--out DIR/), not {args.out!r}"
            )
    check_output_path(args.out)
    dtype = sample_dtype(args)
    pre = load_model(args.model, args.device, argument="--model", dtype=dtype)
    if args.out.endswith(".png") and len(pre.sample_shape) != 3:
        raise ValueError(
            f"--out {args.out!r}: this model makes {pre.sample_shape}-shaped points, not images; use .npz"
        )
    nbytes = args.num_samples * math.prod(pre.sample_shape) * 4
    if nbytes > MAX_FILE_BYTES:
        raise ValueError(
            f"--num-samples {args.num_samples} would hold {nbytes / 2**30:.1f} GiB in memory for one file (at most "
            f"{MAX_FILE_BYTES >> 30} GiB); write them to a shard folder instead: --out DIR/"
        )
    sampler = _sampler(args, pre)
    guidance = guidance_scale_for(pre, args.guidance_scale)
    labels = _labels(pre, args)
    shape = (args.num_samples, *pre.sample_shape)
    x_T = _load_x_T(args.x_T, shape) if args.x_T else None
    gen = torch.Generator().manual_seed(args.seed)
    if x_T is None:
        x_T = torch.randn(shape, generator=gen)
    start = time.perf_counter()
    engine = engine_for(pre.model, sampler, args.device, backend=check_backend(args.backend))
    first = min(args.batch_size, args.num_samples)
    plan = engine.plan(
        (first, *pre.sample_shape),
        calls=args.num_samples // first,
        cond={"class_labels": labels[:first].to(args.device)} if labels is not None else None,
        guidance_scale=guidance,
        device=args.device,
        dtype=dtype,
    )
    print(plan.line(), flush=True)
    run = engine.sample
    chunks = []
    for lo in range(0, args.num_samples, args.batch_size):
        hi = min(lo + args.batch_size, args.num_samples)
        cond = {"class_labels": labels[lo:hi].to(args.device)} if labels is not None else None
        chunks.append(
            run(
                (hi - lo, *pre.sample_shape),
                x_T=x_T[lo:hi].to(args.device, dtype),
                generator=gen,
                cond=cond,
                guidance_scale=guidance,
                progress=not args.quiet,
            )
            .float()
            .cpu()
        )
    images = torch.cat(chunks)
    seconds = time.perf_counter() - start
    if args.out.endswith(".npz"):
        save_npz(args.out, images, labels)
    else:
        ncols = pre.num_classes if labels is not None and args.class_label is None else None
        save_png_grid(args.out, images, ncols=ncols)
    print(
        f"{args.num_samples} images in {seconds:.2f} s ({args.num_samples / seconds:.1f} images/s), "
        f"{args.sampler} {args.steps} steps, guidance {guidance:g} -> {args.out}"
    )
    return 0


def cmd_sample_to_dir(args: argparse.Namespace) -> int:
    """`fastdiff sample ... --out DIR/`: sharded, resumable sampling on every rank of a torchrun job."""
    import torch

    from fastdiff.distributed import (
        DEFAULT_SHARD_SIZE,
        MERGED,
        init_distributed,
        local_device,
        sample_to_dir,
        shard_counter,
    )
    from fastdiff.engine.planner import check_backend
    from fastdiff.pretrained import load_model

    if args.x_T:
        raise ValueError(
            "--x-T cannot be used with a shard folder: each sample's noise comes from --seed and its index"
        )
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {args.out!r} is a file, expected a folder")
    shard_size = getattr(args, "shard_size", None) or DEFAULT_SHARD_SIZE
    merge_to = None if args.no_merge else (args.merge_to or out_dir / MERGED)
    made, on_shard = shard_counter(shard_size, args.num_samples)
    device = local_device(torch.device(args.device))
    dtype = sample_dtype(args)
    backend = check_backend(args.backend)
    start = time.perf_counter()
    group = init_distributed(device)
    pre = load_model(args.model, str(device), argument="--model", dtype=dtype)
    sampler = _sampler(args, pre)
    guidance = guidance_scale_for(pre, args.guidance_scale)
    # The folder is checked and locked first, then the backend planned (pinned to the folder's on a resume).
    sample_to_dir(
        pre,
        sampler,
        args.num_samples,
        out_dir,
        batch_size=args.batch_size,
        seed=args.seed,
        class_labels=args.class_label,
        guidance_scale=guidance,
        shard_size=shard_size,
        model_id=args.model,
        device=device,
        backend=backend,
        on_plan=lambda line: print(line, flush=True),
        merge_to=merge_to,
        on_shard=on_shard,
        progress=not args.quiet,
        dtype=dtype,
    )
    seconds = time.perf_counter() - start
    if group.rank == 0:
        print(
            f"{made[0]} new images ({args.num_samples} in all) in {seconds:.2f} s "
            f"({made[0] / seconds:.1f} images/s) on {group.world} rank(s), {args.sampler} {args.steps} steps, "
            f"guidance {guidance:g} -> {out_dir}{os.sep}"
            + ("" if merge_to is None else f", merged: {merge_to}")
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `fastdiff sample`."""
    from fastdiff.guidance import MAX_GUIDANCE_SCALE
    from fastdiff.samplers import SAMPLERS

    p = sub.add_parser("sample", help="generate images (PNG grid, .npz, or a shard folder DIR/)")
    p.add_argument("--model", default="digits", help="shipped model name or a .safetensors checkpoint")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument(
        "--eta", type=finite_float, default=0.0, help="DDIM stochasticity in [0, 1] (0: deterministic)"
    )
    p.add_argument(
        "--allow-large-eta", action="store_true", help="accept --eta above 1 (more noise than DDPM)"
    )
    p.add_argument(
        "--num-samples",
        type=bounded_int(1, MAX_SAMPLES),
        default=64,
        help=f"at most {MAX_SAMPLES:.0e}; a .png/.npz file at most {MAX_FILE_BYTES >> 30} GiB of float32 samples",
    )
    p.add_argument("--batch-size", type=bounded_int(1, MAX_SAMPLES), default=64)
    p.add_argument("--class-label", type=int, default=None, help="one class for all samples (default: cycle)")
    p.add_argument(
        "--guidance-scale",
        type=guidance_scale,
        default=None,
        help=f"CFG scale in [-{MAX_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}] (default 2 for a class-conditional "
        "model; pipelines use 1 to about 30)",
    )
    p.add_argument("--seed", type=seed, default=0, help="in [0, 2**63 - 1]")
    p.add_argument("--device", choices=("cpu", "cuda"), default=_default_device())
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the model's precision (default float32; bfloat16 runs on CPUs with AMX or AVX512-BF16 and GPUs, "
        "float16 on GPUs only; images then differ from float32's by a few uint8 levels)",
    )
    p.add_argument("--x-T", dest="x_T", default=None, help=".npy file with the starting noise (N, C, H, W)")
    p.add_argument("--out", default="samples.png", help="file.png, file.npz, or DIR/ for resumable shards")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="samples per shard file with --out DIR/ (default 1024)",
    )
    p.add_argument(
        "--merge-to",
        default=None,
        help="with --out DIR/: the merged .npz rank 0 writes at the end (default DIR/samples.npz)",
    )
    p.add_argument("--no-merge", action="store_true", help="with --out DIR/: leave the shards unmerged")
    p.add_argument(
        "--backend",
        default="auto",
        help="how to run the model: auto (default: the fastest verified path that pays for itself, planned once "
        "and cached in $FASTDIFF_CACHE or ~/.cache/fastdiff), eager (the reference loop), compile, cuda-graphs, "
        "onnxruntime, openvino, tensorrt, aoti",
    )
    p.add_argument(
        "--compile",
        action="store_const",
        dest="backend",
        const="compile",
        help="the same as --backend compile (kept for older scripts)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

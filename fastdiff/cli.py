"""The `fastdiff` command line: sample, train, export, bench, merge, info."""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdiff.distributed import MAX_SAMPLES
from fastdiff.errors import FastdiffError

# Errors that are the user's to fix: one line on stderr and exit code 2, never a traceback. OSError covers the
# file system's refusals (disk full, a name too long, a folder where a file should be); its message names the path.
USER_ERRORS = (ValueError, TypeError, OSError, FastdiffError, ImportError)

# Upper bounds of the sampling arguments, checked before anything is allocated (and stated in --help).
MAX_SEED = 2**63 - 1
# A .png or .npz output holds every sample in memory (float32) before it is written; beyond this, use DIR/.
MAX_FILE_BYTES = 4 << 30


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _bounded_int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high:.3g}], got {text}")
        return value

    return parse


def _finite_float(text: str) -> float:
    """A float that is finite in float32 (the dtype the sampling loop computes in)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not abs(value) <= torch.finfo(torch.float32).max:
        raise argparse.ArgumentTypeError(f"must be a finite number within float32's range, got {text}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, device: str):
    """A shipped model by name (`digits`) or a checkpoint file written by `fastdiff train`."""
    from fastdiff.pretrained import PRETRAINED, load_checkpoint, load_pretrained

    if name_or_path in PRETRAINED:
        return load_pretrained(name_or_path, device=device)
    if name_or_path.endswith(".safetensors"):
        return load_checkpoint(name_or_path, device=device)
    raise ValueError(
        f"--model: unknown model {name_or_path!r}; use one of {sorted(PRETRAINED)} or a .safetensors file"
    )


def build_sampler(kind: str, schedule, steps: int, eta: float, prediction_type: str = "epsilon"):
    """The sampler named on the command line (a name of `fastdiff.samplers.SAMPLERS`, with its registered
    defaults: DDPM clips x0 to [-1, 1] as in the paper, DDIM does not) for a model trained to predict
    `prediction_type`; `eta` goes to samplers that take it."""
    from fastdiff.samplers import SAMPLERS

    if kind not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}, got {kind!r}")
    if steps > schedule.num_train_timesteps:
        raise ValueError(
            f"--steps {steps} is larger than the model's schedule ({schedule.num_train_timesteps} steps)"
        )
    entry = SAMPLERS[kind]
    options: dict[str, Any] = {}
    if entry.accepts("eta"):
        options["eta"] = eta
    elif eta != 0:
        raise ValueError(f"--eta applies to samplers with a stochasticity eta (ddim), not to {kind!r}")
    if entry.accepts("prediction_type"):
        options["prediction_type"] = prediction_type
    elif prediction_type != "epsilon":
        raise ValueError(f"--sampler {kind} cannot sample a {prediction_type} model")
    return entry.build(schedule, steps, **options)


def check_sample_args(args: argparse.Namespace) -> None:
    """Checks of `fastdiff sample`'s arguments that need no model: run before anything is loaded."""
    if not 0 <= args.eta <= 1 and not args.allow_large_eta:
        raise ValueError(
            f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta:g}; "
            "pass --allow-large-eta to use a larger one"
        )
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta:g}")


def guidance_scale_for(pre, requested: float | None) -> float:
    """--guidance-scale: default 2 for class-conditional models, 1 (off) otherwise; refused without classes."""
    if pre.num_classes is None:
        if requested not in (None, 1.0):
            raise ValueError("--guidance-scale needs a class-conditional model")
        return 1.0
    return 2.0 if requested is None else requested


def _labels(pre, args) -> torch.Tensor | None:
    if pre.num_classes is None:
        if args.class_label is not None:
            raise ValueError("--class-label: this model is not class-conditional")
        return None
    if args.class_label is None:
        return torch.arange(args.num_samples) % pre.num_classes
    if not 0 <= args.class_label < pre.num_classes:
        raise ValueError(f"--class-label must be in [0, {pre.num_classes - 1}], got {args.class_label}")
    return torch.full((args.num_samples,), args.class_label)


def _load_x_T(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

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


def engine_for(model: torch.nn.Module, sampler: Any, device: torch.device, *, compile: bool) -> Any:
    """The SamplingEngine of `fastdiff sample`, or None for `fastdiff.sample`: with `compile`, the accelerated
    model compiled (on a CPU the whole step or loop, see SamplingEngine); else CUDA graphs on a GPU, and None on
    a CPU, where an engine without compile would only repeat fastdiff.sample."""
    from fastdiff.accelerate import accelerate
    from fastdiff.engine import SamplingEngine

    if compile:
        return SamplingEngine(accelerate(model), sampler, compile=True)
    return SamplingEngine(model, sampler) if torch.device(device).type == "cuda" else None


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate images with a shipped or trained model and write a PNG grid, an .npz or a shard folder."""
    from fastdiff.output import check_output_path, save_npz, save_png_grid
    from fastdiff.samplers import sample

    if not args.out:
        raise ValueError("--out is empty: give a .png or .npz file, or a shard folder DIR/")
    check_sample_args(args)
    # A name ending in .png or .npz is a file, even where a folder of that name exists (refused below).
    if args.out.endswith(("/", "\\")) or (
        Path(args.out).is_dir() and not args.out.endswith((".png", ".npz"))
    ):
        from fastdiff.distributed import cmd_sample_to_dir

        return cmd_sample_to_dir(args)
    if not args.out.endswith((".png", ".npz")):
        raise ValueError(f"--out must end in .png, .npz or / (a shard folder), got {args.out!r}")
    for flag in ("merge_to", "shard_size"):
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')} is for a shard folder (--out DIR/), not {args.out!r}"
            )
    check_output_path(args.out)
    pre = load_model(args.model, args.device)
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
    sampler = build_sampler(args.sampler, pre.schedule, args.steps, args.eta, pre.prediction_type)
    guidance = guidance_scale_for(pre, args.guidance_scale)
    labels = _labels(pre, args)
    shape = (args.num_samples, *pre.sample_shape)
    x_T = _load_x_T(args.x_T, shape) if args.x_T else None
    gen = torch.Generator().manual_seed(args.seed)
    if x_T is None:
        x_T = torch.randn(shape, generator=gen)
    start = time.perf_counter()
    run = (
        engine_for(pre.model, sampler, args.device, compile=True).sample
        if args.compile
        else functools.partial(sample, pre.model, sampler)
    )
    chunks = []
    for lo in range(0, args.num_samples, args.batch_size):
        hi = min(lo + args.batch_size, args.num_samples)
        cond = {"class_labels": labels[lo:hi].to(args.device)} if labels is not None else None
        chunks.append(
            run(
                (hi - lo, *pre.sample_shape),
                x_T=x_T[lo:hi].to(args.device),
                generator=gen,
                cond=cond,
                guidance_scale=guidance,
                progress=not args.quiet,
            ).cpu()
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


def cmd_info(args: argparse.Namespace) -> int:
    """Versions of the optional dependencies, the device, and which fast paths can run here."""
    import importlib.metadata as md

    from fastdiff import __version__
    from fastdiff.kernels import available

    print(f"fastdiff {__version__}")
    for name in ("torch", "triton", "onnx", "onnxruntime", "tensorrt", "diffusers", "scikit-learn"):
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:13s} {version}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), no CUDA GPU")
    print("fast paths:")
    for key, value in available().items():
        print(f"  {key:20s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from fastdiff.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast diffusion-model sampling.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images (PNG grid, .npz, or a shard folder DIR/)")
    p.add_argument("--model", default="digits", help="shipped model name or a .safetensors checkpoint")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument(
        "--eta", type=_finite_float, default=0.0, help="DDIM stochasticity in [0, 1] (0: deterministic)"
    )
    p.add_argument(
        "--allow-large-eta", action="store_true", help="accept --eta above 1 (more noise than DDPM)"
    )
    p.add_argument(
        "--num-samples",
        type=_bounded_int(1, MAX_SAMPLES),
        default=64,
        help=f"at most {MAX_SAMPLES:.0e}; a .png/.npz file at most {MAX_FILE_BYTES >> 30} GiB of float32 samples",
    )
    p.add_argument("--batch-size", type=_bounded_int(1, MAX_SAMPLES), default=64)
    p.add_argument("--class-label", type=int, default=None, help="one class for all samples (default: cycle)")
    p.add_argument(
        "--guidance-scale", type=_finite_float, default=None, help="CFG scale (default 2 for conditional)"
    )
    p.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=0, help="in [0, 2**63 - 1]")
    p.add_argument("--device", choices=("cpu", "cuda"), default=_default_device())
    p.add_argument("--x-T", dest="x_T", default=None, help=".npy file with the starting noise (N, C, H, W)")
    p.add_argument("--out", default="samples.png", help="file.png, file.npz, or DIR/ for resumable shards")
    p.add_argument(
        "--shard-size",
        type=_positive_int,
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
        "--compile",
        action="store_true",
        help="sample through fastdiff.SamplingEngine(accelerate(model), compile=True): a one-time compile per "
        "batch shape (10-30 s on a small CPU), then the fastest CPU path; pays off over many batches",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train the preset model of a dataset (L_simple, EMA)")
    p.add_argument("--dataset", choices=("digits", "swissroll"), default="digits")
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="versions, device and available fast paths")
    p.set_defaults(func=cmd_info)

    from fastdiff.benchmarks.cli import add_parser as add_bench
    from fastdiff.distributed import add_parser as add_merge
    from fastdiff.export.cli import add_parser as add_export

    for register in (add_export, add_bench, add_merge):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastdiff` console script and `python -m fastdiff`."""
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        print("fastdiff: error: --device cuda: no CUDA GPU is available", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"fastdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130

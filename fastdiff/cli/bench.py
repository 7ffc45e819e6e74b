"""`fastdiff bench` (also `python -m benchmarks`): run the sampling benchmark, compare or validate results files.

    fastdiff bench --workloads digits,swissroll --backends eager,fastdiff --batch-sizes 1,64 --device cpu \\
        --out results.json --markdown results.md --plot results.png
    fastdiff bench compare BASE.json NEW.json --max-regression 5%     # exit 1 on a regression (the CI gate)
    fastdiff bench validate results.json
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Sequence


def _names(option: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)} (or all), got {text!r}"
            )
        return items

    parse.__name__ = option  # argparse names the option's type in its error message
    return parse


def _positive_ints(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,64, got {text!r}")
    return sizes


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark run."""
    import torch

    from fastdiff.benchmarks.backends import BACKENDS
    from fastdiff.benchmarks.harness import DTYPES
    from fastdiff.benchmarks.weight_swap import SWAP_BACKENDS
    from fastdiff.benchmarks.workloads import SAMPLERS, WORKLOADS

    cuda = torch.cuda.is_available()
    p.add_argument(
        "--workloads",
        type=_names("workloads", list(WORKLOADS)),
        default=["digits", "swissroll"],
        help=f"comma list of {', '.join(WORKLOADS)} or all (default digits,swissroll)",
    )
    p.add_argument(
        "--backends",
        type=_names("backends", BACKENDS),
        default=list(BACKENDS),
        help=f"comma list of {', '.join(BACKENDS)} or all (default all; eager is always measured)",
    )
    p.add_argument("--batch-sizes", type=_positive_ints, default=[1, 64], help="comma list (default 1,64)")
    p.add_argument(
        "--dtype",
        dest="dtypes",
        type=_names("dtype", list(DTYPES)),
        default=["float16" if cuda else "float32"],
        help="comma list of float32, float16, bfloat16 (default float16 on GPU, float32 on CPU)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        default=None,
        help="default: each workload's own (swissroll DDPM, others DDIM)",
    )
    p.add_argument(
        "--steps", type=_count(1), default=None, help="sampling steps (default: 50; swissroll 1000)"
    )
    p.add_argument("--repeats", type=_count(1), default=5, help="timed runs per measurement (default 5)")
    p.add_argument(
        "--warmup", type=_count(0), default=1, help="untimed runs after the first call (default 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--graph-mode",
        choices=("auto", "step", "loop"),
        default="auto",
        help="fastdiff-graphs: capture (GPU) or compile (CPU) one step replayed per step, or the whole loop; "
        "auto: step graphs on GPU, the compiled loop on CPU",
    )
    p.add_argument(
        "--latent-size",
        type=_count(1),
        default=None,
        help="sd15-unet at NxN latents (8N x 8N images; a multiple of 8), as the workload sd15-unet-N; "
        "16 runs the full model on a CPU (default: its 64x64, GPU only)",
    )
    p.add_argument(
        "--no-profile", action="store_true", help="skip the model-only timing of the per-step profile"
    )
    p.add_argument(
        "--processes",
        type=_positive_ints,
        default=None,
        help="also measure data-parallel sampling (digits, sample_to_dir) with these process counts, e.g. 1,2 "
        "(gloo ranks on CPU, one GPU per rank with NCCL on CUDA); must include 1",
    )
    p.add_argument(
        "--threads-per-process",
        type=_count(1),
        default=1,
        help="intra-op threads of each scaling process on CPU (default 1)",
    )
    p.add_argument(
        "--scaling-samples", type=_count(1), default=256, help="images per timed scaling run (default 256)"
    )
    p.add_argument(
        "--weight-swap",
        type=_names("weight-swap", list(SWAP_BACKENDS)),
        default=None,
        help="also time swapping the digits weights on these backends (comma list of "
        + ", ".join(SWAP_BACKENDS)
        + "): new weights to the first correct sample, in place and with re-capture / re-export",
    )
    p.add_argument(
        "--auto-calls",
        type=_count(1),
        default=1000,
        help="fastdiff-auto plans each case as a job of this many sample() calls, the work an export or compile "
        "must pay for (default 1000: a served deployment; planning time is reported apart as planning_s)",
    )
    p.add_argument("--out", help="results JSON (validated against schema.json, written atomically)")
    p.add_argument("--markdown", help="markdown report")
    p.add_argument("--plot", help="PNG of the speedups over eager (needs matplotlib, the `plot` extra)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def command_line(args: argparse.Namespace) -> str:
    """The `fastdiff bench` command that repeats this run, every setting spelled out."""
    words = ["fastdiff", "bench"]
    for option, value in (
        ("--workloads", ",".join(args.workloads)),
        ("--backends", ",".join(args.backends)),
        ("--batch-sizes", ",".join(map(str, args.batch_sizes))),
        ("--dtype", ",".join(args.dtypes)),
        ("--device", args.device),
        ("--sampler", args.sampler),
        ("--steps", args.steps),
        ("--repeats", args.repeats),
        ("--warmup", args.warmup),
        ("--seed", args.seed),
        ("--graph-mode", args.graph_mode),
        ("--latent-size", args.latent_size),
        ("--processes", ",".join(map(str, args.processes)) if args.processes else None),
        ("--threads-per-process", args.threads_per_process if args.processes else None),
        ("--scaling-samples", args.scaling_samples if args.processes else None),
        ("--weight-swap", ",".join(args.weight_swap) if args.weight_swap else None),
        ("--auto-calls", args.auto_calls if "fastdiff-auto" in args.backends else None),
        ("--out", args.out),
        ("--markdown", args.markdown),
        ("--plot", args.plot),
    ):
        if value is not None:
            words += [option, str(value)]
    if args.no_profile:
        words.append("--no-profile")
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the markdown report, write the files asked for."""
    from fastdiff.benchmarks.harness import BenchConfig, run_benchmark
    from fastdiff.benchmarks.report import markdown, plot, validator, write_results, write_text
    from fastdiff.output import check_output_path

    for path in (args.out, args.markdown, args.plot):
        if path is not None:
            check_output_path(path)  # fail now, not after minutes of measuring
    if args.out is not None:
        validator()  # the results are validated before they are written: jsonschema must be there
    config = BenchConfig(
        workloads=args.workloads,
        backends=args.backends,
        batch_sizes=args.batch_sizes,
        dtypes=args.dtypes,
        device=args.device,
        sampler=args.sampler,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        profile=not args.no_profile,
        graph_mode=args.graph_mode,
        latent_size=args.latent_size,
        processes=args.processes or (),
        threads_per_process=args.threads_per_process,
        scaling_samples=args.scaling_samples,
        weight_swap=args.weight_swap or (),
        auto_calls=args.auto_calls,
    )
    report = run_benchmark(config, command=command_line(args), progress=not args.quiet)
    text = markdown(report)
    print(text)
    if args.out:
        write_results(args.out, report)
        print(f"wrote {args.out}")
    if args.markdown:
        write_text(args.markdown, text)
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(report, args.plot)
            print(f"wrote {args.plot}")
        except ImportError as err:
            print(f"no plot: {err}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the differences of two results files; exit code 1 when a case regressed beyond the threshold."""
    from fastdiff.benchmarks.report import compare, comparison_markdown, load_results, parse_threshold

    result = compare(
        load_results(args.base),
        load_results(args.new),
        parse_threshold(args.max_regression),
        args.metric,
        allow_missing=args.allow_missing,
        names=(args.base, args.new),
    )
    print(comparison_markdown(result), end="")
    return 1 if result.failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check results files against schema.json; exit code 1 if any is invalid."""
    from fastdiff.benchmarks.report import (
        InvalidResultsError,
        check_results_path,
        parse_json,
        validation_errors,
    )

    invalid = 0
    for name in args.files:
        path = check_results_path(name)
        try:
            errors = validation_errors(parse_json(path))
        except InvalidResultsError as err:
            errors = [str(err)]
        invalid += bool(errors)
        print(f"{name}: " + ("valid" if not errors else f"{len(errors)} problem(s)"))
        for error in errors:
            print(f"  {error}")
    return 1 if invalid else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `bench` (with its `compare` and `validate` subcommands) on the `fastdiff` command line."""
    # The options name the benchmark's workloads and backends, which only fastdiff.benchmarks knows: they are
    # added when `bench` is the subcommand parsed, so that parsing any other one does not import the benchmark.
    sub.add_parser(
        "bench",
        help="sampling benchmark against eager PyTorch (JSON, markdown, PNG); compare / validate results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        populate=add_bench_arguments,
    )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `fastdiff bench` and its `compare` and `validate` subcommands."""
    from fastdiff.benchmarks.report import METRICS

    add_run_arguments(p)
    p.set_defaults(func=cmd_bench)
    actions = p.add_subparsers(dest="bench_command", metavar="{compare,validate}")
    c = actions.add_parser("compare", help="compare two results files; exit 1 on a regression (CI gate)")
    c.add_argument("base", help="baseline results JSON")
    c.add_argument("new", help="new results JSON")
    c.add_argument(
        "--max-regression", default="5%", help="largest allowed drop of the metric, e.g. 5%% (default 5%%)"
    )
    c.add_argument(
        "--metric",
        choices=tuple(METRICS),
        default="throughput",
        help="throughput (samples/s) or speedup (over eager, same run: steadier across machines)",
    )
    c.add_argument(
        "--allow-missing",
        action="store_true",
        help="do not fail when cases of BASE are missing from NEW (by default each one is a failure)",
    )
    c.set_defaults(func=cmd_compare)
    v = actions.add_parser("validate", help="check results files against benchmarks/schema.json")
    v.add_argument("files", nargs="+", help="results JSON files")
    v.set_defaults(func=cmd_validate)

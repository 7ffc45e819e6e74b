"""Steps to quality on the shipped digits model: for each sampler and number of steps, class-conditional samples
judged by (1) the accuracy of a logistic-regression classifier fitted on the real digits (the check of
tests/test_digits_quality.py) and (2) the sliced Wasserstein distance between the samples and the real digits on
pixels. Writes the numbers as JSON and, with --plot, a PNG of both against steps.

    python -m fastdiff.benchmarks.quality --out docs/steps-quality.json --plot docs/steps-quality.png
    python -m fastdiff.benchmarks.quality --from-json docs/steps-quality.json --plot docs/steps-quality.png

The sliced Wasserstein distance (SWD) averages, over random unit directions, the 1-d Wasserstein-1 distance of the
two point clouds projected on the direction (quantile functions compared on a common grid). The JSON also holds
the SWD of as many real digits as samples against all real digits: the floor a perfect sampler reaches with that
many samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SAMPLERS = ("ddim", "dpmpp-2m", "unipc", "euler", "euler-a")
STEPS = (2, 4, 6, 10, 20, 50)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, projections: int = 256, quantiles: int = 200, seed: int = 0
) -> float:
    """SWD-1 between point clouds a (n, d) and b (m, d): the mean over `projections` random unit directions of
    the mean |F_a^-1(u) - F_b^-1(u)| over `quantiles` evenly spaced levels u (n and m may differ)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, d) and (m, d) point clouds, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    directions = torch.randn(
        a.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    directions /= directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles
    qa = torch.quantile(a.double() @ directions, levels, dim=0)
    qb = torch.quantile(b.double() @ directions, levels, dim=0)
    return (qa - qb).abs().mean().item()


def measure(
    samplers: Sequence[str],
    steps: Sequence[int],
    *,
    num_samples: int = 100,
    guidance_scale: float = 2.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The report: accuracy and SWD per sampler and number of steps, with the settings that produced them."""
    from sklearn.linear_model import LogisticRegression

    import fastdiff
    from fastdiff.data import load_digits
    from fastdiff.samplers import SAMPLERS as REGISTERED
    from fastdiff.samplers import build_sampler

    unknown = [s for s in samplers if s not in REGISTERED]
    if unknown:
        raise ValueError(f"samplers {unknown} are not registered; registered: {sorted(REGISTERED)}")
    pre = fastdiff.load_pretrained("digits")
    real, real_labels = load_digits()
    real_flat = real.flatten(1)
    classifier = LogisticRegression(max_iter=2000).fit(real_flat.numpy(), real_labels.numpy())
    labels = torch.arange(num_samples) % 10
    start = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in samplers:
        results[name] = {}
        for n in steps:
            sampler = build_sampler(name, pre.schedule, n)
            images = fastdiff.sample(
                pre.model,
                sampler,
                (num_samples, *pre.sample_shape),
                generator=torch.Generator().manual_seed(seed),
                cond={"class_labels": labels},
                guidance_scale=guidance_scale,
            )
            flat = images.clamp(-1, 1).flatten(1)
            accuracy = float((torch.from_numpy(classifier.predict(flat.numpy())) == labels).float().mean())
            swd = sliced_wasserstein(flat, real_flat)
            results[name][str(n)] = {"accuracy": accuracy, "swd": swd}
            if progress:
                print(f"{name:>9} {n:3d} steps: accuracy {accuracy:.1%}, SWD {swd:.4f}", flush=True)
    subset = torch.randperm(len(real_flat), generator=torch.Generator().manual_seed(seed))[:num_samples]
    floor = sliced_wasserstein(real_flat[subset], real_flat)
    return {
        "model": "digits",
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "classifier": "sklearn LogisticRegression(max_iter=2000) on the 1797 real digits",
        "swd": {"projections": 256, "quantiles": 200, "real_floor": floor},
        "steps": list(steps),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG with accuracy and SWD against steps, one line per sampler (matplotlib, the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from fastdiff.errors import missing_extra

        raise missing_extra("matplotlib", "plot") from None
    from fastdiff.output import atomic_path

    fig, (acc_ax, swd_ax) = plt.subplots(1, 2, figsize=(10, 4))
    # distinct markers, shrinking: samplers with the same numbers (DDIM is Euler's method in sigma space) stay visible
    for i, (name, by_steps) in enumerate(report["results"].items()):
        steps = sorted(int(n) for n in by_steps)
        style = {"marker": "osD^v<>p"[i % 8], "markersize": 9 - i, "label": name, "alpha": 0.85}
        acc_ax.plot(steps, [100 * by_steps[str(n)]["accuracy"] for n in steps], **style)
        swd_ax.plot(steps, [by_steps[str(n)]["swd"] for n in steps], **style)
    swd_ax.axhline(
        report["swd"]["real_floor"], color="black", linestyle="--", linewidth=0.8, label="real digits"
    )
    for ax, title in (
        (acc_ax, "class accuracy (%)"),
        (swd_ax, "sliced Wasserstein distance to the real digits"),
    ):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(report["steps"])
        ax.set_xticklabels([str(n) for n in report["steps"]])
        ax.set_xlabel("steps (model calls)")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    swd_ax.legend(fontsize="small")
    fig.suptitle(
        f"digits model, {report['num_samples']} class-conditional samples per point, guidance {report['guidance_scale']:g}",
        fontsize="medium",
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.benchmarks.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--samplers", default=",".join(SAMPLERS), help="comma-separated registered sampler names"
    )
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated numbers of steps")
    parser.add_argument(
        "--num-samples", type=int, default=100, help="samples per sampler and number of steps"
    )
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON report (required unless --from-json)")
    parser.add_argument("--plot", help="a PNG of the report (needs matplotlib)")
    parser.add_argument("--from-json", help="plot this report instead of measuring (with --plot)")
    args = parser.parse_args(argv)
    from fastdiff.output import check_output_path, write_bytes_atomic

    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot")
        with open(args.from_json) as f:
            plot(json.load(f), args.plot)
        return 0
    if not args.out:
        parser.error("--out is required")

    for path in (args.out, args.plot):
        if path:
            check_output_path(path)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if args.num_samples < 1 or any(n < 1 for n in steps):
        parser.error("--num-samples and every --steps value must be positive")
    report = measure(
        [s.strip() for s in args.samplers.split(",") if s.strip()],
        steps,
        num_samples=args.num_samples,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    report["command"] = "python -m fastdiff.benchmarks.quality " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_bytes_atomic(args.out, (json.dumps(report, indent=1) + "\n").encode())
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

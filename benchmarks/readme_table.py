"""The README's performance table, generated from a committed results file (never typed by hand).

    python -m benchmarks.readme_table benchmarks/results/cpu-2025-01-01.json                 # print it
    python -m benchmarks.readme_table benchmarks/results/cpu-2025-01-01.json --write-readme  # into README.md

`--write-readme` replaces what lies between the lines `<!-- bench:start -->` and `<!-- bench:end -->` of the
README (written atomically); the markers themselves stay.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastdiff.errors import FastdiffError

from .report import header, load_results, scaling_lines, write_text

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def readme_table(report: dict[str, Any], source: str) -> str:
    """Speedup over eager per workload, batch size and dtype (one column per backend), with its provenance."""
    rows = report["results"]
    backends = [
        b
        for b in dict.fromkeys(r["backend"] for r in rows)
        if b != "eager" and any(r["backend"] == b and r["status"] == "ok" for r in rows)
    ]
    ok = {(r["workload"], r["batch_size"], r["dtype"], r["backend"]): r for r in rows if r["status"] == "ok"}
    lines = [
        "| workload | batch | dtype | eager samples/s | " + " | ".join(backends) + " |",
        "|---|---:|---|---:|" + "---:|" * len(backends),
    ]
    for name, desc in report["workloads"].items():
        for batch in report["settings"]["batch_sizes"]:
            for dtype in report["settings"]["dtypes"]:
                eager = ok.get((name, batch, dtype, "eager"))
                if eager is None:
                    continue
                cells = []
                for b in backends:
                    r = ok.get((name, batch, dtype, b))
                    cell = (
                        "—" if r is None or r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
                    )
                    chosen = _auto_choice(r)
                    cells.append(cell if chosen is None else f"{cell} ({chosen})")
                label = f"{name} ({desc['sampler'].upper()} {desc['steps']})"
                lines.append(
                    f"| {label} | {batch} | {dtype} | {eager['samples_per_s']:.4g} | "
                    + " | ".join(cells)
                    + " |"
                )
    worst = {}
    for r in ok.values():
        if r["backend"] != "eager" and r["numerics"] and r["numerics"]["max_abs"] is not None:
            worst[r["backend"]] = max(worst.get(r["backend"], 0.0), r["numerics"]["max_abs"])
    skipped = sorted(
        {r["backend"] for r in rows if r["status"] != "ok"} - {r["backend"] for r in ok.values()}
    )
    notes = [
        "Cells: speedup over eager PyTorch with diffusers' scheduler loop (eager median / backend median). "
        "— : not measured.",
    ]
    if worst:
        notes.append(
            "Largest difference of the final samples from the eager float32 samples: "
            + ", ".join(f"{b} {v:.2g}" for b, v in worst.items())
            + "."
        )
    planning = [r["planning_s"] for r in ok.values() if r["backend"] == "fastdiff-auto" and r["planning_s"]]
    if planning:
        notes.append(
            f"fastdiff-auto: the planner's choice (in brackets) for a job of "
            f"{report['settings'].get('auto_calls', '?')} calls per case (`--auto-calls`), from an empty cache; "
            f"planning (measuring, exporting, compiling) took {min(planning):.0f}-{max(planning):.0f} s per case, "
            "apart from the timed runs."
        )
    if skipped:
        notes.append(f"Not measured on this machine: {', '.join(skipped)} (reasons in the results file).")
    notes += [f"Results: `{source}`.", *header(report)]
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n"
    if report.get("scaling"):
        text += (
            "\n".join(scaling_lines(report["scaling"], heading="Data-parallel sampling, same run:")) + "\n"
        )
    return text


def _auto_choice(row: dict[str, Any] | None) -> str | None:
    """The backend fastdiff-auto ran for this row, from its recorded plan (None for other backends)."""
    if row is None or row["backend"] != "fastdiff-auto":
        return None
    plan = (row.get("info") or {}).get("plans", {}).get(str(row["batch_size"]))
    return None if plan is None else plan.get("backend")


def replace_between_markers(text: str, body: str, start: str = START, end: str = END) -> str:
    """`text` with the lines between the `start` and `end` marker lines replaced by `body`."""
    pattern = re.compile(rf"(^[^\n]*{re.escape(start)}[^\n]*\n)(.*?)(^[^\n]*{re.escape(end)})", re.S | re.M)
    found = len(pattern.findall(text))
    if found != 1:
        raise ValueError(f"expected one {start} ... {end} block, each marker on its own line; found {found}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or write it into the README between the markers."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.readme_table", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("results", type=Path, help="a results JSON file (benchmarks/results/*.json)")
    p.add_argument("--write-readme", action="store_true", help=f"replace the block between {START} and {END}")
    p.add_argument(
        "--readme", type=Path, default=Path("README.md"), help="README to rewrite (default README.md)"
    )
    args = p.parse_args(argv)
    try:
        table = readme_table(load_results(args.results), args.results.as_posix())
        if not args.write_readme:
            print(table, end="")
            return 0
        if not args.readme.is_file():
            raise FileNotFoundError(f"README {str(args.readme)!r} does not exist")
        write_text(args.readme, replace_between_markers(args.readme.read_text(), table))
    except (ValueError, OSError, FastdiffError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the table from {args.results} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

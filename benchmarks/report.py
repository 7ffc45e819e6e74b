"""Results files of the sampling benchmark: validation against schema.json, markdown tables, the speedup plot,
and the comparison of two results files that CI uses as its regression gate."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdiff.errors import FastdiffError, missing_extra
from fastdiff.output import write_bytes_atomic

from .scaling import markdown_lines as scaling_lines
from .weight_swap import markdown_lines as weight_swap_lines

SCHEMA_PATH = Path(__file__).with_name("schema.json")
METRICS = {"throughput": "samples_per_s", "speedup": "speedup_vs_eager"}


class InvalidResultsError(FastdiffError):
    """A results file exists but is not a valid fastdiff benchmark results document."""


def schema() -> dict[str, Any]:
    """The JSON Schema of a results file (benchmarks/schema.json)."""
    return json.loads(SCHEMA_PATH.read_text())


def _non_finite(value: Any, where: str) -> list[str]:
    """NaN and infinities, which JSON cannot hold (Python's json would write them anyway)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where}: {value} is not a finite number"]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _non_finite(v, f"{where}[{i}]")]
    return []


def validator() -> Any:
    """A JSON Schema (draft 2020-12) validator of schema.json; ImportError naming the `bench` extra without
    `jsonschema`."""
    try:
        import jsonschema
    except ImportError as err:
        raise missing_extra("jsonschema", "bench") from err
    return jsonschema.Draft202012Validator(schema())


def validation_errors(report: Any) -> list[str]:
    """Every way `report` violates schema.json, and every NaN or infinity in it ([] when valid)."""
    try:
        return [
            f"${''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in e.absolute_path)}: {e.message}"
            for e in sorted(validator().iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))
        ] + _non_finite(report, "$")
    except RecursionError:  # the checks recurse into the document; no results file is nested this deeply
        return ["$: nested too deeply to be a results file"]


def validate(report: Any) -> None:
    """Raise InvalidResultsError listing the first problems when `report` does not match schema.json."""
    errors = validation_errors(report)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidResultsError("results do not match schema.json: " + "; ".join(errors[:5]) + more)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file; FileNotFoundError if absent, InvalidResultsError if not valid."""
    path = check_results_path(path)
    report = parse_json(path)
    try:
        validate(report)
    except InvalidResultsError as err:
        raise InvalidResultsError(f"{path}: {err}") from None
    return report


def check_results_path(path: str | os.PathLike) -> Path:
    """`path` if it is a file; ValueError for a folder, FileNotFoundError for nothing there."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"results file {str(path)!r} is a folder, expected a .json file")
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    return path


def parse_json(path: Path) -> Any:
    """The JSON document in `path`; InvalidResultsError if it is not JSON or nested beyond any results file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidResultsError(f"{path} is not JSON: {err}") from err
    except RecursionError:
        raise InvalidResultsError(f"{path} is nested too deeply to be a results file") from None


def write_results(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Validate and write the results document atomically (NaN or infinity would not be JSON: refused)."""
    validate(report)
    return write_bytes_atomic(path, (json.dumps(report, indent=1, allow_nan=False) + "\n").encode())


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "—" if value is None else format(value, fmt)


def header(report: dict[str, Any]) -> list[str]:
    """Lines saying where and how the results were measured."""
    env = report["environment"]
    dev, ver = env["device"], env["versions"]
    git = report.get("git") or {}
    sha = git.get("sha", "unknown")[:10] + (" (with local changes)" if git.get("dirty") else "")
    threads = f", {dev['torch_threads']} torch threads" if dev["type"] == "cpu" else ""
    driver = f", driver {dev['driver']}, CUDA {dev['cuda']}" if dev["type"] == "cuda" else ""
    load = env["load_average"]
    libs = ", ".join(
        f"{k} {ver[k]}"
        for k in ("torch", "triton", "diffusers", "onnxruntime", "openvino", "tensorrt")
        if ver.get(k)
    )
    s = report["settings"]
    return [
        f"Device: {dev['name']} ({dev['type']}{threads}{driver}); {libs}; fastdiff git {sha}.",
        f"Measured {report['created_utc']}; load average at start {load['start']}, at end {load['end']}.",
        f"Median of {s['repeats']} timed runs after {s['warmup']} warm-up run(s) and the first call; "
        "speedup = eager median / backend median, measured in the same run.",
        f"Command: `{report['command']}`",
    ]


def markdown(report: dict[str, Any]) -> str:
    """Every measurement as one markdown table per workload, then the skipped and failed ones."""
    lines = ["## fastdiff sampling benchmark", "", *(f"- {line}" for line in header(report))]
    rows = report["results"]
    for name, desc in report["workloads"].items():
        ok = [r for r in rows if r["workload"] == name and r["status"] == "ok"]
        if not ok:
            continue
        title = f"{desc['description']}; {desc['sampler'].upper()} {desc['steps']} steps; weights: {desc['weights']}"
        lines += [
            "",
            f"### {name}",
            "",
            title + "".join(f"; {n}" for n in desc.get("notes", [])),
            "",
            "| backend | batch | dtype | median ms (min–max) | samples/s | x eager | model ms/step | "
            "overhead ms/step | setup s | first run s | peak MiB | max abs diff | PSNR dB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ok:
            t, prof, num = r["time_s"], r["profile"] or {}, r["numerics"] or {}
            lines.append(
                f"| {r['backend']} | {r['batch_size']} | {r['dtype']} | {1e3 * t['median']:.4g} "
                f"({1e3 * t['min']:.4g}–{1e3 * t['max']:.4g}) | {r['samples_per_s']:.4g} | "
                f"{_num(r['speedup_vs_eager'], '.2f')} | {_num(prof.get('model_ms_per_step'))} | "
                f"{_num(prof.get('overhead_ms_per_step'))} | {_num(r['setup_s'])} | {_num(r['first_run_s'])} | "
                f"{_num(r['memory']['peak_mib'], '.4g')} | {_num(num.get('max_abs'), '.2g')} | "
                f"{_num(num.get('psnr_db'), '.1f')} |"
            )
    if report.get("scaling"):
        lines += scaling_lines(report["scaling"])
    if report.get("weight_swap"):
        lines += weight_swap_lines(report["weight_swap"])
    not_run: dict[tuple[str, str, str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            not_run.setdefault((r["workload"], r["backend"], r["status"], r["reason"]), []).append(
                f"{r['batch_size']}/{r['dtype']}"
            )
    if not_run:
        lines += ["", "Not measured:", ""]
        for (workload, backend, status, reason), cases in not_run.items():
            lines.append(f"- {workload} / {backend} ({', '.join(cases)}): {status}: {reason}")
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return write_bytes_atomic(path, text.encode())


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG of the speedup over eager per workload (one panel each) and batch size (bar groups), per backend.

    Needs matplotlib (the `plot` extra); raises ImportError naming the extra when it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from fastdiff.errors import missing_extra

        raise missing_extra("matplotlib", "plot") from None
    rows = [r for r in report["results"] if r["status"] == "ok" and r["speedup_vs_eager"] is not None]
    workloads = [w for w in report["workloads"] if any(r["workload"] == w for r in rows)]
    if not workloads:
        raise ValueError("no successful measurements to plot")
    # one colour per backend in every panel; a panel shows only the backends measured on its workload
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r["backend"] for r in rows))}
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads) + 1, 4), squeeze=False)
    for ax, name in zip(axes[0], workloads, strict=True):
        mine = [r for r in rows if r["workload"] == name]
        groups = list(dict.fromkeys((r["batch_size"], r["dtype"]) for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            values = {
                (r["batch_size"], r["dtype"]): r["speedup_vs_eager"] for r in mine if r["backend"] == backend
            }
            present = [g for g in range(len(groups)) if groups[g] in values]
            xs = [g + (i - (len(backends) - 1) / 2) * width for g in present]
            heights = [values[groups[g]] for g in present]
            bars = ax.bar(xs, heights, width, label=backend, color=colours[backend])
            ax.bar_label(bars, fmt="%.2g", fontsize="x-small")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"batch {b}\n{d}" for b, d in groups])
        ax.set_title(name)
        ax.set_ylabel("speedup vs eager (x)")
        ax.legend(fontsize="x-small", loc="upper left")
    dev = report["environment"]["device"]
    fig.suptitle(
        f"fastdiff sampling speedup over eager PyTorch — {dev['name']} ({dev['type']})", fontsize="medium"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def parse_threshold(text: str) -> float:
    """'5%' -> 0.05; a bare fraction such as '0.05' is accepted too."""
    text = str(text).strip()
    try:
        value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or not 0 <= value < 1 or (not text.endswith("%") and value > 0.5):
        raise ValueError(f"--max-regression: expected a percentage such as 5% (in [0%, 100%)), got {text!r}")
    return value


@dataclass
class Comparison:
    """Row-by-row differences of two results files, and which rows regressed."""

    metric: str
    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    allow_missing: bool = False

    @property
    def regressions(self) -> list[dict[str, Any]]:
        """Rows that fail the gate: slower, no longer running, or (unless allowed) absent from the new file."""
        failing = ("regression", "no longer runs") + (() if self.allow_missing else ("not in new",))
        return [r for r in self.rows if r["verdict"] in failing]

    @property
    def compared(self) -> int:
        """Cases measured in both files."""
        return sum(r["change"] is not None for r in self.rows)

    @property
    def failed(self) -> bool:
        """The gate's verdict: a regression, or nothing measured in both files to compare."""
        return bool(self.regressions) or self.compared == 0


def _key(row: dict[str, Any]) -> tuple[str, str, int, str]:
    return row["workload"], row["backend"], row["batch_size"], row["dtype"]


def _rows(report: dict[str, Any], name: str) -> dict[tuple[str, str, int, str], dict[str, Any]]:
    """The results of `report` by case; InvalidResultsError naming the first case listed more than once."""
    rows: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for row in report["results"]:
        key = _key(row)
        if key in rows:
            workload, backend, batch_size, dtype = key
            raise InvalidResultsError(
                f"{name}: case workload={workload} backend={backend} batch_size={batch_size} dtype={dtype} is "
                "listed more than once; a results file holds one result per case"
            )
        rows[key] = row
    return rows


def compare(
    base: dict[str, Any],
    new: dict[str, Any],
    max_regression: float = 0.05,
    metric: str = "throughput",
    *,
    allow_missing: bool = False,
    names: tuple[str, str] = ("base", "new"),
) -> Comparison:
    """Compare `new` with `base` per (workload, backend, batch size, dtype).

    A regression: the metric (samples/s, or the speedup over eager measured in the same run) fell by more than
    `max_regression`, a case that ran in `base` is now skipped or fails, or (unless `allow_missing`) a case of
    `base` is absent from `new`. Cases only in `new` are listed. `failed` is also true when no case was measured
    in both files, so the gate cannot pass on nothing. A case listed twice in either file (`names` say which file)
    is refused with InvalidResultsError: which of its numbers would count is anyone's guess.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    field_name = METRICS[metric]
    result = Comparison(metric, max_regression, allow_missing=allow_missing)
    devices = [r["environment"]["device"]["name"] for r in (base, new)]
    if devices[0] != devices[1]:
        result.warnings.append(f"different devices: base {devices[0]!r}, new {devices[1]!r}")
    base_rows, new_rows = (_rows(doc, name) for doc, name in zip((base, new), names, strict=True))
    for key in list(dict.fromkeys([*base_rows, *new_rows])):
        b, n = base_rows.get(key), new_rows.get(key)
        row = dict(zip(("workload", "backend", "batch_size", "dtype"), key, strict=True))
        b_val = b[field_name] if b and b["status"] == "ok" else None
        n_val = n[field_name] if n and n["status"] == "ok" else None
        row.update(base=b_val, new=n_val, change=None)
        if b is None:
            row["verdict"] = "new case"
        elif n is None:
            row["verdict"] = "not in new"
        elif b_val is None:
            row["verdict"] = "new case" if n_val is not None else f"not measured ({n['status']})"
        elif n_val is None:
            row["verdict"] = "no longer runs"
            row["reason"] = f"{n['status']}: {n['reason']}"
        else:
            row["change"] = n_val / b_val - 1
            if row["change"] < -max_regression:
                row["verdict"] = "regression"
            else:
                row["verdict"] = "improved" if row["change"] > max_regression else "ok"
        result.rows.append(row)
    return result


def comparison_markdown(result: Comparison) -> str:
    """The comparison as a markdown table, with a verdict line."""
    unit = "samples/s" if result.metric == "throughput" else "x eager"
    lines = [
        f"| workload | backend | batch | dtype | base {unit} | new {unit} | change | verdict |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in result.rows:
        change = "—" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        verdict = r["verdict"] + (f" ({r['reason']})" if r.get("reason") else "")
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['batch_size']} | {r['dtype']} | {_num(r['base'], '.4g')} | "
            f"{_num(r['new'], '.4g')} | {change} | {verdict} |"
        )
    lines += [f"warning: {w}" for w in result.warnings]
    n = len(result.regressions)
    limit = f"{100 * result.threshold:g}%"
    missing = [r for r in result.regressions if r["verdict"] == "not in new"]
    if missing:
        names = ", ".join(
            f"{r['workload']}/{r['backend']}/b{r['batch_size']}/{r['dtype']}" for r in missing[:5]
        )
        lines.append(
            f"{len(missing)} case(s) of the base missing from the new file ({names}"
            + (" ..." if len(missing) > 5 else "")
            + "); pass --allow-missing if that is intended"
        )
    if n:
        lines.append(f"{n} regression(s) beyond {limit}")
    elif result.compared == 0:
        lines.append("FAILED: no case was measured in both files, so nothing was compared")
    else:
        lines.append(f"no regression beyond {limit} ({result.compared} cases compared)")
    return "\n".join(lines) + "\n"

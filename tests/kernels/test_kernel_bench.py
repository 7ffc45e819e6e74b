"""The kernel benchmark script: its CPU smoke run end to end, its JSON report, its atomic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastdiff.benchmarks import kernels as bench


def test_smoke_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "results" / "kernels.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # The script itself must turn the interpreter on when there is no GPU.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fastdiff.benchmarks.kernels", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["kernels.json"]  # no temp file left behind

    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA
    assert report["smoke"] is True
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] and report["versions"]["triton"]
    assert report["settings"]["triton_interpret"] is True
    assert report["settings"]["compile_backend"] == "aot_eager"
    assert report["peak"]["copy_gbs"] > 0 and report["peak"]["matmul_tflops"] > 0

    rows = report["results"]
    for row in rows:
        if row["error"] is None:
            assert row["time_ms"] > 0 and row["first_call_s"] > 0 and row["pct_peak"] > 0, row
            assert (row["tflops"] if row["op"] == "attention" else row["gbs"]) > 0, row
        else:
            assert row["time_ms"] is None and row["impl"].startswith("sdpa-"), (
                row
            )  # only absent SDPA backends
    for op in bench.OPS:
        impls = {r["impl"] for r in rows if r["op"] == op and r["error"] is None}
        baseline = "sdpa" if op == "attention" else "eager"
        assert {"fastdiff-triton", baseline, "torch.compile"} <= impls, (op, impls)
        base_rows = [r for r in rows if r["op"] == op and r["impl"] == baseline]
        assert all(r["speedup_vs_baseline"] == pytest.approx(1.0) for r in base_rows)

    # a multistep row (DPM-Solver++ 2M: its x0 history slot read and rotated) is timed beside DDIM's and DDPM's
    slots = {r["shape"]["history_slots"] for r in rows if r["op"] == "sampler_step" and r["error"] is None}
    assert slots == {0, 1}
    assert "### sampler_step" in proc.stdout and "| fastdiff-triton |" in proc.stdout
    assert f"wrote {out}" in proc.stdout


def test_write_atomic_leaves_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    bench.write_atomic(target, "old")
    assert target.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bench.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        bench.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--ops", "conv"],
        ["--workloads", "sdxl"],
        ["--batch-sizes", "0"],
        ["--batch-sizes", "a"],
        ["--repeats", "0"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err

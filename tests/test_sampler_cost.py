"""benchmarks.sampler_cost: the per-step cost of each sampler through the engine and eager, in one run."""

from __future__ import annotations

import json

import pytest

from fastdiff.benchmarks import sampler_cost
from fastdiff.benchmarks.backends import FastdiffBackend


def test_sampler_cost_rows_and_json(tmp_path, monkeypatch, capsys):
    """Two samplers, two rounds. The engine is swapped for `fastdiff.sample` (no compile, which takes a minute
    here); the rows, ratios and the JSON are what the real run writes."""
    monkeypatch.setattr(
        sampler_cost, "FastdiffGraphsBackend", lambda w, dtype, graph_mode: FastdiffBackend(w, dtype)
    )
    out = tmp_path / "cost.json"
    argv = ["--samplers", "ddim,dpmpp-2m", "--steps", "3", "--rounds", "2", "--out", str(out)]
    assert sampler_cost.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == sampler_cost.FORMAT and doc["settings"]["samplers"] == ["ddim", "dpmpp-2m"]
    ddim, dpm = doc["rows"]
    assert (ddim["sampler"], dpm["sampler"]) == ("ddim", "dpmpp-2m")
    for row in doc["rows"]:
        assert len(row["engine_runs_s"]) == len(row["eager_runs_s"]) == 2
        assert row["engine_step_ms"] == pytest.approx(1e3 * row["engine_s"] / 3)
        assert row["speedup_vs_eager"] == pytest.approx(row["eager_s"] / row["engine_s"])
        # the same sampler through fastdiff and through diffusers' scheduler: float32 rounding apart
        assert row["numerics"]["finite"] and row["numerics"]["max_abs"] < 1e-3
    assert ddim["step_vs_baseline"] == 1.0
    assert dpm["step_vs_baseline"] == pytest.approx(dpm["engine_s"] / ddim["engine_s"])
    assert "dpmpp-2m  engine" in capsys.readouterr().out


@pytest.mark.parametrize("samplers", ["ddim,nope", "ddim,ddim"])
def test_sampler_cost_refuses_unknown_or_repeated_samplers(samplers, capsys):
    with pytest.raises(SystemExit) as exit_:
        sampler_cost.main(["--samplers", samplers])
    assert exit_.value.code == 2 and "expected distinct names" in capsys.readouterr().err

"""benchmarks.cli_runs: whole sample commands, auto against eager, from a fresh cache."""

from __future__ import annotations

import json

import pytest

from fastdiff.benchmarks import cli_runs


def test_cli_runs_times_each_command_and_writes_the_json(tmp_path, capsys):
    """A tiny command, one round: three processes (auto first, then eager and auto), each with its printed
    backend line; the medians and ratios follow from the runs; the JSON is written."""
    out = tmp_path / "cli.json"
    args = "--model digits --num-samples 2 --steps 2"
    assert cli_runs.main(["--args", args, "--rounds", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == cli_runs.FORMAT and doc["fresh_cache"] and "--num-samples 2" in doc["command"]
    assert [(r["round"], r["backend"]) for r in doc["runs"]] == [(0, "auto"), (1, "eager"), (1, "auto")]
    assert all(r["wall_s"] > 0 and r["line"].startswith("backend: ") for r in doc["runs"])
    assert doc["runs"][1]["line"] == "backend: eager (requested)"
    assert doc["speedup_cached"] == round(doc["runs"][1]["wall_s"] / doc["runs"][2]["wall_s"], 3)
    assert doc["versions"]["torch"] and doc["device"]["type"] == "cpu"
    assert "with the plan cached" in capsys.readouterr().out


def test_a_failing_command_says_which_and_why(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with 2: .*--model: unknown model 'nope'"):
        cli_runs.measure(["--model", "nope"], 1, tmp_path / "cache", tmp_path)

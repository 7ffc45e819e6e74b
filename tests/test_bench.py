"""The sampling benchmark (benchmarks/): a CPU smoke run end to end, its results schema, reports and CI gate."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdiff.benchmarks import harness, readme_table, report, scaling
from fastdiff.benchmarks.backends import (
    DIFFUSERS_LOOPS,
    BackendSkipped,
    EagerBackend,
    EagerSdpaBackend,
    FastdiffBackend,
)
from fastdiff.benchmarks.harness import BenchConfig, make_case, run_benchmark
from fastdiff.benchmarks.workloads import build_workload
from fastdiff.cli import main as cli
from fastdiff.samplers import SAMPLERS

# The fastdiff loop and diffusers' loop compute the same float32 update in a different order.
SAME_MODEL_ATOL = 1e-4
# ONNX Runtime runs its own kernels for every op (to_onnx itself checks one call at 1e-4); a few steps compound it.
ONNX_ATOL = 1e-3
SMOKE_BACKENDS = "eager,eager-sdpa,fastdiff,onnxruntime,openvino,tensorrt"


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    # The kernel tests' conftest turns the Triton interpreter on for the whole process; the benchmark must measure
    # the plain CPU paths (backend "auto" resolves to torch without the interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One tiny run through the command line: digits and swissroll, two batch sizes, three steps."""
    out = tmp_path_factory.mktemp("bench")
    paths = {name: out / name for name in ("results.json", "report.md", "speedup.png")}
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        code = cli(
            [
                "bench",
                "--workloads",
                "digits,swissroll,sd15-unet",
                "--backends",
                SMOKE_BACKENDS,
                "--batch-sizes",
                "1,2",
                "--steps",
                "3",
                "--repeats",
                "2",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--quiet",
                "--processes",
                "1,2",
                "--scaling-samples",
                "8",
                "--weight-swap",
                "eager,engine",
                "--out",
                str(paths["results.json"]),
                "--markdown",
                str(paths["report.md"]),
                "--plot",
                str(paths["speedup.png"]),
            ]
        )
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
    assert code == 0
    return out, paths, json.loads(paths["results.json"].read_text())


def _rows(doc, **match):
    return [r for r in doc["results"] if all(r[k] == v for k, v in match.items())]


def test_smoke_run_writes_valid_results(smoke):
    out, paths, doc = smoke
    assert sorted(p.name for p in out.iterdir()) == sorted(paths)  # no temp files left behind
    assert report.validation_errors(doc) == []
    assert doc["schema_version"] == harness.SCHEMA_VERSION
    assert doc["environment"]["device"]["type"] == "cpu"
    assert doc["environment"]["versions"]["torch"] == torch.__version__
    assert len(doc["environment"]["load_average"]["start"]) == 3
    assert doc["command"].startswith("fastdiff bench --workloads digits,swissroll,sd15-unet")
    # every combination is recorded, measured or not
    assert len(doc["results"]) == 3 * 6 * 2


def test_smoke_run_measures_eager_and_fastdiff(smoke):
    _, _, doc = smoke
    for workload in ("digits", "swissroll"):
        for batch in (1, 2):
            eager = _rows(doc, workload=workload, backend="eager", batch_size=batch)[0]
            fast = _rows(doc, workload=workload, backend="fastdiff", batch_size=batch)[0]
            assert eager["status"] == fast["status"] == "ok", (eager["reason"], fast["reason"])
            assert eager["speedup_vs_eager"] == pytest.approx(1.0)
            assert eager["numerics"]["max_abs"] == 0.0
            assert fast["speedup_vs_eager"] == pytest.approx(
                eager["time_s"]["median"] / fast["time_s"]["median"]
            )
            assert fast["numerics"]["finite"] and fast["numerics"]["max_abs"] < SAME_MODEL_ATOL
            assert fast["steps"] == 3 and len(fast["time_s"]["runs"]) == 2
            t = fast["time_s"]
            assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"]
            assert fast["samples_per_s"] == pytest.approx(batch / t["median"])
            assert fast["profile"]["model_s"] > 0 and fast["memory"]["kind"] == "cpu_peak_rss"
    digits = doc["workloads"]["digits"]
    assert digits["sampler"] == "ddim" and digits["guidance_scale"] == 2.0
    assert doc["workloads"]["swissroll"]["sampler"] == "ddpm"
    assert _rows(doc, backend="eager")[0]["info"]["loop"].startswith("diffusers DDIMScheduler.step()")


def test_smoke_run_records_skips_with_reasons(smoke):
    _, _, doc = smoke
    for row in _rows(doc, workload="sd15-unet"):
        assert row["status"] == "skipped" and "GPU only" in row["reason"]
    for row in _rows(doc, backend="tensorrt"):
        assert row["status"] == "skipped" and row["reason"]
    sdpa = _rows(doc, workload="swissroll", backend="eager-sdpa")
    assert all(r["status"] == "skipped" and "no attention" in r["reason"] for r in sdpa)
    for row in _rows(doc, workload="digits", backend="eager-sdpa"):
        assert row["status"] == "ok" and row["numerics"]["max_abs"] < SAME_MODEL_ATOL
    for row in _rows(doc, backend="onnxruntime", workload="digits"):
        if row["status"] == "ok":
            assert row["numerics"]["max_abs"] < ONNX_ATOL and row["setup_s"] > 0
        else:
            assert row["status"] == "skipped" and row["reason"], row
    openvino_installed = importlib.util.find_spec("openvino") is not None
    for workload in ("digits", "swissroll"):
        for row in _rows(doc, backend="openvino", workload=workload):
            if not openvino_installed:
                assert row["status"] == "skipped" and "fastdiff[openvino]" in row["reason"], row
                continue
            # OpenVINO at the f32 hint: like onnxruntime, its own kernels, ~1e-6 per call
            assert row["status"] == "ok", row["reason"]
            assert row["numerics"]["max_abs"] < ONNX_ATOL and row["setup_s"] >= row["info"]["export_s"] > 0
            assert row["info"]["precision"] == "f32" and row["profile"]["model_s"] > 0


def test_smoke_run_writes_markdown_and_png(smoke):
    _, paths, doc = smoke
    text = paths["report.md"].read_text()
    assert "### digits" in text and "### swissroll" in text and "| fastdiff | 2 | float32 |" in text
    assert "sd15-unet / eager (1/float32, 2/float32): skipped: GPU only" in text
    assert text == report.markdown(doc)
    assert paths["speedup.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_gate_on_a_synthetic_regression(smoke, tmp_path, capsys):
    _, paths, doc = smoke
    slow = copy.deepcopy(doc)
    row = _rows(slow, workload="digits", backend="fastdiff", batch_size=2)[0]
    row["samples_per_s"] *= 0.9
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    base = str(paths["results.json"])

    assert cli(["bench", "compare", base, base, "--max-regression", "5%"]) == 0
    assert "no regression beyond 5%" in capsys.readouterr().out
    assert cli(["bench", "compare", base, str(tmp_path / "slow.json"), "--max-regression", "5%"]) == 1
    out = capsys.readouterr().out
    assert "| digits | fastdiff | 2 | float32 |" in out and "-10.0% | regression |" in out
    assert cli(["bench", "compare", base, str(tmp_path / "slow.json"), "--max-regression", "15%"]) == 0


def test_compare_verdicts():
    def doc(rows):
        env = {"device": {"name": "cpu0"}}
        return {"environment": env, "results": rows}

    def row(backend, value, status="ok", batch=1):
        return {
            "workload": "w",
            "backend": backend,
            "batch_size": batch,
            "dtype": "float32",
            "status": status,
            "reason": None if status == "ok" else "boom",
            "samples_per_s": value if status == "ok" else None,
            "speedup_vs_eager": 1.0,
        }

    base = doc([row("a", 100.0), row("b", 100.0), row("c", 100.0), row("d", 100.0), row("e", 100.0)])
    new = doc([row("a", 94.0), row("b", 106.0), row("c", 0, "error"), row("e", 96.0), row("f", 5.0)])
    result = report.compare(base, new, 0.05)
    verdicts = {r["backend"]: r["verdict"] for r in result.rows}
    assert verdicts == {
        "a": "regression",
        "b": "improved",
        "c": "no longer runs",
        "d": "not in new",
        "e": "ok",
        "f": "new case",
    }
    # A case of the base that the new file lacks fails the gate unless allowed.
    assert {r["backend"] for r in result.regressions} == {"a", "c", "d"}
    assert {r["backend"] for r in report.compare(base, new, 0.05, allow_missing=True).regressions} == {
        "a",
        "c",
    }
    assert report.compare(base, new, 0.05, metric="speedup").regressions[0]["backend"] == "c"
    new["environment"]["device"]["name"] = "gpu0"
    assert report.compare(base, new).warnings == ["different devices: base 'cpu0', new 'gpu0'"]


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0%", 0.0), ("12.5%", 0.125), ("0.05", 0.05)])
def test_parse_threshold(text, value):
    assert report.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "-1%", "100%", "abc", "nan%"])
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError, match="--max-regression"):
        report.parse_threshold(text)


def test_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(report.schema())


def test_validation_catches_broken_documents(smoke):
    _, _, doc = smoke
    assert report.validation_errors(doc) == []
    broken = []
    for edit in (
        lambda d: d.pop("environment"),
        lambda d: d.update(schema_version=2),
        lambda d: d["results"][0].update(status="fine"),
        lambda d: d["results"][0]["time_s"].update(median=-1.0),
        lambda d: d["results"][0].update(time_s=None),  # status ok without timings
        lambda d: d["results"][-1].update(reason=None),  # skipped without a reason
        lambda d: d["settings"].update(batch_sizes=[0]),
        lambda d: d["results"][0].update(samples_per_s=math.inf),
    ):
        bad = copy.deepcopy(doc)
        edit(bad)
        broken.append(report.validation_errors(bad))
    assert all(broken), broken


def test_validation_without_jsonschema_names_the_extra(smoke, tmp_path, monkeypatch, capsys):
    _, paths, doc = smoke
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    with pytest.raises(ImportError, match=r"fastdiff\[bench\]"):
        report.validation_errors(doc)
    assert cli(["bench", "validate", str(paths["results.json"])]) == 2
    assert "fastdiff[bench]" in capsys.readouterr().err
    # a run that would write results fails before measuring anything
    out = tmp_path / "r.json"
    assert cli(["bench", "--workloads", "swissroll", "--backends", "eager", "--out", str(out)]) == 2
    assert "fastdiff[bench]" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_validate_command(smoke, tmp_path, capsys):
    _, paths, doc = smoke
    bad = copy.deepcopy(doc)
    del bad["results"][0]["status"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "junk.json").write_text("{not json")
    assert cli(["bench", "validate", str(paths["results.json"])]) == 0
    assert cli(["bench", "validate", str(tmp_path / "bad.json"), str(tmp_path / "junk.json")]) == 1
    out = capsys.readouterr().out
    assert "valid" in out and "'status' is a required property" in out and "not JSON" in out
    assert cli(["bench", "validate", str(tmp_path / "absent.json")]) == 2


def test_write_results_refuses_invalid_documents(smoke, tmp_path):
    _, _, doc = smoke
    bad = copy.deepcopy(doc)
    bad["results"][0]["samples_per_s"] = math.nan
    with pytest.raises(report.InvalidResultsError):
        report.write_results(tmp_path / "r.json", bad)
    assert list(tmp_path.iterdir()) == []


def test_readme_table_between_markers(smoke, tmp_path, capsys):
    _, paths, _ = smoke
    readme = tmp_path / "README.md"
    readme.write_text(f"# fastdiff\n\nintro\n\n{readme_table.START}\nold table\n{readme_table.END}\n\nmore\n")
    assert readme_table.main([str(paths["results.json"])]) == 0
    table = capsys.readouterr().out
    assert "| digits (DDIM 3) | 2 | float32 |" in table and "eager-sdpa" in table and "tensorrt" in table
    assert readme_table.main([str(paths["results.json"]), "--write-readme", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and table.strip() in text
    assert text.startswith("# fastdiff\n\nintro\n\n<!-- bench:start -->\n") and text.endswith(
        "<!-- bench:end -->\n\nmore\n"
    )
    readme.write_text("no markers\n")
    assert readme_table.main([str(paths["results.json"]), "--write-readme", "--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers\n"


def test_plot_without_matplotlib_names_the_extra(smoke, tmp_path, monkeypatch):
    _, _, doc = smoke
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fastdiff\[plot\]"):
        report.plot(doc, tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_module_is_skipped_with_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastdiff.engine", None)
    config = BenchConfig(
        workloads=["swissroll"],
        backends=["fastdiff-graphs"],
        batch_sizes=[2],
        steps=2,
        repeats=1,
        device="cpu",
    )
    doc = run_benchmark(config, progress=False)
    assert report.validation_errors(doc) == []
    graphs = _rows(doc, backend="fastdiff-graphs")[0]
    assert graphs["status"] == "skipped" and "fastdiff.engine is not available" in graphs["reason"]
    assert _rows(doc, backend="eager")[0]["status"] == "ok"  # always measured
    assert doc["settings"]["eager_added"] is True


def test_eager_fallback_without_diffusers_matches_diffusers_loop(monkeypatch):
    workload = build_workload("swissroll", torch.device("cpu"), steps=4)
    case = make_case(workload, 8, torch.float32, seed=3)
    with torch.inference_mode():
        with_diffusers = EagerBackend(workload, torch.float32)
        monkeypatch.setitem(sys.modules, "diffusers", None)
        fallback = EagerBackend(workload, torch.float32)
        assert "diffusers not installed" in fallback.info["loop"]
        a, b = with_diffusers.sample(case), fallback.sample(case)
    assert harness.compare_samples(b, a)["max_abs"] < 1e-5
    assert not torch.equal(a, case.x_T)  # the loop ran


@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_LOOPS))
def test_eager_reference_runs_each_samplers_diffusers_scheduler(sampler):
    # The eager row is diffusers' loop with the scheduler that computes the registered sampler's numbers: its
    # samples equal fastdiff's plain-PyTorch loop of that sampler (float32 rounding of values up to ~300 here).
    workload = build_workload("swissroll", torch.device("cpu"), steps=6, sampler=sampler)
    case = make_case(workload, 8, torch.float32, seed=3)
    with torch.inference_mode():
        eager = EagerBackend(workload, torch.float32)
        table_loop = EagerBackend(workload, torch.float32)
        table_loop.scheduler = None
        a, b = eager.sample(case), table_loop.sample(case)
    assert eager.info["loop"].startswith(f"diffusers {DIFFUSERS_LOOPS[sampler][0]}.step()")
    assert harness.compare_samples(b, a)["max_abs"] <= 2e-6 * max(1.0, a.abs().max().item())
    assert not torch.equal(a, case.x_T)


def test_every_registered_sampler_has_a_diffusers_reference_or_a_reason():
    # flow matching needs a flow model: the benchmark's alpha-bar workloads refuse it by name
    assert set(SAMPLERS) - set(DIFFUSERS_LOOPS) == {"flow-euler"}
    with pytest.raises(TypeError, match="schedule must be a FlowSchedule"):
        build_workload("swissroll", torch.device("cpu"), steps=4, sampler="flow-euler").sampler()


def test_sdpa_attention_matches_reference_attention():
    workload = build_workload("digits", torch.device("cpu"), steps=2)
    case = make_case(workload, 3, torch.float32, seed=0)
    x, kwargs = case.model_inputs()
    sdpa = EagerSdpaBackend(workload, torch.float32)
    t = sdpa.model_timestep(x.shape[0])
    with torch.inference_mode():
        expected = EagerBackend(workload, torch.float32).denoise(x, t, **kwargs)
        got = sdpa.denoise(x, t, **kwargs)
    assert "AttentionBlocks" in sdpa.info["attention"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_compare_samples():
    ref = torch.linspace(-1, 1, 101)
    same = harness.compare_samples(ref.clone(), ref)
    assert same["max_abs"] == 0.0 and same["psnr_db"] is None
    off = harness.compare_samples(ref + 0.02, ref)
    assert off["max_abs"] == pytest.approx(0.02) and off["psnr_db"] == pytest.approx(
        10 * math.log10(4 / 0.02**2)
    )
    bad = harness.compare_samples(torch.full_like(ref, math.nan), ref)
    assert bad["finite"] is False and bad["max_abs"] is None


def test_summarize():
    s = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)


def test_smoke_run_measures_data_parallel_scaling(smoke):
    """Digits through sample_to_dir with 1 and 2 gloo processes, and 1 process with both threads, in one run."""
    _, paths, doc = smoke
    assert "--processes 1,2 --threads-per-process 1 --scaling-samples 8" in doc["command"]
    sec = doc["scaling"]
    assert (
        sec["model"],
        sec["device"],
        sec["backend"],
        sec["batch_size"],
        sec["num_samples"],
        sec["steps"],
    ) == (
        "digits",
        "cpu",
        "gloo",
        2,
        8,
        3,
    )
    assert [(r["processes"], r["threads_per_process"]) for r in sec["rows"]] == [(1, 1), (2, 1), (1, 2)]
    for row in sec["rows"]:
        assert row["status"] == "ok" and len(row["seconds"]) == 2
        assert row["images_per_s"] == pytest.approx(8 / np.median(row["seconds"]))
    base, two, threads = sec["rows"]
    assert base["speedup_vs_1"] == 1.0 and base["efficiency"] == 1.0
    assert two["speedup_vs_1"] == pytest.approx(two["images_per_s"] / base["images_per_s"])
    for row in (two, threads):
        assert row["efficiency"] == pytest.approx(row["speedup_vs_1"] / 2)
    text = paths["report.md"].read_text()
    assert "### data-parallel scaling" in text and "| 2 | 1 |" in text


def test_smoke_run_times_weight_swaps(smoke):
    """In-place swaps (update_weights) and new tensors (load_state_dict(assign=True)) on eager and the engine: every
    sample after a swap is the eager one with the new weights; in place builds no engine entry, new tensors do."""
    _, paths, doc = smoke
    assert "--weight-swap eager,engine" in doc["command"]
    sec = doc["weight_swap"]
    assert (sec["model"], sec["steps"], sec["batch_size"], sec["device"]) == ("digits", 3, 1, "cpu")
    assert sec["fingerprint_check_us"] > 0 and sec["step_ms"] > 0
    rows = {(r["backend"], r["path"]): r for r in sec["rows"]}
    assert sorted(rows) == [
        ("eager", "in_place"),
        ("eager", "new_tensors"),
        ("engine", "in_place"),
        ("engine", "new_tensors"),
    ]
    for r in rows.values():
        assert r["status"] == "ok" and r["correct"] and r["max_abs_diff"] == 0.0 and len(r["seconds"]) == 2
    assert rows[("engine", "in_place")]["rebuilds"] == 0
    assert rows[("engine", "new_tensors")]["rebuilds"] == 2
    assert rows[("eager", "in_place")]["rebuilds"] is None
    assert "### weight swap" in paths["report.md"].read_text()


def test_scaling_plan_and_gpu_rows_without_enough_gpus(monkeypatch):
    assert scaling.plan([1, 2], 1, "cpu") == [(1, 1), (2, 1), (1, 2)]
    assert scaling.plan([1, 2, 4], 2, "cpu") == [(1, 2), (2, 2), (4, 2), (1, 8)]
    assert scaling.plan([1, 2], 2, "cuda") == [(1, 2), (2, 2)]
    monkeypatch.setattr(scaling.torch.cuda, "device_count", lambda: 1)
    calls = []

    def fake_measure(model, *, nprocs, device, **kwargs):
        calls.append((nprocs, device))
        return {"seconds": [2.0, 2.0], "images_per_s": 4.0}

    monkeypatch.setattr(scaling, "measure_throughput", fake_measure)
    kw = dict(threads=1, num_samples=8, steps=2, batch_size=4, guidance_scale=2.0, repeats=2, seed=0)
    sec = scaling.run_scaling([1, 2], device="cuda", **kw)
    assert calls == [(1, "cuda")] and sec["backend"] == "nccl"
    one, two = sec["rows"]
    assert one["speedup_vs_1"] == 1.0
    assert two["status"] == "skipped" and "needs 2 GPUs" in two["reason"] and two["efficiency"] is None
    assert "skipped: needs 2 GPUs" in "\n".join(scaling.markdown_lines(sec))
    with pytest.raises(ValueError, match="processes must include 1"):
        scaling.run_scaling([2], device="cpu", **kw)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"workloads": ["sdxl"]}, "workloads"),
        ({"backends": []}, "backends"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"dtypes": ["float64"]}, "dtypes"),
        ({"repeats": 0}, "repeats"),
        ({"steps": 0}, "steps"),
        ({"sampler": "no-such-sampler"}, "sampler"),
        ({"device": "tpu"}, "device"),
        ({"processes": [2]}, "processes"),
        ({"processes": [0, 1]}, "processes"),
        ({"threads_per_process": 0}, "threads_per_process"),
        ({"auto_calls": 0}, "auto_calls"),
    ],
)
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BenchConfig(**kwargs)


@pytest.mark.parametrize(
    "argv",
    [
        ["--workloads", "sdxl"],
        ["--backends", "eager,jax"],
        ["--batch-sizes", "0"],
        ["--dtype", "int8"],
        ["--repeats", "0"],
        ["--warmup", "-1"],
        ["--auto-calls", "0"],
    ],
)
def test_bad_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["bench", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_unwritable_output_fails_before_measuring(tmp_path, capsys):
    assert cli(["bench", "--workloads", "swissroll", "--out", str(tmp_path / "absent" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_benchmarks(smoke):
    _, paths, _ = smoke
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "validate", str(paths["results.json"])],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(": valid")


def test_diffusers_unet_path_runs_on_a_tiny_sd_config():
    """The sd15-unet code path (diffusers model, text conditioning, explicit uncond) on a tiny config."""
    tiny = {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "sample_size": 8,
    }
    workload = build_workload("sd15-unet", torch.device("cpu"), steps=3, sd15_overrides=tiny)
    assert workload.is_diffusers and workload.sample_shape == (4, 8, 8)
    case = make_case(workload, 2, torch.float32, seed=0)
    assert case.uncond["encoder_hidden_states"].shape == (2, 77, 32) and case.guidance_scale == 7.5
    with pytest.raises(BackendSkipped, match="SDPA by default"):
        EagerSdpaBackend(workload, torch.float32)
    with torch.inference_mode():
        eager = EagerBackend(workload, torch.float32).sample(case)
        fast = FastdiffBackend(workload, torch.float32).sample(case)
    assert not torch.equal(eager, case.x_T)
    assert harness.compare_samples(fast, eager)["max_abs"] < SAME_MODEL_ATOL


class _FakeBackend:
    """Records the order of its runs; raises on its `fail_on`-th run."""

    denoise = None

    def __init__(self, name: str, log: list[str], fail_on: int | None = None) -> None:
        self.name, self.log, self.fail_on = name, log, fail_on
        self.workload = SimpleNamespace(steps=4)

    def sample(self, case):
        self.log.append(self.name)
        if self.log.count(self.name) == self.fail_on:
            raise RuntimeError("boom")
        return case.x_T + 1


def test_measure_all_interleaves_rounds_and_isolates_failures():
    log: list[str] = []
    case = harness.Case(torch.zeros(2, 3), None, None, 1.0, seed=0)
    backends = {n: _FakeBackend(n, log, fail_on=3 if n == "b" else None) for n in "abc"}
    results = harness.measure_all(backends, case, repeats=3, warmup=0, profile=True)
    # first runs in order, then rounds in rotating order: a-b-c, b-c-a; b fails on its third run, so the last
    # round rotates over the two left (offset 2 % 2 = 0)
    assert log == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "a", "c"]
    assert isinstance(results["b"], RuntimeError)
    for name in "ac":
        fields, samples = results[name]
        assert len(fields["time_s"]["runs"]) == 3 and fields["ms_per_step"] > 0
        assert fields["profile"] is None and torch.equal(samples, case.x_T + 1)


def test_fastdiff_auto_reports_its_plan_and_planning_time_apart():
    config = BenchConfig(
        workloads=["swissroll"],
        backends=["eager", "fastdiff-auto"],
        batch_sizes=[2],
        steps=3,
        repeats=1,
        warmup=0,
        device="cpu",
        profile=False,
        auto_calls=7,
    )
    doc = run_benchmark(config, progress=False)
    assert report.validation_errors(doc) == []
    assert doc["settings"]["auto_calls"] == 7
    (auto,) = _rows(doc, backend="fastdiff-auto")
    assert auto["status"] == "ok", auto["reason"]
    assert auto["planning_s"] is not None and auto["planning_s"] >= 0
    assert _rows(doc, backend="eager")[0]["planning_s"] is None
    plan = auto["info"]["plans"]["2"]
    assert plan["line"].startswith(f"backend: {plan['backend']} (")
    assert plan["candidates"]["eager"]["status"] == "ok"
    assert plan["work_calls"] == 7  # the job the planner weighed builds against
    table = readme_table.readme_table(doc, "r.json")
    assert f"x ({plan['backend']}) |" in table  # the README cell names what auto ran
    assert "a job of 7 calls per case" in table
    assert auto["numerics"]["max_abs"] < 1e-3  # whatever it chose, verified against eager

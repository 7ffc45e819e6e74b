"""`fastdiff bench --latent-size`: sd15-unet at a reduced latent size, as its own workload, on a tiny SD config."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from fastdiff.benchmarks import harness, report
from fastdiff.benchmarks.backends import EagerBackend, FastdiffBackend
from fastdiff.benchmarks.harness import BenchConfig, make_case
from fastdiff.benchmarks.workloads import build_workload, check_latent_size, cpu_skip_reason
from fastdiff.cli import main as cli

# The SD 1.5 block structure shrunk to two levels (one downsampling): the same diffusers code path in a few ms.
TINY_SD = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
# fastdiff's loop and diffusers' compute the same float32 update in a different order (as in test_bench.py)
SAME_MODEL_ATOL = 1e-4


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    # the benchmark measures the plain CPU paths, not the Triton interpreter the kernel tests turn on
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_latent_size_sets_the_sample_shape_and_the_name():
    workload = build_workload(
        "sd15-unet", torch.device("cpu"), steps=2, sd15_overrides=TINY_SD, latent_size=6
    )
    assert workload.sample_shape == (4, 6, 6) and workload.name == "sd15-unet-6"
    described = workload.describe()
    assert described["latent_size"] == 6 and described["sample_shape"] == [4, 6, 6]
    default = build_workload("sd15-unet", torch.device("cpu"), steps=2, sd15_overrides=TINY_SD)
    assert default.name == "sd15-unet" and "latent_size" not in default.describe()
    case = make_case(workload, 1, torch.float32, seed=0)
    with torch.inference_mode():
        eager = EagerBackend(workload, torch.float32).sample(case)
        fast = FastdiffBackend(workload, torch.float32).sample(case)
    assert eager.shape == (1, 4, 6, 6) and not torch.equal(eager, case.x_T)
    assert harness.compare_samples(fast, eager)["max_abs"] < SAME_MODEL_ATOL


@pytest.mark.parametrize("size", [12, 20, 4, 7])
def test_sizes_the_sd15_unet_cannot_take_are_refused(size):
    with pytest.raises(ValueError, match=rf"latent_size must be a multiple of 8 .*got {size}"):
        check_latent_size(size)


@pytest.mark.parametrize("size", [0, -8, True, 16.0, "16"])
def test_latent_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="latent_size must be a positive integer"):
        check_latent_size(size)


def test_latent_size_follows_the_number_of_downsamplings():
    assert check_latent_size(8) == 8 and check_latent_size(16) == 16 and check_latent_size(None) is None
    assert check_latent_size(6, TINY_SD) == 6  # one downsampling: any even size
    with pytest.raises(ValueError, match="multiple of 2"):
        build_workload("sd15-unet", torch.device("cpu"), sd15_overrides=TINY_SD, latent_size=5)
    with pytest.raises(ValueError, match="latent_size applies to the workloads"):
        build_workload("digits", torch.device("cpu"), latent_size=16)


def test_only_the_reduced_size_runs_without_a_gpu():
    assert "GPU only" in cpu_skip_reason("sd15-unet", None)
    assert cpu_skip_reason("sd15-unet", 16) is None
    assert cpu_skip_reason("digits", None) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workloads", "sd15-unet", "--latent-size", "12"], "multiple of 8"),
        (["--workloads", "digits", "--latent-size", "16"], "none of ['digits'] takes it"),
    ],
)
def test_command_line_refuses_bad_latent_sizes_before_measuring(argv, message, capsys):
    assert cli(["bench", *argv, "--device", "cpu", "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_bench_runs_the_latent_size_row_on_cpu(tmp_path, monkeypatch):
    """The CLI path end to end: sd15-unet at latent size 8 is measured on CPU (a tiny config stands in for the
    860M model), named sd15-unet-8, and the results file records the size and validates against the schema."""
    tiny = functools.partial(harness.build_workload, sd15_overrides=TINY_SD)
    monkeypatch.setattr(harness, "build_workload", tiny)
    out = tmp_path / "results.json"
    options = "--workloads sd15-unet,swissroll --latent-size 8 --backends eager,fastdiff --batch-sizes 1"
    options += " --steps 2 --repeats 1 --device cpu --quiet"
    argv = ["bench", *options.split(), "--out", str(out)]
    assert cli(argv) == 0
    doc = json.loads(out.read_text())
    assert report.validation_errors(doc) == []
    assert doc["settings"]["latent_size"] == 8 and "--latent-size 8" in doc["command"]
    assert doc["workloads"]["sd15-unet-8"]["sample_shape"] == [4, 8, 8]
    assert doc["workloads"]["sd15-unet-8"]["latent_size"] == 8
    assert "latent_size" not in doc["workloads"]["swissroll"]  # the size applies to sd15-unet only
    rows = [r for r in doc["results"] if r["workload"] == "sd15-unet-8"]
    assert sorted(r["backend"] for r in rows) == ["eager", "fastdiff"]
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["guidance_scale"] == 7.5 and row["numerics"]["max_abs"] < SAME_MODEL_ATOL


def test_bench_config_checks_the_latent_size():
    assert BenchConfig(workloads=["sd15-unet"], latent_size=16).latent_size == 16
    with pytest.raises(ValueError, match="multiple of 8"):
        BenchConfig(workloads=["sd15-unet"], latent_size=24 + 4)

"""benchmarks/quality.py: the sliced Wasserstein distance, and a tiny end-to-end run of the steps-to-quality report."""

import json

import pytest
import torch

from fastdiff.benchmarks.quality import main, sliced_wasserstein

pytest.importorskip("sklearn")


def test_sliced_wasserstein_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 3, generator=gen)
    assert sliced_wasserstein(a, a) == 0.0
    # shifting every point by c moves each projection by <c, w>: the SWD is the mean |<c, w>| over unit w, which
    # for c = (s, 0, 0) in 3-d is s/2
    assert sliced_wasserstein(a + torch.tensor([0.8, 0.0, 0.0]), a, projections=4000) == pytest.approx(
        0.4, rel=0.05
    )
    # clouds of different sizes from the same distribution are close
    assert sliced_wasserstein(a[:200], a) < 0.15
    with pytest.raises(ValueError, match="point clouds"):
        sliced_wasserstein(a, torch.randn(10, 2))


def test_report_of_a_tiny_run(tmp_path):
    out = tmp_path / "quality.json"
    assert main(["--samplers", "ddim", "--steps", "2", "--num-samples", "10", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["results"]["ddim"]["2"]
    assert 0 <= result["accuracy"] <= 1 and result["swd"] > report["swd"]["real_floor"] > 0
    assert report["num_samples"] == 10 and report["command"].endswith(f"--out {out}")
    pytest.importorskip("matplotlib")
    png = tmp_path / "quality.png"
    assert main(["--from-json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="not registered"):
        main(["--samplers", "heun", "--out", str(out)])

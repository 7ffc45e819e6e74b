"""The shipped digits model makes real digits: judged by a classifier fitted on the real data."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.cli import main as cli
from fastdiff.data import load_digits
from fastdiff.samplers import build_sampler

sklearn_linear = pytest.importorskip("sklearn.linear_model")

GUIDANCE = 2.0  # the CLI's default for class-conditional models


@pytest.fixture(scope="module")
def pretrained():
    return fastdiff.load_pretrained("digits")


@pytest.fixture(scope="module")
def classifier():
    images, labels = load_digits()
    clf = sklearn_linear.LogisticRegression(max_iter=2000)
    clf.fit(images.flatten(1).numpy(), labels.numpy())
    return clf


@pytest.mark.parametrize(
    ("name", "steps"),
    [("ddim", 50), ("dpmpp-2m", 10), ("unipc", 10)],  # the multistep solvers at few steps (issue 12)
)
def test_class_conditional_samples_are_recognised(pretrained, classifier, name, steps):
    labels = torch.arange(200) % 10
    sampler = build_sampler(name, pretrained.schedule, steps)
    images = fastdiff.sample(
        pretrained.model,
        sampler,
        (200, *pretrained.sample_shape),
        generator=torch.Generator().manual_seed(0),
        cond={"class_labels": labels},
        guidance_scale=GUIDANCE,
    )
    assert images.min() >= -1.5 and images.max() <= 1.5
    predicted = classifier.predict(images.clamp(-1, 1).flatten(1).numpy())
    accuracy = (torch.from_numpy(predicted) == labels).float().mean().item()
    print(
        f"digits quality, {name} {steps} steps: {accuracy:.1%} of 200 samples classified as the requested class"
    )
    assert accuracy >= 0.90


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc"])
def test_few_step_command_makes_recognisable_digits(tmp_path, monkeypatch, classifier, name):
    # The command itself (its defaults: guidance 2, labels cycling 0-9), written as .npz uint8 images.
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "samples.npz"
    argv = ["sample", "--model", "digits", "--sampler", name, "--steps", "10", "--num-samples", "100"]
    assert cli([*argv, "--backend", "eager", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as data:
        images, labels = data["images"], data["labels"]
    pixels = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
    accuracy = float((classifier.predict(pixels) == labels).mean())
    assert sorted(set(labels.tolist())) == list(range(10)) and accuracy >= 0.90, accuracy


def test_ddim_inversion_round_trip_on_real_digits(pretrained):
    """Invert 20 real digits with DDIM (50 steps) and decode again.

    Stated tolerance on [-1, 1] images: PSNR >= 30 dB, mean abs error < 0.03, 99th percentile < 0.2 (measured:
    32.0 dB, 0.0225, 0.129). Single pixels can be off by more (max 0.88): the eta = 0 inversion evaluates the model
    at the point it is leaving, a first-order approximation.
    """
    images, labels = load_digits()
    x0, y = images[:20], labels[:20]
    sampler = fastdiff.DDIMSampler(pretrained.schedule, 50)
    cond = {"class_labels": y}
    x_T = fastdiff.ddim_invert(pretrained.model, sampler, x0, cond=cond)
    rec = fastdiff.sample(pretrained.model, sampler, x0.shape, x_T=x_T, cond=cond)
    err = (rec - x0).abs()
    psnr = 10 * torch.log10(4 / err.square().mean())
    p99 = err.flatten().quantile(0.99)
    print(f"inversion round trip: PSNR {psnr:.1f} dB, mean abs error {err.mean():.4f}, p99 {p99:.4f}")
    assert psnr >= 30 and err.mean() < 0.03 and p99 < 0.2

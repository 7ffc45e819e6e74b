import sys

import pytest
import torch

from fastdiff.data import load_digits, swiss_roll


def test_load_digits_shapes_and_ranges():
    images, labels = load_digits(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    # the first digit of the bundled set is a 0: background in its centre, ink at the top of the ring
    assert labels[0] == 0 and images[0, 0, 8, 7] < -0.9 and images[0, 0, 2, 7] > 0.5


def test_load_digits_default_is_the_native_size_with_the_scaled_raw_pixels():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    images, labels = load_digits()
    raw = sklearn_datasets.load_digits()
    torch.testing.assert_close(images[:, 0], torch.as_tensor(raw.images, dtype=torch.float32) / 8 - 1)
    assert torch.equal(labels, torch.as_tensor(raw.target))


def test_load_digits_is_deterministic_and_resizes():
    a, _ = load_digits(24)
    b, _ = load_digits(24)
    assert a.shape == (1797, 1, 24, 24) and torch.equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_load_digits_bad_args():
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        load_digits(7)
    with pytest.raises(TypeError, match="image_size"):
        load_digits(16.0)


def test_load_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "fastdiff\[train\]"'):
        load_digits()


def test_swiss_roll_shape_scale_and_determinism():
    points = swiss_roll(4000, generator=torch.Generator().manual_seed(0))
    assert points.shape == (4000, 2) and points.dtype == torch.float32
    rms = points.pow(2).mean(0).sqrt()
    assert torch.all((rms > 0.9) & (rms < 1.1))
    # noiseless points lie on the spiral r = t / scale with t in [1.5 pi, 4.5 pi]
    radius = points.norm(dim=1)
    assert radius.min() >= 0.65 and radius.max() <= 2.05
    again = swiss_roll(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)
    assert not torch.equal(points, swiss_roll(4000, generator=torch.Generator().manual_seed(1)))


def test_swiss_roll_noise():
    gen = torch.Generator().manual_seed(0)
    clean = swiss_roll(2000, generator=torch.Generator().manual_seed(0))
    noisy = swiss_roll(2000, noise=0.1, generator=gen)
    # the same generator draws t first, so the noise is the difference
    assert (noisy - clean).std().item() == pytest.approx(0.1, rel=0.1)


def test_swiss_roll_bad_args():
    with pytest.raises(ValueError, match="n must be >= 1"):
        swiss_roll(0)
    with pytest.raises(TypeError, match="n must be an int"):
        swiss_roll(2.0)
    with pytest.raises(ValueError, match="noise"):
        swiss_roll(10, noise=-0.1)

"""Training refuses to return (and so to save) a diverged model."""

import pytest
import torch

from fastdiff.errors import NonFiniteError
from fastdiff.models import MLPDenoiser
from fastdiff.train import train


def test_a_nan_loss_stops_training_naming_the_step():
    points = torch.randn(64, 2)
    points[::2] = float("nan")  # bad data points poison the first batch that draws one
    with pytest.raises(NonFiniteError, match=r"training diverged: the loss is nan at step \d+") as info:
        train(
            MLPDenoiser(hidden=8, num_layers=1),
            points,
            {"kind": "linear"},
            steps=50,
            batch_size=64,
            progress=False,
        )
    assert (
        info.value.step == 0
    )  # a batch of 64 from 64 points holds the bad one at once (with high probability)


def test_a_finite_run_is_unchanged():
    result = train(
        MLPDenoiser(hidden=8, num_layers=1), torch.randn(64, 2), {"kind": "linear"}, steps=5, progress=False
    )
    assert len(result.losses) == 5

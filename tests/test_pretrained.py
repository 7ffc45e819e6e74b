import pytest
import torch

import fastdiff
from fastdiff.errors import CheckpointError
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.pretrained import load_checkpoint, load_pretrained, save_checkpoint

SCHEDULE = {"kind": "linear", "num_train_timesteps": 100}


def tiny_unet():
    return UNet(UNetConfig.preset("digits", model_channels=8, num_groups=4))


@pytest.mark.parametrize("make", [tiny_unet, lambda: MLPDenoiser(hidden=16, num_layers=1)])
def test_save_load_round_trip(tmp_path, make):
    model = make()
    path = save_checkpoint(tmp_path / "m.safetensors", model, SCHEDULE, {"dataset": "test"})
    loaded = load_checkpoint(path)
    assert type(loaded.model) is type(model)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert loaded.schedule.num_train_timesteps == 100
    assert loaded.metadata["dataset"] == "test"
    assert not loaded.model.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_shipped_digits_model_loads_offline():
    pre = load_pretrained("digits")
    assert isinstance(pre.model, UNet)
    assert (pre.image_size, pre.channels, pre.num_classes) == (8, 1, 10)
    assert pre.sample_shape == (1, 8, 8)
    x = torch.randn(2, *pre.sample_shape)
    with torch.no_grad():
        out = pre.model(x, torch.tensor([10, 500]), class_labels=torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        load_pretrained("cifar")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good.safetensors", tiny_unet(), SCHEDULE)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_checkpoint(truncated)
    assert issubclass(CheckpointError, fastdiff.FastdiffError)


def test_save_into_missing_folder_fails_before_writing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "m.safetensors", tiny_unet(), SCHEDULE)

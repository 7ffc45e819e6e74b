"""The planner with the real exported runtimes on CPU: onnxruntime and OpenVINO in the engine's loop, the export
cached and checked, and a weight change making the planned sampler export again instead of returning stale samples.
Timings are injected (the choice is forced by them); the samples are real."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.cache import DiskCache
from fastdiff.engine.candidates import Aoti, Eager, OnnxRuntime, OpenVino
from fastdiff.engine.planner import PlannedSampler, Planner
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.unet import UNet, UNetConfig

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

BATCH = 3
GUIDANCE = 2.0
# fp32 exported runtimes differ from eager by ~1e-6..1e-4 per call; over 8 DDPM steps with guidance 2
ATOL = 1e-3


def _tiny_unet() -> UNet:
    config = UNetConfig(
        image_size=8,
        in_channels=1,
        model_channels=8,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(1, 2),
        num_groups=4,
        num_classes=3,
    )
    model = UNet(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # ADM zero-initialises residual branches: give them weights
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


class Timer:
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, name, run, rows):
        self.calls += 1
        run()
        return self.seconds[name] * rows


def _planner(root, seconds):
    candidates = {"eager": Eager(), "onnxruntime": OnnxRuntime(), "openvino": OpenVino()}
    return Planner(DiskCache(root), timer=Timer(seconds), candidates=candidates)


@pytest.fixture(scope="module")
def setup():
    model = _tiny_unet()
    sampler = fastdiff.DDPMSampler(fastdiff.NoiseSchedule.from_kind("linear"), num_steps=8)
    return model, sampler


def _call(planned, seed=0):
    labels = torch.arange(BATCH) % 3
    return planned.sample(
        (BATCH, 1, 8, 8),
        generator=torch.Generator().manual_seed(seed),
        cond={"class_labels": labels},
        guidance_scale=GUIDANCE,
    )


def _eager(model, sampler, seed=0):
    labels = torch.arange(BATCH) % 3
    return fastdiff.sample(
        model,
        sampler,
        (BATCH, 1, 8, 8),
        generator=torch.Generator().manual_seed(seed),
        cond={"class_labels": labels},
        guidance_scale=GUIDANCE,
    )


def test_exported_runtimes_run_in_the_engine_loop_and_are_cached(tmp_path, setup):
    model, sampler = setup
    planner = _planner(tmp_path, {"eager": 0.1, "onnxruntime": 0.02, "openvino": 0.05})
    planned = PlannedSampler(model, sampler, planner=planner, expected_calls=1000)
    out = _call(planned)
    (plan,) = planned.plans.values()
    assert plan.backend == "onnxruntime", plan.to_json()
    assert type(plan.runner).__name__ == "SamplingEngine"  # the fused loop, not fastdiff.sample
    assert type(plan.runner.denoiser).__name__ == "OnnxDenoiser"
    ov = plan.results["openvino"]
    assert ov.status == "ok" and ov.cached  # the ONNX file onnxruntime exported serves OpenVINO too
    assert ov.max_abs_diff < ATOL and plan.results["onnxruntime"].max_abs_diff < ATOL
    torch.testing.assert_close(out, _eager(model, sampler), atol=ATOL, rtol=0)

    # a second process: the decision and the export come from the cache, nothing is measured
    planner = _planner(tmp_path, {"eager": 0.1, "onnxruntime": 0.02, "openvino": 0.05})
    again = PlannedSampler(model, sampler, planner=planner, expected_calls=1000)
    torch.testing.assert_close(_call(again), out, atol=0, rtol=0)
    (plan,) = again.plans.values()
    assert plan.from_cache and plan.results["onnxruntime"].cached and planner.timer.calls == 0

    # OpenVINO forced: the same cached file, the engine's loop
    forced = PlannedSampler(model, sampler, planner=planner, backend="openvino")
    torch.testing.assert_close(_call(forced), _eager(model, sampler), atol=ATOL, rtol=0)
    assert next(iter(forced.plans.values())).line().startswith("backend: openvino (requested; cached")


def _mlp():
    torch.manual_seed(0)
    return MLPDenoiser(hidden=16, num_layers=1, time_embed_dim=8).eval()


def _points(denoiser, sampler, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(denoiser, PlannedSampler):
        return denoiser.sample((4, 2), generator=gen)
    return fastdiff.sample(denoiser, sampler, (4, 2), generator=gen)


def test_a_corrupt_export_in_the_cache_is_exported_again(tmp_path, setup):
    _, sampler = setup
    model = _mlp()
    planned = PlannedSampler(model, sampler, planner=_planner(tmp_path, {}), backend="onnxruntime")
    _points(planned, sampler)
    (onnx_file,) = (tmp_path / "artifacts" / "onnx").glob("*/model.onnx")
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    planned = PlannedSampler(model, sampler, planner=_planner(tmp_path, {}), backend="onnxruntime")
    out = _points(planned, sampler)
    (plan,) = planned.plans.values()
    assert not plan.results["onnxruntime"].cached  # rebuilt, not loaded
    torch.testing.assert_close(out, _points(model, sampler), atol=ATOL, rtol=0)


def test_changed_weights_make_the_planned_sampler_export_again(tmp_path, setup):
    _, sampler = setup
    model = _mlp()
    planner = _planner(tmp_path, {"eager": 0.1, "onnxruntime": 0.02, "openvino": 0.05})
    planned = PlannedSampler(model, sampler, planner=planner, expected_calls=1000)
    _points(planned, sampler)
    (first,) = planned.plans.values()
    assert first.backend == "onnxruntime"
    with torch.no_grad():
        state = {k: v + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # in place: the exported graph now holds old weights
    out = _points(planned, sampler, seed=1)
    (second,) = planned.plans.values()
    assert second is not first and second.key["weights"] != first.key["weights"]
    assert second.backend == "onnxruntime" and not second.results["onnxruntime"].cached
    torch.testing.assert_close(out, _points(model, sampler, seed=1), atol=ATOL, rtol=0)


def test_aoti_compiles_once_into_the_cache_and_matches_eager(tmp_path, setup):
    _, sampler = setup
    model = _mlp()
    candidates = {"eager": Eager(), "aoti": Aoti()}
    first = PlannedSampler(
        model, sampler, planner=Planner(DiskCache(tmp_path), candidates=candidates), backend="aoti"
    )
    out = _points(first, sampler)
    torch.testing.assert_close(out, _points(model, sampler), atol=ATOL, rtol=0)
    again = PlannedSampler(
        model, sampler, planner=Planner(DiskCache(tmp_path), candidates=candidates), backend="aoti"
    )
    torch.testing.assert_close(_points(again, sampler), out, atol=0, rtol=0)
    (plan,) = again.plans.values()
    assert plan.results["aoti"].cached and type(plan.runner.denoiser).__name__ == "AotiDenoiser"

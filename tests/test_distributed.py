"""Sharded, resumable sampling: identical images for any number of ranks and any batch size, crash recovery,
checksums, refusal of mixed settings, merge, and the CLI. CPU only: gloo on 127.0.0.1 for the two-rank runs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff
from fastdiff.benchmarks.scaling import free_port, local_rank_env, measure_throughput
from fastdiff.cli import main
from fastdiff.distributed import LOCK, MANIFEST, ShardError, merge, sample_to_dir, shard_name
from fastdiff.engine import SamplingEngine
from fastdiff.errors import FastdiffError
from fastdiff.models import UNet, UNetConfig
from fastdiff.pretrained import Pretrained, load_checkpoint, load_pretrained, save_checkpoint
from fastdiff.samplers import DDIMSampler

N, STEPS, SHARD = 24, 5, 8
SHIPPED = Path(fastdiff.__file__).parent / "weights" / "digits.safetensors"


class Crash(RuntimeError):
    """Raised by the test hook to stop a run midway."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Pretrained, str]:
    """The digits model and its --model argument; random weights until the shipped checkpoint exists."""
    if SHIPPED.is_file():
        return load_pretrained("digits"), "digits"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    save_checkpoint(path, UNet(UNetConfig.preset("digits")), {"kind": "cosine", "num_train_timesteps": 1000})
    return load_checkpoint(path), str(path)


def _run(pre: Pretrained, out_dir: Path, *, eta: float = 0.0, **kwargs) -> Path:
    options = {"batch_size": 8, "seed": 0, "shard_size": SHARD, "progress": False, **kwargs}
    return sample_to_dir(pre, DDIMSampler(pre.schedule, STEPS, eta=eta), N, out_dir, **options)


def _merged(out_dir: Path) -> dict[str, np.ndarray]:
    path = merge(out_dir, out_dir.parent / f"{out_dir.name}.npz")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _recorder(made: list[int]):
    return lambda k, path: made.append(k)


def _stats(out_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out_dir.glob("shard-*.npz")}


def _manifest_ids(out_dir: Path) -> list[int]:
    return [r["index"] for r in json.loads((out_dir / MANIFEST).read_text())["shards"]]


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """One uninterrupted single-process run: its folder and merged arrays."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(digits[0], out)
    return out, _merged(out)


def test_merged_file_layout(reference):
    out, ref = reference
    assert set(ref) == {"images", "arr_0", "labels"}
    assert ref["images"].shape == (N, 8, 8, 1) and ref["images"].dtype == np.uint8
    np.testing.assert_array_equal(ref["arr_0"], ref["images"])
    np.testing.assert_array_equal(ref["labels"], np.arange(N) % 10)
    assert len(np.unique(ref["images"])) > 50  # real images, not a saturated constant
    assert sorted(p.name for p in out.glob("shard-*.npz")) == [shard_name(k) for k in range(3)]
    with np.load(out / shard_name(1)) as shard:
        np.testing.assert_array_equal(shard["indices"], np.arange(8, 16))
        np.testing.assert_array_equal(shard["images"], ref["images"][8:16])
        np.testing.assert_array_equal(shard["labels"], np.arange(8, 16) % 10)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (
        manifest["sampler"]["steps"] == STEPS
        and manifest["seed"] == 0
        and manifest["image_shape"] == [8, 8, 1]
    )


@pytest.mark.parametrize(("batch_size", "shard_size"), [(5, SHARD), (24, SHARD), (8, 5)])
def test_images_do_not_depend_on_batch_size_or_shard_size(
    digits, reference, tmp_path, batch_size, shard_size
):
    _run(digits[0], tmp_path / "run", batch_size=batch_size, shard_size=shard_size)
    got = _merged(tmp_path / "run")
    np.testing.assert_array_equal(got["images"], reference[1]["images"])
    np.testing.assert_array_equal(got["labels"], reference[1]["labels"])


def test_seed_changes_the_images(digits, reference, tmp_path):
    _run(digits[0], tmp_path / "run", seed=1)
    assert not np.array_equal(_merged(tmp_path / "run")["images"], reference[1]["images"])


def test_noise_of_every_step_is_per_sample(digits, reference, tmp_path):
    # eta = 1 draws fresh noise at every step: it too must come from each sample's own generator.
    _run(digits[0], tmp_path / "a", eta=1.0, batch_size=8)
    _run(digits[0], tmp_path / "b", eta=1.0, batch_size=5)
    a = _merged(tmp_path / "a")["images"]
    np.testing.assert_array_equal(a, _merged(tmp_path / "b")["images"])
    assert not np.array_equal(a, reference[1]["images"])


def test_guided_fixed_label(digits, tmp_path):
    _run(digits[0], tmp_path / "a", class_labels=3, guidance_scale=2.0, batch_size=8)
    _run(digits[0], tmp_path / "b", class_labels=3, guidance_scale=2.0, batch_size=24)
    a, b = _merged(tmp_path / "a"), _merged(tmp_path / "b")
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], np.full(N, 3))
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["class_labels"] == 3


def test_sampling_engine_gives_the_same_images(digits, reference, tmp_path):
    pre = digits[0]
    engine = SamplingEngine(pre.model, DDIMSampler(pre.schedule, STEPS), backend="eager")
    _run(pre, tmp_path / "run", engine=engine)
    assert (engine.stats.cache_misses, engine.stats.cache_hits) == (1, 2)  # three batches of 8 ran in it
    np.testing.assert_array_equal(_merged(tmp_path / "run")["images"], reference[1]["images"])


def test_killed_run_resumes_with_only_the_missing_shards(digits, reference, tmp_path):
    out = tmp_path / "run"

    def crash_after_two(k: int, path: Path) -> None:
        if k == 1:
            raise Crash("killed")

    with pytest.raises(Crash):
        _run(digits[0], out, on_shard=crash_after_two)
    assert _manifest_ids(out) == [0, 1]
    before = _stats(out)
    with pytest.raises(ShardError, match="1 of 3 shards are missing"):
        merge(out, tmp_path / "early.npz")
    assert not (tmp_path / "early.npz").exists()
    made: list[int] = []
    _run(digits[0], out, on_shard=_recorder(made))
    assert made == [2]
    after = _stats(out)
    assert {name: after[name] for name in before} == before  # the finished shards were not rewritten
    assert _manifest_ids(out) == [0, 1, 2]
    np.testing.assert_array_equal(_merged(out)["images"], reference[1]["images"])


def test_corrupt_and_missing_shards_are_redone(digits, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    path = out / shard_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (out / shard_name(2)).unlink()
    with pytest.raises(ShardError, match="checksum"):
        merge(out, tmp_path / "bad.npz")
    made: list[int] = []
    _run(digits[0], out, on_shard=_recorder(made))
    assert made == [1, 2]
    np.testing.assert_array_equal(_merged(out)["images"], reference[1]["images"])


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_bad_inputs_are_refused_and_nothing_is_overwritten(digits, reference, tmp_path):
    pre = digits[0]
    a_file = tmp_path / "file"
    a_file.write_bytes(b"keep")
    with pytest.raises(ValueError, match="is a file"):
        _run(pre, a_file)
    assert a_file.read_bytes() == b"keep"
    for name, value in [("num_samples", 0), ("num_samples", -3)]:
        with pytest.raises(ValueError, match=name):
            sample_to_dir(pre, DDIMSampler(pre.schedule, STEPS), value, tmp_path / "x", batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        _run(pre, tmp_path / "x", batch_size=0)
    with pytest.raises(ValueError, match="class_labels"):
        _run(pre, tmp_path / "x", class_labels=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(pre, tmp_path / "missing" / "x")
    with pytest.raises(
        TypeError, match=r"dtype=bfloat16 but the model's weights are float32: cast the model"
    ):
        _run(pre, tmp_path / "x", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        _run(pre, tmp_path / "x", dtype=torch.int64)
    assert not (tmp_path / "x").exists()

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    before = _tree(out)
    with pytest.raises(ValueError, match=r"Differing fields: seed: 0 in the folder, 1 now"):
        _run(pre, out, seed=1)
    with pytest.raises(ValueError, match=r"sampler\.steps: 5 in the folder, 7 now"):
        sample_to_dir(pre, DDIMSampler(pre.schedule, 7), N, out, batch_size=8, seed=0, shard_size=SHARD)
    with pytest.raises(ValueError, match=r"shard_size: 8 in the folder, 4 now"):
        _run(pre, out, shard_size=4)
    assert _tree(out) == before

    broken = tmp_path / "broken"
    shutil.copytree(reference[0], broken)
    (broken / MANIFEST).write_text("{not json")
    before = _tree(broken)
    with pytest.raises(ShardError, match="not readable JSON"):
        _run(pre, broken)
    with pytest.raises(ShardError, match="not readable JSON"):
        merge(broken, tmp_path / "m.npz")
    manifest = json.loads((reference[0] / MANIFEST).read_text())
    manifest["shards"][0]["file"] = "../escape.npz"
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="malformed shard list"):
        _run(pre, broken)
    assert _tree(broken) == {**before, MANIFEST: json.dumps(manifest).encode()}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / shard_name(0)).write_bytes(b"not ours")
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        _run(pre, foreign)
    assert _tree(foreign) == {shard_name(0): b"not ours"}

    with pytest.raises(FileNotFoundError):
        merge(tmp_path / "nowhere", tmp_path / "m.npz")
    with pytest.raises(ValueError, match=r"\.npz"):
        merge(out, tmp_path / "m.txt")


def test_cli_sample_merge_and_errors(digits, reference, tmp_path, capsys):
    model = digits[1]
    out = tmp_path / "cli"
    common = ["--model", model, "--steps", str(STEPS), "--num-samples", str(N), "--batch-size", "8"]
    common += ["--guidance-scale", "1", "--device", "cpu", "--quiet", "--out", f"{out}/"]
    assert main(["sample", *common, "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "24 new images" in printed and f"merged: {out / 'samples.npz'}" in printed
    assert main(["merge", str(out), "--out", str(tmp_path / "cli.npz")]) == 0
    # one shard of 1024 here, three of 8 in the reference; rank 0 merged into the folder by itself
    for merged in (tmp_path / "cli.npz", out / "samples.npz"):
        with np.load(merged) as data:
            np.testing.assert_array_equal(data["images"], reference[1]["images"])
            np.testing.assert_array_equal(data["arr_0"], reference[1]["images"])
    capsys.readouterr()
    unmerged = tmp_path / "unmerged"
    assert main(["sample", *common[:-1], f"{unmerged}/", "--seed", "0", "--no-merge"]) == 0
    assert "merged:" not in capsys.readouterr().out
    assert sorted(p.name for p in unmerged.iterdir()) == [LOCK, MANIFEST, shard_name(0)]
    assert main(["sample", *common, "--seed", "0"]) == 0
    assert "0 new images" in capsys.readouterr().out

    before = _tree(out)
    assert main(["sample", *common, "--seed", "1"]) == 2
    assert "seed: 0 in the folder, 1 now" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((N, 1, 8, 8), np.float32))
    assert main(["sample", *common, "--seed", "0", "--x-T", str(tmp_path / "x.npy")]) == 2
    assert "--x-T" in capsys.readouterr().err
    assert _tree(out) == before

    (tmp_path / "f").write_bytes(b"keep")
    assert main(["sample", *common[:-1], f"{tmp_path / 'f'}/"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_bytes() == b"keep"
    assert main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _worker(rank: int, world: int, port: int, pre: Pretrained, out: str, crash: bool) -> None:
    torch.set_num_threads(1)
    local_rank_env(rank, world, port)
    if crash:

        def crash_on_rank1(k: int, path: Path) -> None:
            if rank == 1:
                raise Crash("rank 1 killed")

        # A group the caller made is used and left alone.
        dist.init_process_group("gloo", rank=rank, world_size=world)
        _run(pre, Path(out) / "run", on_shard=crash_on_rank1)
        return
    # sample_to_dir makes the group from torchrun's environment and keeps it for the next call.
    _run(pre, Path(out) / "b8", merge_to=Path(out) / "b8.npz")
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    _run(pre, Path(out) / "b5", batch_size=5)


def test_two_ranks_give_the_same_images_as_one(digits, reference, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), digits[0], str(tmp_path), False), nprocs=2)
    with np.load(tmp_path / "b8.npz") as data:
        np.testing.assert_array_equal(data["images"], reference[1]["images"])
        np.testing.assert_array_equal(data["labels"], reference[1]["labels"])
    np.testing.assert_array_equal(_merged(tmp_path / "b5")["images"], reference[1]["images"])


def test_two_ranks_killed_then_resumed_on_one(digits, reference, tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 killed"):
        mp.spawn(_worker, args=(2, free_port(), digits[0], str(tmp_path), True), nprocs=2)
    out = tmp_path / "run"
    recorded = _manifest_ids(out)
    kept = {name: stat for name, stat in _stats(out).items() if int(name[6:11]) in recorded}
    made: list[int] = []
    _run(digits[0], out, on_shard=_recorder(made))
    assert sorted(made + recorded) == [0, 1, 2]  # nothing lost, nothing made twice
    assert {name: _stats(out)[name] for name in kept} == kept
    assert _manifest_ids(out) == [0, 1, 2]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    np.testing.assert_array_equal(_merged(out)["images"], reference[1]["images"])


def test_measure_throughput_rejects_bad_arguments_before_spawning():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        measure_throughput(device="tpu")
    with pytest.raises(ValueError, match="nprocs=99 needs 99 CUDA GPUs"):
        measure_throughput(device="cuda", nprocs=99)
    with pytest.raises(ValueError, match="repeats"):
        measure_throughput(repeats=0)


# ---------------------------------------------------------------------------------------------------------------
# One run per folder: the lock, and what a resume must keep


TOY_SAMPLER = DDIMSampler(fastdiff.NoiseSchedule.from_kind("linear"), 5)


def _slow_toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A denoiser slow enough (20 ms a call, 0.4 s a run) that two runs started together overlap, even when a
    loaded machine delays one process's start."""
    time.sleep(0.02)
    return torch.tanh(x)


def _toy_run(out: Path, seed: int, **kwargs) -> Path:
    options = {"batch_size": 1, "shard_size": 1, "sample_shape": (1, 2, 2), "progress": False, **kwargs}
    return sample_to_dir(_slow_toy, TOY_SAMPLER, 4, out, seed=seed, **options)


def _racer(seed: int, folder: str, trials: int, barrier: Any, results: Any) -> None:
    import fastdiff.distributed as shards

    torch.set_num_threads(1)
    check = shards._check_folder
    first_check = []

    def meet_after_the_first_check(out_dir, settings):
        # Both runs pass the check made before the lock (no manifest yet), then race for the lock: without this
        # the faster start-up let the winner write its manifest first, and the loser never reached the lock.
        records = check(out_dir, settings)
        if not first_check:
            first_check.append(True)
            barrier.wait(timeout=60)
        return records

    shards._check_folder = meet_after_the_first_check
    for k in range(trials):
        barrier.wait()
        first_check.clear()
        try:
            _toy_run(Path(folder) / f"trial{k}", seed)
            results.put((k, seed, "ok"))
        except (ShardError, ValueError) as err:
            results.put((k, seed, str(err)))


def test_two_runs_started_together_never_share_a_folder(tmp_path):
    """Two processes with different seeds start on the same new folder at the same moment, many times: one run
    makes the folder, the other is refused (locked out, or after the first finished, by the settings check), and
    the folder holds exactly the first run's valid shards."""
    trials = 12
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(seed, str(tmp_path), trials, barrier, results)) for seed in (0, 1)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, dict[int, str]] = {}
    for _ in range(2 * trials):
        k, seed, outcome = results.get(timeout=120)
        outcomes.setdefault(k, {})[seed] = outcome
    for p in procs:
        p.join(timeout=60)
    expected = {seed: _merged(_toy_run(tmp_path / f"ref{seed}", seed))["images"] for seed in (0, 1)}
    locked_out = 0
    for k, by_seed in sorted(outcomes.items()):
        winners = [seed for seed, outcome in by_seed.items() if outcome == "ok"]
        assert len(winners) == 1, (k, by_seed)
        loser = by_seed[1 - winners[0]]
        assert "in use by another fastdiff run" in loser or "seed: " in loser, loser
        locked_out += "in use" in loser
        folder = tmp_path / f"trial{k}"
        assert json.loads((folder / MANIFEST).read_text())["seed"] == winners[0]
        np.testing.assert_array_equal(_merged(folder)["images"], expected[winners[0]])
    assert locked_out >= 1  # the runs did overlap, and the lock, not luck, kept them apart


def test_a_held_lock_refuses_runs_and_merges(tmp_path):
    import fcntl

    out = _toy_run(tmp_path / "run", 0)
    with open(out / LOCK) as held:  # another process's lock, as far as flock is concerned
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ShardError, match="in use by another fastdiff run"):
            _toy_run(out, 0)
        with pytest.raises(ShardError, match="in use by another fastdiff run"):
            merge(out, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    merge(out, tmp_path / "m.npz")  # released: both work again
    _toy_run(out, 0)


def test_resume_with_another_backend_is_refused(tmp_path):
    out = _toy_run(tmp_path / "run", 0)
    (out / shard_name(3)).unlink()
    engine = SamplingEngine(_slow_toy, TOY_SAMPLER, backend="eager")
    with pytest.raises(
        ValueError,
        match=r"holds samples made with backend 'fastdiff.sample'; backend 'eager' would mix backends",
    ):
        _toy_run(out, 0, engine=engine)
    _toy_run(out, 0)  # the same backend resumes


def _planned(backend: str):
    """A stand-in for the planner that 'chooses' `backend` (the eager engine runs it), and counts its plans."""
    from fastdiff.engine import Plan

    plans = []

    def plan(self, target, **kwargs):
        plans.append(kwargs.get("backend", "auto"))
        runner = SamplingEngine(target.denoiser, target.sampler, backend="eager")
        return Plan(backend, runner, "auto", {}, None, 0.0, False)

    return plans, plan


def test_auto_resume_pins_the_recorded_backend(tmp_path, monkeypatch):
    """`auto` records what the planner chose and a resume keeps it; an explicit other backend is refused naming
    both, and a recorded backend that cannot run here is refused naming it (auto never silently mixes)."""
    from fastdiff.engine.planner import Planner

    plans, plan = _planned("eager")
    monkeypatch.setattr(Planner, "plan", plan)
    lines: list[str] = []
    out = _toy_run(tmp_path / "run", 0, backend="auto", on_plan=lines.append)
    assert plans == ["auto"] and json.loads((out / MANIFEST).read_text())["backend"] == "eager"
    (out / shard_name(3)).unlink()
    with pytest.raises(ValueError, match=r"made with backend 'eager'; backend 'compile' would mix backends"):
        _toy_run(out, 0, backend="compile")
    _toy_run(out, 0, backend="auto", on_plan=lines.append)  # pinned: not planned again
    assert plans == ["auto"] and "the folder's backend, kept by backend auto" in lines[-1]
    assert (out / shard_name(3)).is_file()
    # a folder made with an explicit backend resumes with auto, which keeps it
    explicit = _toy_run(tmp_path / "explicit", 0, backend="eager")
    (explicit / shard_name(0)).unlink()
    _toy_run(explicit, 0, backend="auto")
    assert plans == ["auto"] and json.loads((explicit / MANIFEST).read_text())["backend"] == "eager"
    # the recorded backend cannot run here (an exported runtime needs an nn.Module): refused, naming it
    monkeypatch.undo()  # the real planner
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "backend": "onnxruntime"}))
    (out / shard_name(3)).unlink()
    with pytest.raises(FastdiffError, match=r"made with backend 'onnxruntime', which cannot run here"):
        _toy_run(out, 0, backend="auto")


def test_folder_checks_come_before_planning(tmp_path, monkeypatch):
    """A foreign, locked or mismatched folder, or a bad merge path, is refused before the planner (which can
    export or compile for minutes) runs."""
    import fcntl

    from fastdiff.engine.planner import Planner

    def never(*args, **kwargs):
        raise AssertionError("planned before the folder was checked")

    monkeypatch.setattr(Planner, "plan", never)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="fastdiff did not make"):
        _toy_run(foreign, 0, backend="auto")
    out = _toy_run(tmp_path / "run", 0, backend="eager")
    with pytest.raises(ValueError, match="would replace a file of the shard folder"):
        _toy_run(out, 0, backend="auto", merge_to=out / shard_name(0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _toy_run(out, 0, backend="auto", merge_to=tmp_path / "nowhere" / "m.npz")
    with pytest.raises(ValueError, match="seed: 0 in the folder, 1 now"):
        _toy_run(out, 1, backend="auto")
    with open(out / LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ShardError, match="in use by another fastdiff run"):
            _toy_run(out, 0, backend="auto")

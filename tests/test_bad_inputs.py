"""Careless and hostile input to the command line: always one line on stderr and exit code 2 (or the bench gate's
exit code 1), never a traceback, never a silently wrong result, never a lost or half-written file.

Each case here once gave a traceback, a NaN image, a deleted file or a gate that passed on nothing (issue 14).
"""

import errno
import json
import os
import pathlib
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from fastdiff.cli import main, out_of_memory
from fastdiff.distributed import LOCK, MANIFEST, shard_name
from fastdiff.models import MLPDenoiser, UNet, UNetConfig
from fastdiff.pretrained import save_checkpoint

FAST = ["--steps", "2", "--num-samples", "2", "--quiet", "--device", "cpu"]


def run(args, capsys):
    """(exit code, stdout, stderr) of the CLI; argparse's own refusals count as exit code 2."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(args, capsys, message):
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    if not err.startswith("usage:"):  # argparse prints its usage first; our own errors are exactly one line
        assert err.count("\n") == 1, err
    return err


def tree(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _tiny_unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    config = UNetConfig.preset("digits", model_channels=16, num_res_blocks=1, num_groups=4)
    return UNet(UNetConfig.from_dict({**config.to_dict(), **overrides})).eval()


def _rewrite_header(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """A copy of a safetensors file whose fastdiff JSON header went through `edit` (tensors untouched)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["fastdiff"] = edit(json.loads(header["__metadata__"]["fastdiff"]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", _tiny_unet(), {"kind": "linear"}
    )


# ---------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eta", "2"], "--eta must be in [0, 1]"),
        (["--eta", "-0.5", "--allow-large-eta"], "--eta must be >= 0"),
        (["--eta", "1e300"], "argument --eta"),
        (["--guidance-scale", "1e39"], "argument --guidance-scale"),
        (["--guidance-scale", "nan"], "argument --guidance-scale"),
        # saturated noise with exit 0 before: eager overflowed to NaN, the exported runtimes stayed finite
        (["--guidance-scale", "1e20"], "argument --guidance-scale: must be a number in [-1000, 1000]"),
        (
            ["--guidance-scale", "-1001", "--backend", "onnxruntime"],
            "argument --guidance-scale: must be a number",
        ),
        (
            ["--guidance-scale", "1e30", "--backend", "openvino", "--out", "{tmp}/d/"],
            "argument --guidance-scale",
        ),
        (["--seed", "1e23"], "argument --seed"),
        (["--seed", str(10**23)], "argument --seed"),
        (["--seed", "-1"], "argument --seed"),
        (["--num-samples", str(10**12)], "argument --num-samples"),
        (["--out", ""], "--out is empty"),
        (["--merge-to", "{tmp}/m.npz"], "--merge-to is for a shard folder"),
        (["--shard-size", "4"], "--shard-size is for a shard folder"),
        (["--out", "{tmp}/" + "n" * 250 + ".npz"], "bytes long"),
        (["--out", "{tmp}/" + "n" * 300 + ".npz"], "File name too long"),
        (["--out", "{tmp}/afile/x.npz"], "is a file, expected a folder"),
        (["--out", "{tmp}/adir.npz"], "is a folder, expected a file"),
        (["--x-T", "{tmp}/adir.npz"], "is a folder, expected a .npy file"),
        (["--x-T", "{tmp}/empty.npy"], "not a readable .npy file"),
        (["--x-T", "{tmp}/int.npy"], "int64 values, expected real floating point"),
        (["--x-T", "{tmp}/complex.npy"], "complex64 values, expected real floating point"),
        (["--model", "{tmp}/adir.safetensors"], "is a folder, expected a .safetensors file"),
        (["--model", "{tmp}/meta-list.safetensors"], "expected a JSON object"),
        (["--model", "{tmp}/huge-schedule.safetensors"], "num_train_timesteps must be an int in [1, 100000]"),
        (["--model", "{tmp}/garbage-prediction.safetensors"], "prediction_type must be one of"),
        (["--model", "{tmp}/huge-model.safetensors"], "does not match the stored tensors"),
        (["--model", "{tmp}/huge-image.safetensors"], "config image_size = 1048576 is beyond the largest"),
        (["--model", "{tmp}/huge-image.safetensors", "--out", "{tmp}/d/"], "config image_size = 1048576"),
        (["--model", "{tmp}/deep-model.safetensors"], "config num_res_blocks = 1000000000 is beyond"),
        (
            ["--model", "{tmp}/sample-prediction.safetensors", "--sampler", "euler-a"],
            "--sampler euler-a (model prediction_type 'sample'): prediction_type must be one of",
        ),
        (["--model", "{tmp}/mlp.safetensors", "--out", "{tmp}/points.png"], "not images; use .npz"),
    ],
)
def test_sample_arguments_are_refused_before_any_work(args, message, tmp_path, capsys, ckpt):
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "adir.safetensors").mkdir()
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "int.npy", np.zeros((2, 1, 8, 8), np.int64))
    np.save(tmp_path / "complex.npy", np.zeros((2, 1, 8, 8), np.complex64))
    _rewrite_header(ckpt, tmp_path / "meta-list.safetensors", lambda h: json.dumps([h]))
    edits = {
        "huge-schedule": lambda h: {**h, "schedule": {"kind": "linear", "num_train_timesteps": 10**9}},
        "garbage-prediction": lambda h: {**h, "prediction_type": "garbage"},
        "sample-prediction": lambda h: {**h, "prediction_type": "sample"},
        "huge-model": lambda h: {**h, "config": {**h["config"], "model_channels": 4096}},
        "huge-image": lambda h: {**h, "config": {**h["config"], "image_size": 2**20}},
        "deep-model": lambda h: {**h, "config": {**h["config"], "num_res_blocks": 10**9}},
    }
    for name, edit in edits.items():
        _rewrite_header(ckpt, tmp_path / f"{name}.safetensors", lambda h, edit=edit: json.dumps(edit(h)))
    save_checkpoint(tmp_path / "mlp.safetensors", MLPDenoiser(hidden=8, num_layers=1), {"kind": "linear"})
    before = sorted(os.listdir(tmp_path))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "x.npz")] if "--out" not in args else []
    refused(["sample", *FAST, *out, *args], capsys, message)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a temp file


def test_other_commands(tmp_path, capsys):
    (tmp_path / "afile").write_bytes(b"x")
    refused(["merge", str(tmp_path / "afile"), "--out", str(tmp_path / "m.npz")], capsys, "is a file")
    refused(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.npz")], capsys, "does not exist")
    refused(
        ["export", "--model", "digits", "--opset", "99", "--out", str(tmp_path / "m.onnx")],
        capsys,
        "opset must be None (the exporter's default) or an int in [7,",
    )
    assert sorted(os.listdir(tmp_path)) == ["afile"]


# ---------------------------------------------------------------------------------------------------- NaN


def _nan_checkpoint(path: pathlib.Path) -> pathlib.Path:
    nan = _tiny_unet()
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    return save_checkpoint(path, nan, {"kind": "linear"})


def test_nan_is_an_error_and_writes_nothing(tmp_path, capsys, ckpt):
    bad = _nan_checkpoint(tmp_path / "nan.safetensors")
    err = refused(
        ["sample", *FAST, "--model", str(bad), "--out", str(tmp_path / "n.npz")], capsys, "first after step 0"
    )
    assert "NaN or infinite values" in err
    # Into a shard folder: no shard is written, and the folder this run made is removed again (no manifest of
    # nothing is left to look like a result). With the default backend the planner's eager probe meets the NaN,
    # with --backend eager the first shard's run does, after the manifest was written.
    refused(["sample", *FAST, "--model", str(bad), "--out", f"{tmp_path / 'planned'}/"], capsys, "NaN")
    shards = tmp_path / "shards"
    refused(
        ["sample", *FAST, "--model", str(bad), "--backend", "eager", "--out", f"{shards}/"], capsys, "NaN"
    )
    # an empty folder given by the user is kept, empty
    (tmp_path / "empty").mkdir()
    refused(["sample", *FAST, "--model", str(bad), "--out", f"{tmp_path / 'empty'}/"], capsys, "NaN")
    assert sorted(os.listdir(tmp_path)) == ["empty", "nan.safetensors"]
    assert os.listdir(tmp_path / "empty") == []


def test_nan_through_an_exported_runtime_is_an_error_and_writes_nothing(tmp_path, capsys):
    """The exported runtimes meet NaN weights too (their loop is the engine's, with its finite check)."""
    bad = _nan_checkpoint(tmp_path / "nan.safetensors")
    common = ["sample", *FAST, "--model", str(bad), "--backend", "onnxruntime"]
    err = refused([*common, "--out", str(tmp_path / "n.npz")], capsys, "NaN or infinite values")
    assert "first after step 0" in err
    refused([*common, "--out", f"{tmp_path / 'shards'}/"], capsys, "NaN or infinite values")  # export cached
    assert sorted(os.listdir(tmp_path)) == ["nan.safetensors"]


def test_out_of_memory_is_one_line_and_leaves_no_shard_folder(tmp_path, capsys, monkeypatch):
    """What a checkpoint within the bounds can still ask for (image_size 1024 wanted 1 TiB at its attention)."""

    def allocate(self, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(UNet, "forward", allocate)
    for out in (tmp_path / "x.npz", f"{tmp_path / 'shards'}/"):
        err = refused(["sample", *FAST, "--backend", "eager", "--out", str(out)], capsys, "out of memory")
        assert "(an allocation of 1,024.0 GiB failed)" in err and "--batch-size" in err
    assert os.listdir(tmp_path) == []
    gpu = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity ..."
    )
    assert "(an allocation of 20.0 GiB failed)" in out_of_memory(gpu)
    assert (
        out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    )  # a bug: traceback


# ---------------------------------------------------------------------------------------------------- folders


def test_foreign_folders_are_never_used_as_shard_folders(tmp_path, capsys, monkeypatch):
    from fastdiff.engine.planner import Planner

    def never(*args, **kwargs):
        raise AssertionError("planned (minutes of export or compile) before the folder was checked")

    monkeypatch.setattr(Planner, "plan", never)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.npz").write_bytes(b"my results")
    (mine / ".notes.tmp").write_bytes(b"my temp file")
    before = tree(mine)
    # without the trailing slash, with it, as the current folder (`--out .`, and `--out "$UNSET/"` -> "/")
    refused(["sample", *FAST, "--out", str(mine)], capsys, "fastdiff did not make")
    refused(["sample", *FAST, "--out", f"{mine}/"], capsys, "fastdiff did not make")
    monkeypatch.chdir(mine)
    refused(["sample", *FAST, "--out", "."], capsys, "fastdiff did not make")
    assert tree(mine) == before and sorted(os.listdir(mine)) == [".notes.tmp", "samples.npz"]


def test_only_our_temp_files_are_cleaned_and_our_names_are_protected(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["sample", *FAST, "--out", f"{out}/", "--no-merge"], capsys)[0] == 0
    (out / ".shard-00003.npz.abcd1234.tmp").write_bytes(b"a killed run's temp file")
    (out / ".user.tmp").write_bytes(b"not ours")
    shard = (out / shard_name(0)).read_bytes()
    refused(
        ["sample", *FAST, "--out", f"{out}/", "--merge-to", str(out / shard_name(0))], capsys, "would replace"
    )
    refused(["merge", str(out), "--out", str(out / MANIFEST)], capsys, "must end in .npz")
    refused(["merge", str(out), "--out", str(out / shard_name(0))], capsys, "would replace")
    assert (out / shard_name(0)).read_bytes() == shard
    (out / "samples.npz").mkdir()  # a stray folder where the merged file goes: refused before sampling
    refused(["sample", *FAST, "--out", f"{out}/"], capsys, "is a folder, expected a file name")
    (out / "samples.npz").rmdir()
    assert run(["sample", *FAST, "--out", f"{out}/"], capsys)[0] == 0
    assert not (out / ".shard-00003.npz.abcd1234.tmp").exists()
    assert (out / ".user.tmp").read_bytes() == b"not ours"


def test_manifest_claiming_absurd_sizes_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["sample", *FAST, "--out", f"{out}/", "--no-merge"], capsys)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    for field, value in [("num_samples", 10**15), ("shard_size", 0), ("image_shape", [10**9, 1, 1])]:
        (out / MANIFEST).write_text(json.dumps({**manifest, field: value}))
        refused(["merge", str(out), "--out", str(tmp_path / "m.npz")], capsys, "malformed")
    (out / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    refused(["merge", str(out), "--out", str(tmp_path / "m.npz")], capsys, "not readable JSON")
    assert not (tmp_path / "m.npz").exists()


# ---------------------------------------------------------------------------------------------------- OSError


def test_disk_full_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    err = refused(["sample", *FAST, "--out", str(tmp_path / "x.npz")], capsys, "No space left on device")
    assert f"cannot write {tmp_path / 'x.npz'}" in err
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_shards_or_merging_keeps_the_folder_resumable(
    tmp_path, capsys, monkeypatch, ckpt
):
    out = tmp_path / "run"
    args = [
        "sample",
        *FAST,
        "--model",
        str(ckpt),
        "--num-samples",
        "6",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
    ]
    args += ["--backend", "eager", "--out", f"{out}/"]
    write_bytes = pathlib.Path.write_bytes

    def full_at_shard_1(self, data):
        if self.name.startswith(f".{shard_name(1)}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_at_shard_1)
    err = refused(args, capsys, "No space left on device")
    assert f"cannot write {out / shard_name(1)}" in err
    assert sorted(os.listdir(out)) == [LOCK, MANIFEST, shard_name(0)]  # no temp file, shard 0 recorded
    monkeypatch.undo()
    code, stdout, _ = run([*args, "--no-merge"], capsys)  # resumed: shards 1 and 2
    assert code == 0 and "4 new images (6 in all)" in stdout

    real_write = zipfile._ZipWriteFile.write
    calls = []

    def full_while_merging(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", full_while_merging)
    err = refused(args, capsys, "No space left on device")
    assert f"cannot write {out / 'samples.npz'}" in err
    calls.clear()
    err = refused(["merge", str(out), "--out", str(tmp_path / "m.npz")], capsys, "No space left on device")
    assert f"cannot write {tmp_path / 'm.npz'}" in err
    assert sorted(os.listdir(out)) == [LOCK, MANIFEST, *map(shard_name, range(3))]  # shards kept, no merge
    assert sorted(os.listdir(tmp_path)) == ["run"]
    monkeypatch.undo()
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "0 new images (6 in all)" in stdout
    merged = np.load(out / "samples.npz")
    shards = [np.load(out / shard_name(k)) for k in range(3)]
    for key in ("images", "labels"):
        assert np.array_equal(merged[key], np.concatenate([shard[key] for shard in shards]))


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_verified_and_readable_by_others(tmp_path, capsys, ckpt):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", _tiny_unet(), {"kind": "linear"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    refused(
        ["sample", *FAST, "--model", str(tmp_path / "flipped.safetensors"), "--out", str(tmp_path / "x.npz")],
        capsys,
        "flipped.safetensors is corrupt",
    )


def test_prediction_type_of_a_checkpoint_is_used(tmp_path, capsys, ckpt):
    v = _rewrite_header(
        ckpt, tmp_path / "v.safetensors", lambda h: json.dumps({**h, "prediction_type": "v_prediction"})
    )
    args = ["sample", *FAST, "--seed", "3", "--class-label", "1"]
    assert run([*args, "--model", str(ckpt), "--out", str(tmp_path / "eps.npz")], capsys)[0] == 0
    assert run([*args, "--model", str(v), "--out", str(tmp_path / "v.npz")], capsys)[0] == 0
    eps, vp = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("eps", "v"))
    assert not np.array_equal(eps, vp)  # the same weights read as v-prediction give other images


def test_sample_to_dir_uses_the_checkpoint_prediction_type(tmp_path, ckpt):
    from fastdiff.distributed import sample_to_dir
    from fastdiff.pretrained import load_model
    from fastdiff.samplers import DDIMSampler

    v = _rewrite_header(
        ckpt, tmp_path / "v.safetensors", lambda h: json.dumps({**h, "prediction_type": "v_prediction"})
    )
    options = {"batch_size": 2, "seed": 3, "steps": 2, "progress": False}
    images = {}
    for name, path in (("eps", ckpt), ("v", v)):
        out = sample_to_dir(load_model(str(path)), "ddim", 2, tmp_path / name, **options)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["sampler"]["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[name]
        images[name] = np.load(out / shard_name(0))["images"]
    assert not np.array_equal(images["eps"], images["v"])  # were identical: the checkpoint's type was ignored
    pre = load_model(str(v))
    with pytest.raises(ValueError, match="the model predicts 'v_prediction': build the sampler with"):
        sample_to_dir(pre, DDIMSampler(pre.schedule, 2), 2, tmp_path / "mixed", **options)
    sample = _rewrite_header(
        ckpt, tmp_path / "s.safetensors", lambda h: json.dumps({**h, "prediction_type": "sample"})
    )
    with pytest.raises(ValueError, match=r"sampler='euler-a' \(model prediction_type 'sample'\)"):
        sample_to_dir(load_model(str(sample)), "euler-a", 2, tmp_path / "s", **options)
    assert sorted(os.listdir(tmp_path)) == ["eps", "s.safetensors", "v", "v.safetensors"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a device this torch build lacks")
def test_sample_to_dir_checks_the_device_like_sample(tmp_path, ckpt):
    from fastdiff.distributed import sample_to_dir
    from fastdiff.pretrained import load_model

    for model in ("digits", load_model(str(ckpt))):
        with pytest.raises(ValueError, match=r"device='cuda(:0)?': this torch build has no usable CUDA GPU"):
            sample_to_dir(model, "ddim", 2, tmp_path / "d", batch_size=2, seed=0, steps=2, device="cuda")
    assert os.listdir(tmp_path) == []


def test_same_checkpoint_under_another_path_resumes(tmp_path, capsys, ckpt):
    out = tmp_path / "run"
    common = [*FAST, "--num-samples", "4", "--shard-size", "2", "--out", f"{out}/", "--no-merge"]
    assert run(["sample", *common, "--model", str(ckpt)], capsys)[0] == 0
    (out / shard_name(1)).unlink()
    moved = shutil.copy(ckpt, tmp_path / "moved.safetensors")
    code, stdout, err = run(["sample", *common, "--model", str(moved)], capsys)
    assert code == 0, err
    assert "2 new images (4 in all)" in stdout
    other = save_checkpoint(tmp_path / "other.safetensors", _tiny_unet(seed=1), {"kind": "linear"})
    refused(["sample", *common, "--model", str(other)], capsys, "model_sha256")
    # the same weights in another architecture (groups of the norms) are another model too
    regrouped = save_checkpoint(
        tmp_path / "regrouped.safetensors", _tiny_unet(num_groups=8), {"kind": "linear"}
    )
    refused(
        ["sample", *common, "--model", str(regrouped)], capsys, "model_config.num_groups: 4 in the folder, 8"
    )


# ---------------------------------------------------------------------------------------------------- bench gate


def test_bench_compare_fails_on_missing_cases_and_deep_json(tmp_path, capsys):
    base = str(pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / "cpu-2026-11-23-3.json")
    doc = json.loads(pathlib.Path(base).read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**doc, "results": []}))
    renamed = [{**r, "workload": r["workload"] + "-renamed"} for r in doc["results"]]
    (tmp_path / "renamed.json").write_text(json.dumps({**doc, "results": renamed}))
    for new in ("empty", "renamed"):
        code, out, _ = run(["bench", "compare", base, str(tmp_path / f"{new}.json")], capsys)
        assert code == 1 and "missing from the new file" in out and "--allow-missing" in out
        code, out, _ = run(
            ["bench", "compare", base, str(tmp_path / f"{new}.json"), "--allow-missing"], capsys
        )
        assert code == 1 and "nothing was compared" in out
    code, out, _ = run(["bench", "compare", base, base], capsys)
    measured = sum(r["status"] == "ok" for r in doc["results"])
    assert code == 0 and f"no regression beyond 5% ({measured} cases compared)" in out
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(["bench", "compare", base, str(tmp_path / "deep.json")], capsys, "nested too deeply")
    # parsed by json, but deep enough for the schema checks' recursion
    (tmp_path / "deep-parsed.json").write_text('{"a":' * 950 + "null" + "}" * 950)
    code, out, _ = run(
        ["bench", "validate", str(tmp_path / "deep.json"), str(tmp_path / "deep-parsed.json")], capsys
    )
    assert code == 1 and out.count("problem(s)") == 2


def test_bench_files_that_are_folders_or_list_a_case_twice_are_refused(tmp_path, capsys):
    base = str(pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / "cpu-2026-11-23-3.json")
    doc = json.loads(pathlib.Path(base).read_text())
    (tmp_path / "adir").mkdir()
    for args in (["compare", base, str(tmp_path / "adir")], ["validate", str(tmp_path / "adir")]):
        refused(
            ["bench", *args], capsys, f"results file {str(tmp_path / 'adir')!r} is a folder, expected a .json"
        )
    # every case twice, the first at 1/100 of its throughput: a dictionary keeps the last and the gate would pass
    slow = [
        {**r, "samples_per_s": r["samples_per_s"] / 100} if r["status"] == "ok" else r for r in doc["results"]
    ]
    (tmp_path / "twice.json").write_text(json.dumps({**doc, "results": [*slow, *doc["results"]]}))
    case = doc["results"][0]
    name = f"workload={case['workload']} backend={case['backend']} batch_size={case['batch_size']}"
    for args in ([base, str(tmp_path / "twice.json")], [str(tmp_path / "twice.json"), base]):
        err = refused(["bench", "compare", *args], capsys, name)
        assert f"{tmp_path / 'twice.json'}: case" in err and "listed more than once" in err


def test_train_seed_out_of_range_names_the_flag(tmp_path, capsys):
    refused(
        ["train", "--seed", str(10**23), "--out", str(tmp_path / "c.safetensors")],
        capsys,
        "argument --seed: must be an integer in [0,",
    )
    assert os.listdir(tmp_path) == []

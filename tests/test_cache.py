"""fastdiff.cache: records and artifacts round trip, corrupt entries are rebuilt, two processes build once."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from fastdiff.cache import ENTRY, DiskCache, default_root, key_digest, use_for_inductor

KEY = {"weights": "ab" * 32, "shape": [4, 1, 8, 8], "dtype": "float32", "backend": "onnxruntime"}


def _flip(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def _builder(log: Path, content: bytes = b"model bytes"):
    def build(folder: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        (folder / "model.onnx").write_bytes(content)
        (folder / "model.onnx.data").write_bytes(content[::-1])

    return build


def _builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c"
    assert DiskCache().root == tmp_path / "c"
    monkeypatch.delenv("FASTDIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "fastdiff"


def test_key_digest_is_canonical():
    assert key_digest({"a": 1, "b": [1, 2]}) == key_digest({"b": [1, 2], "a": 1})
    assert key_digest({"a": 1}) != key_digest({"a": 2})
    with pytest.raises(TypeError, match="plain JSON"):
        key_digest({"a": object()})


def test_record_round_trip_and_discard(tmp_path):
    cache = DiskCache(tmp_path)
    assert cache.get("plan", KEY) is None
    cache.put("plan", KEY, {"choice": "onnxruntime", "seconds": [0.5, 0.25]})
    assert cache.get("plan", KEY) == {"choice": "onnxruntime", "seconds": [0.5, 0.25]}
    assert cache.get("plan", {**KEY, "dtype": "float16"}) is None
    assert cache.get("build", KEY) is None  # kinds are separate
    cache.discard("plan", KEY)
    assert cache.get("plan", KEY) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign"])
def test_a_damaged_record_is_discarded(tmp_path, damage):
    cache = DiskCache(tmp_path)
    path = cache.put("plan", KEY, {"choice": "openvino", "s_per_call": 0.125})
    if damage == "flip":
        text = path.read_text().replace("openvino", "openvinO")  # still valid JSON: only the hash can tell
        path.write_text(text)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # another key's entry under this name
        os.replace(cache.put("plan", {**KEY, "dtype": "float16"}, {"choice": "eager"}), path)
    assert cache.get("plan", KEY) is None
    assert not path.exists()


def test_artifact_is_built_once_then_found(tmp_path):
    cache = DiskCache(tmp_path / "cache")
    log = tmp_path / "log"
    ticks = iter([10.0, 12.5])
    first = cache.artifact("onnx", KEY, _builder(log), clock=lambda: next(ticks))
    assert not first.cached and first.build_s == 2.5
    assert (first.path / "model.onnx").read_bytes() == b"model bytes"
    again = cache.artifact("onnx", KEY, _builder(log))
    assert again.cached and again.path == first.path and again.build_s == 0.0
    assert cache.find_artifact("onnx", KEY) == first.path
    assert cache.find_artifact("onnx", {**KEY, "shape": [1]}) is None
    assert _builds(log) == 1
    assert json.loads((first.path / ENTRY).read_text())["key"] == KEY


@pytest.mark.parametrize("damage", ["flip-model", "flip-data", "truncate", "missing", "extra", "entry"])
def test_a_damaged_artifact_is_rebuilt_never_used(tmp_path, damage):
    cache = DiskCache(tmp_path / "cache")
    log = tmp_path / "log"
    folder = cache.artifact("onnx", KEY, _builder(log, b"x" * 4096)).path
    if damage == "flip-model":
        _flip(folder / "model.onnx", 2000)
    elif damage == "flip-data":
        _flip(folder / "model.onnx.data")
    elif damage == "truncate":
        (folder / "model.onnx").write_bytes(b"x" * 4000)
    elif damage == "missing":
        (folder / "model.onnx.data").unlink()
    elif damage == "extra":
        (folder / "stray.bin").write_bytes(b"?")
    else:
        _flip(folder / ENTRY, 5)
    rebuilt = cache.artifact("onnx", KEY, _builder(log, b"y" * 4096))
    assert not rebuilt.cached and _builds(log) == 2
    assert (rebuilt.path / "model.onnx").read_bytes() == b"y" * 4096
    assert sorted(p.name for p in rebuilt.path.iterdir()) == [ENTRY, "model.onnx", "model.onnx.data"]


def test_find_artifact_removes_a_damaged_one(tmp_path):
    cache = DiskCache(tmp_path)
    folder = cache.artifact("onnx", KEY, _builder(tmp_path / "log")).path
    _flip(folder / "model.onnx")
    assert cache.find_artifact("onnx", KEY) is None
    assert not folder.exists()


def test_an_artifact_is_hashed_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    import fastdiff.cache as cache_module

    cache = DiskCache(tmp_path)
    folder = cache.artifact("onnx", KEY, _builder(tmp_path / "log")).path
    hashed = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert cache.find_artifact("onnx", KEY) == folder
    assert len(hashed) == 2  # just written: too young to be remembered, so hashed again
    old = time.time() - 60
    for f in folder.iterdir():
        os.utime(f, (old, old))
    for _ in range(3):
        assert cache.find_artifact("onnx", KEY) == folder
    assert len(hashed) == 4  # hashed once more, then remembered
    assert DiskCache(tmp_path).find_artifact("onnx", KEY) == folder
    assert len(hashed) == 6  # another cache object (another process) hashes for itself
    _flip(folder / "model.onnx.data")  # same size, a new mtime
    assert cache.find_artifact("onnx", KEY) is None
    assert not folder.exists()


def test_a_failed_build_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path / "cache")

    def build(folder: Path) -> None:
        (folder / "half.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.artifact("onnx", KEY, build)
    assert cache.find_artifact("onnx", KEY) is None
    assert list((tmp_path / "cache" / "artifacts" / "onnx").iterdir()) == []


def test_a_build_may_not_write_folders(tmp_path):
    cache = DiskCache(tmp_path)
    with pytest.raises(ValueError, match="only plain files"):
        cache.artifact("onnx", KEY, lambda folder: (folder / "sub").mkdir())


def _race(root: str, log: str, start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)
    cache = DiskCache(root)

    def build(folder: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.2)  # long enough for the others to arrive while this one builds
        (folder / "model.onnx").write_bytes(b"built by %d" % os.getpid())

    artifact = cache.artifact("onnx", KEY, build)
    cache.put("plan", KEY, {"pid": os.getpid(), "path": str(artifact.path)})
    with open(log + ".seen", "a") as f:
        f.write((artifact.path / "model.onnx").read_text() + "\n")


def test_concurrent_processes_build_once_and_read_whole_entries(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 0.3
    log = str(tmp_path / "log")
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "c"), log, start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    assert _builds(Path(log)) == 1
    seen = Path(log + ".seen").read_text().splitlines()
    assert len(seen) == 4 and len(set(seen)) == 1  # every process got the one complete build
    record = DiskCache(tmp_path / "c").get("plan", KEY)
    assert record is not None and record["pid"] in {p.pid for p in procs}


def test_inductor_cache_goes_under_ours_unless_set(monkeypatch, tmp_path):
    cache = DiskCache(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert use_for_inductor(cache) is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_for_inductor(cache) == tmp_path / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_cache_root_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        DiskCache(tmp_path / "file")


def test_a_record_that_cannot_be_written_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    def full(self, data):
        raise OSError(28, "No space left on device")

    cache = DiskCache(tmp_path / "cache")
    monkeypatch.setattr(Path, "write_bytes", full)
    with caplog.at_level("WARNING", logger="fastdiff.cache"):
        assert cache.put("plan", KEY, {"choice": "eager"}) is None
    assert "No space left on device" in caplog.text
    monkeypatch.undo()
    assert cache.get("plan", KEY) is None
    assert cache.put("plan", KEY, {"choice": "eager"}) is not None
    assert cache.get("plan", KEY) == {"choice": "eager"}

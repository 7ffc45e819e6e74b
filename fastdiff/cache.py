"""The on-disk cache of the planner: decision records (JSON) and built artifacts (exported models), checked on read.

Where: `$FASTDIFF_CACHE`, else `$XDG_CACHE_HOME/fastdiff`, else `~/.cache/fastdiff`. Inside it:

    records/<kind>/<digest>.json      {"format", "key", "record", "sha256"}: a decision or a measured build time
    artifacts/<kind>/<digest>/        the files a build wrote, and entry.json listing each file's sha256
    locks/<kind>-<digest>.lock        an exclusive flock held while an artifact is checked or built
    inductor/                         torch inductor's cache (TORCHINDUCTOR_CACHE_DIR), unless the user set one

An entry's name is the sha256 of the canonical JSON of its key (`key_digest`), and the key is stored in the entry
and compared on read, so an entry of another key (a digest collision, an older format) is never taken for this
one. Every entry carries a content hash: a record the sha256 of its key and payload, an artifact the sha256 of each
file. An entry that fails its check (corrupt, truncated, missing files, another key) is removed and reported as
absent; an artifact is then built again. Writes are atomic (temporary name, then rename), so a reader sees a whole
entry or none, and artifacts are built under a per-entry `flock`, so two processes asking for the same artifact
build it once: the second waits, then finds it. Hashing reads every file of an artifact (a few ms for the digits
U-Net's 11 MB ONNX file; about 2 s per GB), which is what makes a corrupt export impossible to load. A process
hashes an artifact once: later uses in it compare each file's (size, mtime, ctime, inode) with what it saw when the
hashes matched, and hash again on any difference. Files modified less than STAMP_AGE_S before that check are hashed
on every use, since a write within the file system's timestamp tick would not change their mtime.
What goes into a key (weights' hash, shapes, versions, ...) is the planner's business (`fastdiff.engine.planner`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdiff.fingerprint import file_sha256
from fastdiff.output import write_bytes_atomic

log = logging.getLogger("fastdiff.cache")

# Part of every entry: an entry written by another layout of this module is another key, never read as this one.
FORMAT = "fastdiff-cache-v1"
ENV_VAR = "FASTDIFF_CACHE"
ENTRY = "entry.json"
# Files younger than this at a successful check are not remembered as checked (see the module docstring).
STAMP_AGE_S = 2.0
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_root() -> Path:
    """The cache folder: $FASTDIFF_CACHE, else $XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastdiff"


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and no spaces: the same bytes for equal keys, whatever their insertion order."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"a cache key or record must be plain JSON data (str, numbers, lists, dicts): {err}"
        ) from None


def key_digest(key: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `key` with the cache format: the entry's name."""
    return hashlib.sha256(canonical_json({"format": FORMAT, "key": key})).hexdigest()


def _sealed(key: Mapping[str, Any], payload: Any) -> dict[str, Any]:
    body = {"format": FORMAT, "key": key, "record": payload}
    return {**body, "sha256": hashlib.sha256(canonical_json(body)).hexdigest()}


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its folder, whether it was already in the cache, and the seconds the build took now (0.0
    when cached; checking the hashes is not counted)."""

    path: Path
    cached: bool
    build_s: float


class DiskCache:
    """Records and artifacts under `root` (default: `default_root()`); see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"cache folder {str(self.root)!r} is a file, expected a folder")
        # artifact folder -> the stat of its files when their hashes last matched (this process only)
        self._checked: dict[Path, tuple] = {}

    # -- paths and locks ------------------------------------------------------------------------------------------

    def _folder(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _check_kind(kind: str) -> str:
        if not isinstance(kind, str) or not kind.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"kind must be a non-empty name of letters, digits, '-' and '_', got {kind!r}")
        return kind

    def record_path(self, kind: str, key: Mapping[str, Any]) -> Path:
        """Where the record of `key` lives (whether or not it exists)."""
        return self.root / "records" / self._check_kind(kind) / f"{key_digest(key)}.json"

    def artifact_path(self, kind: str, key: Mapping[str, Any]) -> Path:
        """The folder of the artifact of `key` (whether or not it exists)."""
        return self.root / "artifacts" / self._check_kind(kind) / key_digest(key)

    @contextlib.contextmanager
    def lock(self, kind: str, key: Mapping[str, Any]) -> Iterator[None]:
        """An exclusive flock for the entry of `key`, waited for; the OS drops it if the process dies."""
        import fcntl

        path = self._folder("locks") / f"{self._check_kind(kind)}-{key_digest(key)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock; the file stays (see fastdiff.distributed._FolderLock)

    # -- records --------------------------------------------------------------------------------------------------

    def get(self, kind: str, key: Mapping[str, Any]) -> Any:
        """The record stored under `key`, or None: absent, or failing its check (then it is removed)."""
        path = self.record_path(kind, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(data)
            ok = (
                isinstance(entry, dict)
                and entry.get("format") == FORMAT
                and entry.get("key") == json.loads(canonical_json(key))
                and entry == _sealed(entry["key"], entry.get("record"))
            )
        except (ValueError, KeyError):
            ok = False
        if not ok:
            log.warning("fastdiff cache: discarding the corrupt or foreign record %s", path)
            path.unlink(missing_ok=True)
            return None
        return entry["record"]

    def put(self, kind: str, key: Mapping[str, Any], record: Any) -> Path | None:
        """Store `record` (plain JSON data) under `key`, atomically; returns the file, or None when it could not be
        written (a full disk, a read-only cache): a record only saves the next run some planning, so the run that
        made it goes on, with a warning."""
        path = self.record_path(kind, key)
        data = canonical_json(_sealed(key, record))
        try:
            self._folder("records", kind)
            return write_bytes_atomic(path, data)
        except OSError as err:
            log.warning("fastdiff cache: could not write %s (%s); the next run plans again", path, err)
            return None

    def discard(self, kind: str, key: Mapping[str, Any]) -> None:
        """Remove the record of `key` (a no-op when there is none)."""
        self.record_path(kind, key).unlink(missing_ok=True)

    # -- artifacts ------------------------------------------------------------------------------------------------

    @staticmethod
    def _stamp(folder: Path) -> tuple:
        stats = ((p.name, p.stat()) for p in folder.iterdir())
        return tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for n, s in stats))

    def _valid_artifact(self, folder: Path, key: Mapping[str, Any]) -> bool:
        try:
            stamp = self._stamp(folder)
            if self._checked.get(folder) == stamp:
                return True
            self._checked.pop(folder, None)
            entry = json.loads((folder / ENTRY).read_bytes())
            files = entry["record"]
            if entry != _sealed(json.loads(canonical_json(key)), files) or not isinstance(files, dict):
                return False
            present = {name for name, *_ in stamp} - {ENTRY}
            if present != set(files) or any(file_sha256(folder / n) != d for n, d in files.items()):
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
        newest = max(s[2] for s in stamp)
        if newest <= time.time_ns() - STAMP_AGE_S * 1e9 and stamp == self._stamp(folder):
            self._checked[folder] = stamp
        return True

    def find_artifact(self, kind: str, key: Mapping[str, Any]) -> Path | None:
        """The folder of a valid artifact of `key`, or None (an invalid one is removed)."""
        folder = self.artifact_path(kind, key)
        if not folder.exists():
            return None
        with self.lock(kind, key):
            if self._valid_artifact(folder, key):
                return folder
            if folder.exists():
                log.warning("fastdiff cache: discarding the corrupt or incomplete artifact %s", folder)
                shutil.rmtree(folder, ignore_errors=True)
        return None

    def artifact(
        self,
        kind: str,
        key: Mapping[str, Any],
        build: Callable[[Path], None],
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Artifact:
        """The artifact of `key`: found valid in the cache, or built now by `build(folder)` (which writes its files
        into the empty `folder`, no subfolders), hashed and published atomically. An invalid entry is removed and
        built again. A failing build leaves nothing behind and its exception propagates."""
        folder = self.artifact_path(kind, key)
        parent = self._folder("artifacts", kind)
        with self.lock(kind, key):
            if folder.exists():
                if self._valid_artifact(folder, key):
                    return Artifact(folder, True, 0.0)
                log.warning("fastdiff cache: rebuilding the corrupt or incomplete artifact %s", folder)
                shutil.rmtree(folder, ignore_errors=True)
            work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.", suffix=".tmp"))
            try:
                start = clock()
                build(work)
                seconds = clock() - start
                files = {}
                for f in sorted(work.iterdir()):
                    if not f.is_file() or f.name == ENTRY:
                        raise ValueError(
                            f"an artifact build wrote {f.name!r}: only plain files, none named {ENTRY}"
                        )
                    files[f.name] = file_sha256(f)
                write_bytes_atomic(work / ENTRY, canonical_json(_sealed(key, files)))
                os.replace(work, folder)  # folder does not exist (removed above, under the lock)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return Artifact(folder, False, seconds)


def use_for_inductor(cache: DiskCache) -> Path | None:
    """Point torch inductor's cache (TORCHINDUCTOR_CACHE_DIR) into `cache`, unless the user set one; returns the
    folder set, or None when the user's setting was kept. Must run before inductor first compiles."""
    if os.environ.get(INDUCTOR_ENV):
        return None
    folder = cache._folder("inductor")
    os.environ[INDUCTOR_ENV] = str(folder)
    return folder

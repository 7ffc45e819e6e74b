"""Data-parallel sampling with torch.distributed: sharded, resumable, identical whatever the number of ranks.

The index range [0, num_samples) is cut into fixed shards (shard k holds samples [k*S, (k+1)*S)). Sample i starts
from noise drawn from its own generator seeded by (seed, i), and every later noise draw for it comes from the same
generator, so an image depends only on (settings, i): not on the number of ranks, the batch size, or which rank
made it. Missing shards are dealt round-robin to the ranks; each rank writes its shards itself (images never
travel through collectives) and rank 0 records their checksums in `manifest.json` after every round. Running the
same command again only makes the shards that are missing or fail their checksum; different settings are refused.

    torchrun --nproc-per-node 8 -m fastdiff sample --model digits --num-samples 50000 --batch-size 256 --out fid/
    fastdiff merge fid/ --out samples.npz
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastdiff.checks import check_device, check_dtype, check_int, first_weight
from fastdiff.engine.planner import BACKENDS, check_backend
from fastdiff.errors import BackendUnavailableError, FastdiffError, OptionError
from fastdiff.fingerprint import file_sha256, state_sha256, tensor_sha256
from fastdiff.guidance import check_guidance_scale
from fastdiff.output import MAX_SAMPLES, atomic_path, check_output_path, to_uint8, write_bytes_atomic
from fastdiff.pretrained import Pretrained, load_model, model_spec
from fastdiff.samplers import SAMPLERS, DDIMSampler, Sampler, build_sampler, infer_device

FORMAT = "fastdiff-shards-v1"
MANIFEST = "manifest.json"
# The merged file `fastdiff sample --out DIR/` writes at the end unless told otherwise.
MERGED = "samples.npz"
DEFAULT_SHARD_SIZE = 1024
# The lock file that a run holds (rank 0, an exclusive flock) from its first check to its last write.
LOCK = ".fastdiff.lock"
# Temporary files of fastdiff's own writes in a shard folder (fastdiff.output.atomic_path names them
# ".<name>.<8 random characters>.tmp"); only these are ever removed, and only under the lock.
_OWN_TEMP = re.compile(r"\.(shard-\d{5}\.npz|manifest\.json|samples\.npz)\.[a-z0-9_]{8}\.tmp")
_SHARD_NAME = re.compile(r"shard-\d+\.npz")
# Manifest keys that describe the run but do not change the samples, so they may differ on a resume.
INFO_KEYS = ("fastdiff_version",)


class ShardError(FastdiffError):
    """A shard folder cannot be used: unreadable manifest, missing or corrupt shards, foreign files."""


def shard_name(k: int) -> str:
    """File name of shard `k`."""
    return f"shard-{k:05d}.npz"


def shard_range(k: int, shard_size: int, num_samples: int) -> range:
    """The sample indices of shard `k`: [k * shard_size, (k + 1) * shard_size), cut at num_samples."""
    return range(k * shard_size, min((k + 1) * shard_size, num_samples))


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample `index`: seeded from (seed, index) through numpy's SeedSequence for good mixing."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# ---------------------------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class _Group:
    """This process's rank in the sampling job; collectives short-circuit on a single process."""

    rank: int
    world: int

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """`cuda` means this rank's GPU (torchrun's LOCAL_RANK) when no index is given."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: torch.device | str) -> _Group:
    """This process's (rank, world): an existing process group, one made from torchrun's environment, or one process.

    A group made here (NCCL for a CUDA device, gloo otherwise) is kept for later calls and destroyed at exit:
    destroying and re-making a group on the same store can hang in PyTorch (pytorch/pytorch#55967, #114585), so
    a script that samples several folders in a row must reuse it.
    """
    device = local_device(torch.device(device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return _Group(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or "RANK" not in os.environ:
        return _Group(0, 1)
    if not dist.is_available():
        raise FastdiffError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    atexit.register(_destroy_at_exit)
    return _Group(dist.get_rank(), dist.get_world_size())


def _rank0(group: _Group, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give every rank its result; an error is raised on every rank (none is left waiting)."""
    result: Any = None
    if group.rank == 0:
        try:
            result = fn()
        except Exception as err:  # shipped to the other ranks, then raised everywhere
            result = err
    result = group.broadcast(result)
    if isinstance(result, Exception):
        raise result
    return result


# ---------------------------------------------------------------------------------------------------------------
# Settings and the manifest


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_sha256(model: Any) -> str | None:
    """Fingerprint of the weights, so that a resume with a changed model is refused."""
    return state_sha256(model.state_dict()) if isinstance(model, torch.nn.Module) else None


def _model_config(model: Any) -> dict[str, Any] | None:
    """The architecture of a fastdiff model (the same weights in another architecture are another model)."""
    try:
        model_type, config = model_spec(model)
    except TypeError:  # not one of our models: its weights' hash is all we know
        return None
    return {"type": model_type, **config}


def _sampler_settings(sampler: Sampler) -> dict[str, Any]:
    table = sampler.table
    return {
        "kind": table.kind,
        "steps": len(table),
        "eta": sampler.eta if isinstance(sampler, DDIMSampler) else None,
        "clip": table.clip,
        "prediction_type": sampler.prediction_type,
        "table_sha256": tensor_sha256(table.coeffs, table.timesteps),
    }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    # The same weights under another name or path (a checkpoint moved or copied) are the same model.
    same_weights = a.get("model_sha256") is not None and a.get("model_sha256") == b.get("model_sha256")
    return [
        f"{k}: {a.get(k)!r} in the folder, {b.get(k)!r} now"
        for k in sorted(set(a) | set(b))
        if k not in INFO_KEYS
        and k not in ("shards", "backend")
        and a.get(k) != b.get(k)
        and not (k == "model" and same_weights)
    ]


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The checked manifest of shard folder `out_dir` (FileNotFoundError without one, ShardError if malformed)."""
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a shard folder written by fastdiff sample")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ShardError(f"{path} is not readable JSON: {str(err) or type(err).__name__}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    try:
        size, n = manifest["shard_size"], manifest["num_samples"]
        for name, value, high in (("num_samples", n, MAX_SAMPLES), ("shard_size", size, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high and value > high):
                raise ValueError(f"{name} must be an int in [1, {high or 'num_samples'}], got {value!r}")
        shape = manifest["image_shape"]
        if not (
            isinstance(shape, list)
            and len(shape) == 3
            and all(type(d) is int and 0 < d <= 1 << 16 for d in shape)
        ):
            raise ValueError(f"image_shape must be [H, W, C] of ints in [1, 65536], got {shape!r}")
        num_shards = math.ceil(n / size)
        seen = set()
        for r in manifest["shards"]:
            k = r["index"]
            if type(k) is not int or not 0 <= k < num_shards or k in seen:
                raise ValueError(f"shard index {k!r} is outside [0, {num_shards}) or repeated")
            seen.add(k)
            samples = shard_range(k, size, n)
            if (r["file"], r["start"], r["stop"]) != (shard_name(k), samples.start, samples.stop):
                raise ValueError(f"record {r} does not match shard {k}")
            if not isinstance(r["sha256"], str):
                raise TypeError("sha256 must be a string")
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{path} has a malformed shard list: {err}") from err
    return manifest


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "shards": sorted(manifest["shards"], key=lambda r: r["index"])}
    write_bytes_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


class _FolderLock:
    """An exclusive `flock` on DIR/.fastdiff.lock for as long as it is open: one run per shard folder.

    Rank 0 holds it for a whole torchrun job (the other ranks write only after rank 0's checks, and only their
    own shards), so the ranks of one run share it and a second run is refused. The OS drops it when the process
    dies, so a killed run never leaves the folder locked; the file itself is kept (removing it would let two
    runs lock two different files).
    """

    def __init__(self, out_dir: Path) -> None:
        import fcntl

        self.path = path = out_dir / LOCK
        for _ in range(3):
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise ShardError(
                    f"{out_dir} is in use by another fastdiff run (it holds {path}); wait for it to finish, or use "
                    "another folder"
                ) from None
            # A run that made the folder and failed before its first shard removes the lock file (`discard`):
            # a lock taken on that removed file is no lock; take the one now at the path.
            try:
                if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)
        raise ShardError(f"{out_dir}: its lock file {path} keeps being replaced; is another run removing it?")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Remove the lock file, then release it (a run waiting on the old file re-checks the path, see above)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.close()


def _check_folder(out_dir: Path, settings: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Refuse a folder that fastdiff did not make or that holds other settings; the records of a matching run.

    A shard folder is new, empty (but for our lock and temp files), or has our manifest. Reads only.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} is a file, expected a folder")
    if not out_dir.exists():
        if not out_dir.parent.is_dir():
            raise FileNotFoundError(f"folder {str(out_dir.parent)!r} (parent of out_dir) does not exist")
        return []
    strays = [
        p.name for p in (out_dir / MANIFEST, *out_dir.glob("shard-*.npz")) if p.exists() and not p.is_file()
    ]
    if strays:
        raise ShardError(f"out_dir {str(out_dir)!r}: {strays[0]} is a folder, where fastdiff writes a file")
    # One listing decides both "ours?" and "empty?": another run may write its manifest between two looks.
    entries = os.listdir(out_dir)
    if MANIFEST not in entries:
        foreign = sorted(p for p in entries if p != LOCK and not _OWN_TEMP.fullmatch(p))
        if any(_SHARD_NAME.fullmatch(p) for p in foreign):
            raise ShardError(
                f"out_dir {str(out_dir)!r} has shard files but no {MANIFEST}; refusing to mix samples"
            )
        if foreign:
            raise ShardError(
                f"out_dir {str(out_dir)!r} is a folder that fastdiff did not make (no {MANIFEST}) and is not empty "
                f"({len(foreign)} entries, e.g. {foreign[0]!r}); give a new or empty folder for the shards, or a "
                ".png / .npz file"
            )
        return []
    manifest = read_manifest(out_dir)
    diffs = [] if settings is None else _differences(manifest, settings)
    if diffs:
        raise ValueError(
            f"out_dir {str(out_dir)!r} holds samples made with different settings; use another folder or "
            f"the same settings. Differing fields: {'; '.join(diffs)}"
        )
    return list(manifest.get("shards", []))


def _check_merge_path(out_dir: Path, merge_path: Path) -> Path:
    """The merged file may not replace a file of the shard folder itself (a shard, the manifest, the lock)."""
    if merge_path.suffix != ".npz":
        raise ValueError(f"merge output must end in .npz, got {str(merge_path)!r}")
    inside = merge_path.parent.resolve() == out_dir.resolve()
    name = merge_path.name
    if inside and (name in (MANIFEST, LOCK) or _SHARD_NAME.fullmatch(name) or _OWN_TEMP.fullmatch(name)):
        raise ValueError(
            f"merge output {str(merge_path)!r} would replace a file of the shard folder; choose another name "
            f"(the default is {MERGED})"
        )
    if not inside or out_dir.is_dir():
        check_output_path(merge_path)
    return merge_path


@dataclass(frozen=True)
class _Opened:
    """A shard folder checked, created if needed and locked by `_open_out_dir` (rank 0)."""

    records: list[dict[str, Any]]  # the shards of a matching earlier run (unverified)
    backend: str | None  # the backend recorded by that run; None in a new folder
    fresh: bool  # no manifest before this run: the folder holds nothing of an earlier run
    created: bool  # this run made the folder


def _open_out_dir(
    out_dir: Path, settings: dict[str, Any], held: contextlib.ExitStack, merge_path: Path | None
) -> tuple[_Opened, _FolderLock]:
    """The preflight of every sampling run into a shard folder (`sample_to_dir`, and so `fastdiff sample --out
    DIR/`), on rank 0 before anything is loaded, planned, exported or compiled: refuse a file, a foreign or
    non-empty folder, another run's settings, a merge path inside the shard names or in a missing or
    unwritable folder, and a folder locked by another run; then create and lock the folder.

    Everything is checked before the folder is made or locked, so a refused run leaves it as it was; then again
    under the lock, which `held` keeps until the run ends. Only then are stale temp files of fastdiff's own
    writes removed (a killed run's; a live run would hold the lock). The backend is checked by `_pin_backend`.
    Returns what was found, and the lock (for `_discard`).
    """
    _check_folder(out_dir, settings)
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"out_dir {str(out_dir)!r} is not writable")
    lock = _FolderLock(out_dir)
    held.callback(lock.close)
    try:
        records = _check_folder(out_dir, settings)
        if merge_path is not None:
            check_output_path(merge_path)
    except BaseException:
        if created and os.listdir(out_dir) == [LOCK]:  # refused under the lock: leave no trace of this run
            _discard(out_dir, lock, created)
        raise
    for stale in os.listdir(out_dir):
        if _OWN_TEMP.fullmatch(stale):
            (out_dir / stale).unlink(missing_ok=True)
    manifest = out_dir / MANIFEST
    backend = read_manifest(out_dir).get("backend") if manifest.exists() else None
    return _Opened(records, backend, not manifest.exists(), created), lock


def _discard(out_dir: Path, lock: _FolderLock, created: bool) -> None:
    """Undo a run that failed before writing any shard into a folder that held nothing of an earlier run: its
    manifest, temp files and lock file, and the folder if this run made it. Nothing of value is lost, and a
    failed run (NaN weights, out of memory, a backend that cannot run) leaves no half-made shard folder that
    looks like a result. Shards that were written are kept (with the manifest that verifies them)."""
    if any(_SHARD_NAME.fullmatch(p) for p in os.listdir(out_dir)):
        return
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for stale in os.listdir(out_dir):
        if _OWN_TEMP.fullmatch(stale):
            (out_dir / stale).unlink(missing_ok=True)
    lock.discard()
    if created:
        with contextlib.suppress(OSError):  # another run may have started in it since the lock was removed
            out_dir.rmdir()


def _valid(out_dir: Path, record: Mapping[str, Any]) -> bool:
    path = out_dir / record["file"]
    try:
        return path.is_file() and file_sha256(path) == record["sha256"]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class _Model:
    denoiser: Any
    sample_shape: tuple[int, ...]
    num_classes: int | None
    schedule: Any
    name: str
    prediction_type: str | None = None  # a Pretrained's (its checkpoint's); None: not known


def _resolve_model(
    model: Any, device: torch.device, sample_shape: Sequence[int] | None, dtype: torch.dtype
) -> _Model:
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model = load_model(model, str(device), dtype=dtype)
    param = first_weight(model.model if isinstance(model, Pretrained) else model)
    if param is not None and param.dtype != dtype:
        have, want = (str(d).removeprefix("torch.") for d in (param.dtype, dtype))
        raise TypeError(
            f"dtype={want} but the model's weights are {have}: cast the model with .to(torch.{want}), or pass "
            f"dtype=torch.{have}"
        )
    if isinstance(model, Pretrained):
        return _Model(
            model.model, model.sample_shape, model.num_classes, model.schedule, name, model.prediction_type
        )
    if not callable(model):
        raise TypeError(
            f"model must be a model name, a Pretrained, or a denoiser, got {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if sample_shape is None and hasattr(config, "image_size"):
        sample_shape = (config.in_channels, config.image_size, config.image_size)
    if sample_shape is None:
        raise ValueError("sample_shape= (C, H, W) is needed for a denoiser that is not a fastdiff UNet")
    return _Model(model, tuple(int(s) for s in sample_shape), getattr(model, "num_classes", None), None, name)


def _resolve_sampler(sampler: Sampler | str, resolved: _Model, steps: int, eta: float) -> Sampler:
    """A sampler name built on the model's schedule for the model's prediction type (a checkpoint's
    `prediction_type`); a Sampler object as given, but refused if it reads the model's output as another type."""
    prediction = resolved.prediction_type
    if isinstance(sampler, Sampler):
        if prediction is not None and sampler.prediction_type != prediction:
            raise ValueError(
                f"sampler reads the model output as {sampler.prediction_type!r} but the model predicts "
                f"{prediction!r}: build the sampler with prediction_type={prediction!r}"
            )
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(
            f"sampler must be a fastdiff Sampler or one of {sorted(SAMPLERS)}, got {type(sampler).__name__}"
        )
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be a fastdiff Sampler or one of {sorted(SAMPLERS)}, got {sampler!r}")
    if resolved.schedule is None:
        raise ValueError(
            f"sampler={sampler!r} needs the model's schedule: pass a Sampler object for this model"
        )
    if prediction is None:
        return build_sampler(sampler, resolved.schedule, steps, eta=eta)
    try:
        return build_sampler(sampler, resolved.schedule, steps, eta=eta, prediction_type=prediction)
    except OptionError:
        raise
    except ValueError as err:
        raise ValueError(f"sampler={sampler!r} (model prediction_type {prediction!r}): {err}") from None


def _label_spec(
    class_labels: int | torch.Tensor | None, num_classes: int | None, num_samples: int
) -> tuple[Callable[[Sequence[int]], torch.Tensor] | None, Any]:
    """(labels of a list of sample indices, the manifest's description of the labels)."""
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class_labels: this model is not class-conditional")
        return None, None
    if class_labels is None:
        return (lambda idx: torch.tensor(idx) % num_classes), "cycle"
    if isinstance(class_labels, int) and not isinstance(class_labels, bool):
        if not 0 <= class_labels < num_classes:
            raise ValueError(f"class_labels must be in [0, {num_classes - 1}], got {class_labels}")
        return (lambda idx: torch.full((len(idx),), class_labels)), class_labels
    if isinstance(class_labels, torch.Tensor) and class_labels.shape == (num_samples,):
        labels = class_labels.detach().cpu().long()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be in [0, {num_classes - 1}]")
        return (lambda idx: labels[list(idx)]), f"sha256:{tensor_sha256(labels)}"
    raise TypeError(f"class_labels must be None (cycle), an int or a tensor of shape ({num_samples},)")


def _cond_spec(cond: Mapping[str, Any] | None, num_samples: int) -> dict[str, Any]:
    """Extra conditioning: tensors with a leading dimension of num_samples are per sample; recorded by hash."""
    spec = {}
    for key, value in (cond or {}).items():
        if key == "class_labels":
            raise ValueError("cond: give class labels with class_labels=, not cond=")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != num_samples:
            raise ValueError(f"cond[{key!r}] must be a tensor with a leading dimension of num_samples")
        spec[key] = f"sha256:{tensor_sha256(value)}"
    return spec


def _generate(
    resolved: _Model,
    sampler: Sampler,
    indices: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    labels_of: Callable[[Sequence[int]], torch.Tensor] | None,
    cond: Mapping[str, torch.Tensor] | None,
    guidance_scale: float,
    device: torch.device,
    dtype: torch.dtype,
    engine: Any,
) -> np.ndarray:
    """uint8 images (N, H, W, C) of the samples `indices`, in batches of `batch_size`."""
    from fastdiff.loop import randn
    from fastdiff.samplers import sample

    images = []
    for lo in range(0, len(indices), batch_size):
        idx = list(indices[lo : lo + batch_size])
        kwargs = {key: value[idx].to(device) for key, value in (cond or {}).items()}
        if labels_of is not None:
            kwargs["class_labels"] = labels_of(idx).to(device)
        shape = (len(idx), *resolved.sample_shape)
        gens = [sample_generator(seed, i) for i in idx]
        # x_T first from each sample's generator, as the loop would draw it, but in float32 whatever the dtype
        x_T = randn(shape, gens, device, torch.float32).to(dtype)
        call = {"x_T": x_T, "generator": gens, "cond": kwargs or None, "guidance_scale": guidance_scale}
        if engine is not None:
            x = engine.sample(shape, **call)
        else:
            x = sample(resolved.denoiser, sampler, shape, **call)
        images.append(to_uint8(x.float()))
    return np.concatenate(images)


def _write_shard(
    out_dir: Path, k: int, samples: range, images: np.ndarray, labels: torch.Tensor | None
) -> dict[str, Any]:
    """Write shard k atomically and return its manifest record."""
    buf = io.BytesIO()
    arrays = {"images": images, "indices": np.asarray(samples, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    write_bytes_atomic(out_dir / shard_name(k), data)
    return {
        "file": shard_name(k),
        "index": k,
        "start": samples.start,
        "stop": samples.stop,
        "sha256": _sha256_bytes(data),
    }


# What the manifest's "backend" says when the engine runs a denoiser other than the model (one accelerated by the
# caller, say): kernels that may round differently from the model's own.
_OWN_DENOISER = " with its own denoiser (e.g. accelerated)"
_LEGACY_BACKEND = re.compile(r"SamplingEngine\(backend=([\w-]+)[^)]*\)")


def _recorded_backend(recorded: Any) -> str | None:
    """The backend named by a manifest's "backend": fastdiff's backend names, "fastdiff.sample" or an engine's
    type; manifests written before the backend that ran was recorded say "SamplingEngine(backend=..., ...)", read here too (its
    "auto" did not say what ran: None)."""
    if not isinstance(recorded, str):
        return None
    legacy = _LEGACY_BACKEND.match(recorded)
    if legacy:
        name = legacy.group(1)
        return None if name == "auto" else name + recorded[legacy.end() :]
    return recorded


def _pin_backend(out_dir: Path, requested: str, recorded: Any, argument: str) -> str:
    """The backend this run uses: `requested`, or with "auto" the one recorded by the folder's earlier run, so
    that one folder's shards all come from one backend (backends may round differently by a uint8 level).
    An explicit backend other than the recorded one is refused naming both; `argument` names the caller's
    option (`backend` / `--backend`)."""
    if recorded is None:
        return requested
    name = _recorded_backend(recorded)
    where = f"out_dir {str(out_dir)!r}"
    if name is None:
        raise ValueError(
            f"{where} was made with {argument} auto by an older fastdiff that did not record which backend ran "
            f"({recorded!r}), so its shards cannot be continued without risking a mix of backends; use another folder"
        )
    base = name.split(" ")[0]
    if requested == "auto" and base in BACKENDS:
        return name
    if requested != name:
        hint = (
            f"resume with {argument} {base} (or auto, which keeps the folder's)"
            if base in BACKENDS
            else f"resume it the same way ({name})"
        )
        raise ValueError(
            f"{where} holds samples made with backend {name!r}; {argument} {requested!r} would mix backends (they "
            f"may round differently): {hint}, or use another folder"
        )
    return name


def _planned_engine(
    engine: Any,
    backend: str | None,
    recorded: Any,
    resolved: _Model,
    sampler: Sampler,
    device: torch.device,
    group: _Group,
    out_dir: Path,
    plan_call: dict[str, Any],
    on_plan: Callable[[str], None] | None,
) -> tuple[Any, str]:
    """(the engine that makes this run's images, or None for `fastdiff.sample`; the backend the manifest records).

    `backend` (a name) makes the engine here (as `fastdiff sample --backend` does); `engine` is the caller's.
    "auto" is pinned: to the folder's recorded backend on a resume, else to what rank 0's planner chooses (every
    rank and every batch shape then runs that backend, not a plan of its own). `plan_call`: the arguments of
    `engine.plan` for the first batch; `on_plan` gets the plan's line on rank 0.
    """
    from fastdiff.engine import SamplingEngine, engine_for

    argument = "backend"  # sample_to_dir's backend=, fastdiff sample's --backend
    if engine is None and backend is None:
        return None, _pin_backend(out_dir, "fastdiff.sample", recorded, "engine")
    own = ""
    if engine is not None:
        if not isinstance(engine, SamplingEngine):  # the caller's own engine: named by its type
            return engine, _pin_backend(out_dir, type(engine).__name__, recorded, "engine")
        backend = engine.backend
        own = _OWN_DENOISER if engine.denoiser is not resolved.denoiser else ""
        denoiser = engine.denoiser
    else:
        denoiser = resolved.denoiser
    pinned = _pin_backend(out_dir, backend + own if backend != "auto" else "auto", recorded, argument)
    name = pinned.removesuffix(_OWN_DENOISER)
    note = (
        "" if backend != "auto" or recorded is None else f" -- the folder's backend, kept by {argument} auto"
    )
    if name == "auto":
        # Rank 0 plans; the others run what it chose (planning every rank could choose differently).
        chosen: dict[str, Any] = {}

        def plan() -> str:
            runner = engine if engine is not None else SamplingEngine(denoiser, sampler, backend="auto")
            chosen["plan"] = runner.plan(**plan_call)
            return chosen["plan"].backend

        name = _rank0(group, plan)
        pinned = name + own
        if group.rank == 0:
            if on_plan is not None:
                on_plan(chosen["plan"].line())
            # the planner's runner for its choice: any batch shape runs the chosen backend
            return chosen["plan"].runner, pinned
    if engine is None or engine.backend != name:
        engine = engine_for(denoiser, sampler, device, backend=name)
    try:
        line = engine.plan(**plan_call).line()
    except BackendUnavailableError as err:
        if recorded is None:
            raise
        raise BackendUnavailableError(
            f"out_dir {str(out_dir)!r} was made with backend {name!r}, which cannot run here ({err}); resume it "
            "where it can, or use another folder"
        ) from None
    if on_plan is not None and group.rank == 0:
        on_plan(line + note)
    return engine, pinned


def sample_to_dir(
    model: Any,
    sampler: Sampler | str,
    num_samples: int,
    out_dir: str | os.PathLike,
    *,
    batch_size: int,
    seed: int,
    cond: Mapping[str, Any] | None = None,
    class_labels: int | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    shard_size: int | None = None,
    steps: int = 50,
    eta: float = 0.0,
    sample_shape: Sequence[int] | None = None,
    model_id: str | None = None,
    device: torch.device | str | None = None,
    engine: Any = None,
    merge_to: str | os.PathLike | None = None,
    on_shard: Callable[[int, Path], None] | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> Path:
    """Generate `num_samples` images into shard files under `out_dir`, on every rank of a torchrun job.

    `model` is a model name or .safetensors path (loaded on this rank's device), a `Pretrained`, or a denoiser
    (a fastdiff UNet, or any callable with `sample_shape=`). `sampler` is a Sampler, or a name of
    `fastdiff.samplers.SAMPLERS` with `steps`/`eta` on the model's schedule and for its `prediction_type` (a
    checkpoint's; a Sampler object for another prediction type is refused). Sample i's noise comes from `sample_generator(seed, i)`, so the images
    do not depend on the number of ranks or on `batch_size`. Class-conditional models get `class_labels`: None
    cycles `i % num_classes`, an int fixes one class, a tensor gives one label per sample; `cond` holds other
    per-sample conditioning tensors (leading dimension num_samples). Shard k holds samples
    [k * shard_size, (k + 1) * shard_size) (default shard size 1024). `engine` (e.g. a
    `fastdiff.SamplingEngine` around the same denoiser and sampler) replaces `fastdiff.sample`; or `backend` (a
    name of `fastdiff.engine.BACKENDS`) makes the engine here, as `fastdiff sample --backend` does, and
    `on_plan(line)` gets its plan's line on rank 0. The manifest records the backend that ran: "auto" is pinned
    to the planner's choice (one backend for every rank and batch) and, on a resume, to the folder's backend;
    another explicit backend than the folder's raises ValueError. Existing valid shards of the same settings are
    kept, missing or corrupt ones are redone, and other settings raise ValueError. The folder is checked, made
    and locked before anything is planned, exported or compiled; a run that fails before its first shard leaves
    no manifest behind (and no folder, if it made it).
    `merge_to` writes the merged .npz at the end (rank 0). `on_shard(k, path)` is called on every rank for each
    shard made in this call (by any rank), at the end of the round that made it. `dtype` (a floating-point
    torch.dtype) runs the model in it: a model given by name is cast, any other must already be; the noise is drawn
    in float32 either way. Returns `out_dir`.
    """
    from fastdiff import __version__

    check_int("num_samples", num_samples, 1, MAX_SAMPLES)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0, 2**63 - 1)
    shard_size = check_int("shard_size", DEFAULT_SHARD_SIZE if shard_size is None else shard_size, 1)
    guidance_scale = check_guidance_scale(guidance_scale)
    out_dir = Path(out_dir)
    merge_path = None if merge_to is None else _check_merge_path(out_dir, Path(merge_to))
    if engine is not None and backend is not None:
        raise ValueError("pass engine= (an engine of your own) or backend= (a name), not both")
    if backend is not None:
        check_backend(backend)
    if isinstance(model, str):
        device = local_device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    else:
        device = infer_device(model.model if isinstance(model, Pretrained) else model, None, device)
    check_device(local_device(device))
    check_dtype(dtype)
    group = init_distributed(device)
    resolved = _resolve_model(model, device, sample_shape, dtype)
    sampler = _resolve_sampler(sampler, resolved, steps, eta)
    if len(resolved.sample_shape) != 3:
        raise ValueError(f"sample_to_dir writes images (C, H, W); this model makes {resolved.sample_shape}")
    labels_of, labels_desc = _label_spec(class_labels, resolved.num_classes, num_samples)
    if guidance_scale != 1.0 and labels_of is None and not cond:
        raise ValueError("guidance_scale != 1 needs a conditional model (class labels or cond=)")
    c, h, w = resolved.sample_shape
    settings = {
        "format": FORMAT,
        "fastdiff_version": __version__,
        "model": model_id or resolved.name,
        "model_sha256": _model_sha256(resolved.denoiser),
        "model_config": _model_config(resolved.denoiser),
        "sampler": _sampler_settings(sampler),
        "seed": seed,
        "guidance_scale": float(guidance_scale),
        "class_labels": labels_desc,
        "cond": _cond_spec(cond, num_samples),
        "num_samples": num_samples,
        "shard_size": shard_size,
        "image_shape": [h, w, c],
        "dtype": str(dtype).removeprefix("torch."),
    }
    first = list(range(min(batch_size, num_samples)))
    plan_call = {
        "shape": (len(first), *resolved.sample_shape),
        "calls": max(1, num_samples // len(first) // group.world),
        "cond": {
            **{key: value[first].to(device) for key, value in (cond or {}).items()},
            **({} if labels_of is None else {"class_labels": labels_of(first).to(device)}),
        }
        or None,
        "guidance_scale": guidance_scale,
        "device": device,
        "dtype": dtype,
    }
    # Rank 0 holds the folder's lock from its checks until every rank is done (and the merge is written).
    with contextlib.ExitStack() as held:
        lock: list[_FolderLock] = []

        def preflight() -> _Opened:
            opened, folder_lock = _open_out_dir(out_dir, settings, held, merge_path)
            lock.append(folder_lock)
            return opened

        opened = _rank0(group, preflight)
        try:
            engine, settings["backend"] = _planned_engine(
                engine, backend, opened.backend, resolved, sampler, device, group, out_dir, plan_call, on_plan
            )
            _sample_shards(
                out_dir,
                settings,
                opened.records,
                group,
                resolved,
                sampler,
                labels_of=labels_of,
                cond=cond,
                engine=engine,
                batch_size=batch_size,
                seed=seed,
                guidance_scale=guidance_scale,
                device=device,
                dtype=dtype,
                progress=progress,
                on_shard=on_shard,
            )
            if merge_path is not None:
                _rank0(group, lambda: _merge(out_dir, merge_path))
        except BaseException:
            if lock and opened.fresh:
                with contextlib.suppress(OSError):  # the run's own error is the one to report
                    _discard(out_dir, lock[0], opened.created)
            raise
        group.barrier()
    return out_dir


def _sample_shards(
    out_dir: Path,
    settings: dict[str, Any],
    records: list[dict[str, Any]],
    group: _Group,
    resolved: _Model,
    sampler: Sampler,
    *,
    labels_of: Callable[[Sequence[int]], torch.Tensor] | None,
    cond: Mapping[str, torch.Tensor] | None,
    engine: Any,
    batch_size: int,
    seed: int,
    guidance_scale: float,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    on_shard: Callable[[int, Path], None] | None,
) -> None:
    """Verify the recorded shards, then make the missing ones round by round, recording each round's."""
    num_samples, shard_size = settings["num_samples"], settings["shard_size"]
    # Checksums are verified in parallel, each rank a slice; everyone then agrees on what is missing.
    checked = group.all_gather([r["index"] for r in records[group.rank :: group.world] if _valid(out_dir, r)])
    valid_ids = {k for part in checked for k in part}
    manifest = {**settings, "shards": [r for r in records if r["index"] in valid_ids]}
    if group.rank == 0:
        _write_manifest(out_dir, manifest)
    num_shards = math.ceil(num_samples / shard_size)
    pending = [k for k in range(num_shards) if k not in valid_ids]
    mine = pending[group.rank :: group.world]
    per_round = math.ceil(batch_size / shard_size)  # shards per round, so that batches can be full
    rounds = math.ceil(math.ceil(len(pending) / group.world) / per_round)
    bar = tqdm(
        total=num_samples,
        initial=num_samples - sum(len(shard_range(k, shard_size, num_samples)) for k in pending),
        unit="img",
        desc=f"{len(pending)} shards on {group.world} rank(s)",
        disable=not progress or group.rank != 0,
    )
    for r in range(rounds):
        chunk = mine[r * per_round : (r + 1) * per_round]
        indices = [i for k in chunk for i in shard_range(k, shard_size, num_samples)]
        written = []
        if chunk:
            images = _generate(
                resolved,
                sampler,
                indices,
                batch_size=batch_size,
                seed=seed,
                labels_of=labels_of,
                cond=cond,
                guidance_scale=guidance_scale,
                device=device,
                dtype=dtype,
                engine=engine,
            )
            for k in chunk:
                samples = shard_range(k, shard_size, num_samples)
                at = indices.index(samples.start)
                labels = None if labels_of is None else labels_of(list(samples))
                written.append(_write_shard(out_dir, k, samples, images[at : at + len(samples)], labels))
        new = sorted(
            (rec for part in group.all_gather(written) for rec in part), key=lambda rec: rec["index"]
        )
        if group.rank == 0:
            manifest["shards"].extend(new)
            _write_manifest(out_dir, manifest)
        bar.update(sum(rec["stop"] - rec["start"] for rec in new))
        if on_shard is not None:
            for rec in new:
                on_shard(rec["index"], out_dir / rec["file"])
    bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Merge


def _load_shard(
    out_dir: Path, record: Mapping[str, Any], image_shape: Sequence[int], *, verify: bool
) -> dict[str, np.ndarray]:
    path = out_dir / record["file"]
    if verify and not _valid(out_dir, record):
        raise ShardError(f"shard {path} is missing or fails its checksum; run the same sample command again")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    n = record["stop"] - record["start"]
    if arrays["images"].shape != (n, *image_shape) or not np.array_equal(
        arrays["indices"], np.arange(record["start"], record["stop"])
    ):
        raise ShardError(f"shard {path} does not hold samples [{record['start']}, {record['stop']})")
    return arrays


def _write_array(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, parts: Any) -> None:
    """One .npy member of an .npz, written part by part so that 50,000 images need not sit in memory twice."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


def merge(out_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Check that every shard of `out_dir` is present and valid, then write them in index order to one .npz.

    Keys: `images` (uint8 N x H x W x C), `arr_0` (the same array; the key of the ADM / guided-diffusion
    evaluation scripts) and `labels` for class-conditional samples. Written atomically, while holding the
    folder's lock (a folder that a run is still writing is refused).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"shard folder {str(out_dir)!r} is a file, expected a folder")
    if not out_dir.is_dir():
        raise FileNotFoundError(f"shard folder {str(out_dir)!r} does not exist")
    out_path = _check_merge_path(out_dir, Path(out_path))
    read_manifest(out_dir)  # not a shard folder: refused before the lock file is made
    # A folder this process cannot write, no run of it can write either: it is read without the lock.
    lock = _FolderLock(out_dir) if os.access(out_dir, os.W_OK) else None
    try:
        return _merge(out_dir, out_path)
    finally:
        if lock is not None:
            lock.close()


def _merge(out_dir: Path, out_path: Path) -> Path:
    """`merge` for a caller that holds the folder's lock."""
    manifest = read_manifest(out_dir)
    n, size = manifest["num_samples"], manifest["shard_size"]
    records = {r["index"]: r for r in manifest["shards"]}
    num_shards = math.ceil(n / size)
    if len(records) < num_shards:  # read_manifest checked that the indices are distinct and in range
        first = itertools.islice((k for k in range(num_shards) if k not in records), 5)
        shown = ", ".join(map(shard_name, first)) + (" ..." if num_shards - len(records) > 5 else "")
        raise ShardError(
            f"{out_dir}: {num_shards - len(records)} of {num_shards} shards are missing ({shown}); "
            "run the same sample command again to make them"
        )
    order = [records[k] for k in sorted(records)]
    shape = tuple(manifest["image_shape"])
    # Every checksum is checked before anything is written; the images are then read again, shard by shard.
    labels = [_load_shard(out_dir, r, shape, verify=True).get("labels") for r in order]

    def images() -> Iterator[np.ndarray]:
        for r in order:
            yield _load_shard(out_dir, r, shape, verify=False)["images"]

    with atomic_path(out_path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for key in ("images", "arr_0"):
            _write_array(zf, key, (n, *shape), np.dtype(np.uint8), images())
        if labels[0] is not None:
            _write_array(zf, "labels", (n,), np.dtype(np.int64), labels)
    return out_path


# ---------------------------------------------------------------------------------------------------------------
# Progress


def shard_counter(shard_size: int, num_samples: int) -> tuple[list[int], Callable[[int, Path], None]]:
    """A running count of the samples in the shards reported to `on_shard`."""
    made = [0]

    def on_shard(k: int, path: Path) -> None:
        made[0] += len(shard_range(k, shard_size, num_samples))

    return made, on_shard

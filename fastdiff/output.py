"""Writing results: atomic files, image conversion, PNG grids and .npz sample files."""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastdiff.errors import OutputError

# Upper bound of num_samples (sample_to_dir, `fastdiff sample --num-samples`, a shard manifest's claim).
MAX_SAMPLES = 10**8
# What atomic_path adds to a file name for its temporary file: "." + name + "." + 8 random characters + ".tmp".
TEMP_NAME_EXTRA = 14


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer for this file system
        return 255


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when `path` cannot be written: missing or read-only folder, a folder where
    a file is expected, or a name too long for its temporary name (see `atomic_path`)."""
    path = Path(path)
    if not str(path) or path.name in ("", ".", ".."):
        raise ValueError(f"output path {str(path)!r} is not a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"output folder {str(parent)!r} is a file, expected a folder")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {str(parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder, expected a file name")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder {str(parent)!r} is not writable")
    limit = _name_max(parent) - TEMP_NAME_EXTRA
    if len(os.fsencode(path.name)) > limit:
        raise ValueError(
            f"output file name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes long; at most {limit} "
            f"fit here (the file system's limit less {TEMP_NAME_EXTRA} for the temporary name)"
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error it is removed.

    Readers never see a half-written file, and a failed write leaves nothing behind. An OSError while writing
    the temporary file or renaming it (disk full, say) becomes an `OutputError` naming `path`.
    """
    path = check_output_path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should get the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        name = None if err.filename is None else os.path.basename(os.fsdecode(err.filename))
        if name is not None and name != path.name and not name.startswith(f".{path.name}."):
            raise  # about another file (an input read while writing), not this output
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] of shape (N, C, H, W) -> uint8 array (N, H, W, C), the layout FID tools expect."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, *, ncols: int | None = None, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*H', cols*W', C) picture, each enlarged `scale` times."""
    n, h, w, c = images.shape
    if n < 1:
        raise ValueError("no images to put in a grid")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png_grid(path: str | os.PathLike, images: torch.Tensor, *, ncols: int | None = None) -> Path:
    """Save a PNG grid of images in [-1, 1]; small images are enlarged so each cell is at least 32 pixels."""
    from PIL import Image

    arr = to_uint8(images)
    scale = max(1, math.ceil(32 / max(arr.shape[1], arr.shape[2])))
    grid = make_grid(arr, ncols=ncols, scale=scale)
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def save_npz(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Save `images` (uint8, N x H x W x C) and optional `labels` to an .npz file, atomically.

    Samples that are not images (N x D points of a toy model) are saved as they are, float32, under `samples`.
    """
    if images.dim() == 2:
        arrays = {"samples": images.detach().float().cpu().numpy()}
    else:
        arrays = {"images": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy().astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())

"""On-disk cache of decoded and resized images (``--image-cache DIR``).

Full-size radiographs (MIMIC-CXR JPEGs are ~2500 px) cost far more to decode than the
model costs to run on a 224 crop, and the resize before the random crop is deterministic,
so its uint8 output is cached as ``.npy``. An entry is keyed by the absolute source path,
its mtime and size, and the resize, so an edited image or another image size is a miss.

Writes go to a temporary file in the cache directory and are renamed into place
(``os.replace`` is atomic on one file system), so DDP ranks and DataLoader workers can
share one cache; the worst case of a race is the same entry computed twice. An entry that
cannot be read back (a crash mid-write on a file system without atomic rename, disk
corruption) is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cmn.data.images import load_image
from cmn.errors import DataError

_FORMAT_VERSION = "1"


class ImageCache:
    """Cache of resized RGB images under ``directory`` (created if missing)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self.directory}: cannot create image cache directory ({e.strerror})") from None

    def entry_path(self, source: str | Path, resize_key: str) -> Path:
        """Where the entry for ``source`` resized by ``resize_key`` lives (source must exist)."""
        source = Path(source).resolve()
        try:
            st = source.stat()
        except FileNotFoundError:
            raise DataError(f"{source}: image file not found") from None
        ident = f"{_FORMAT_VERSION}|{source}|{st.st_mtime_ns}|{st.st_size}|{resize_key}"
        digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()
        return self.directory / digest[:2] / f"{digest[2:34]}.npy"

    def get(self, source: str | Path, resize: Callable[[Image.Image], Image.Image], resize_key: str) -> Image.Image:
        """Return ``resize(load_image(source))`` as an RGB image, from the cache when possible."""
        entry = self.entry_path(source, resize_key)
        cached = _read_entry(entry)
        if cached is not None:
            return cached
        img = resize(load_image(source)).convert("RGB")
        _write_entry(entry, img)
        return img


def _read_entry(entry: Path) -> Image.Image | None:
    try:
        arr = np.load(entry, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # absent or unreadable: recompute
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        return None
    img = Image.fromarray(arr)  # grayscale entries are stored 2-D to save space
    return img.convert("RGB") if arr.ndim == 2 else img


def _write_entry(entry: Path, img: Image.Image) -> None:
    arr = np.asarray(img)  # (H, W, 3) uint8
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        arr = arr[..., 0]  # (H, W): radiographs are gray, a third of the bytes
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
    except OSError as e:
        raise DataError(f"{entry.parent}: cannot write to the image cache ({e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, entry)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{entry}: cannot write image cache entry ({e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

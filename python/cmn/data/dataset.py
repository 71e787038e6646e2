"""The report-generation dataset and its collate function.

Differences from the reference (IuxrayMultiImageDataset / MimiccxrSingleImageDataset):
- one class for both datasets: ``num_views`` (2 for IU X-Ray, 1 for MIMIC-CXR) and images
  always come as (V, 3, S, S), also for V = 1;
- every study is checked at construction (view count, image files exist), so a bad
  annotation fails before training starts, not hours into an epoch;
- reports are encoded once, in one batch call, instead of one Python call per study;
- a study with the wrong number of images is an error (the reference silently used the
  first image of a MIMIC-CXR study).
An image that exists but cannot be decoded is found only when it is read; that raises a
DataError naming the file and stops the run, because silently skipping a sample would
change the data the reported numbers were computed on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cmn.data.annotation import Study
from cmn.data.cache import ImageCache
from cmn.data.images import ImageTransform, load_image
from cmn.errors import DataError

# encode(reports, max_len) -> int64 (n, max_len): each [0, ids..., 0] cut to max_len, 0-padded.
BatchEncoder = Callable[[list[str], int], np.ndarray]

_MAX_LISTED = 5


class ReportDataset(Dataset):
    """Studies as model inputs.

    Item ``i`` is a dict:
      ``id``: str;
      ``images``: float32 (V, 3, S, S), ``transform`` applied to each view;
      with ``encode`` given, also ``targets``: int64 (L,), the encoded report
      ``[0, ids..., 0]`` cut to ``max_seq_length`` (unpadded), and ``mask``: float32 (L,) ones.

    ``ann_path`` only names the annotation file in error messages. ``image_cache``, when
    given, needs an :class:`ImageTransform` (from ``build_transform``), whose resize it caches.

    ``augment_seed``: random augmentation draws from a generator seeded by
    (augment_seed, epoch, index) when items are requested as ``(epoch, index)`` (see
    :class:`EpochSampler`), so an epoch's augmentations do not depend on the number of loader
    workers or on the process having been restarted: resuming is exact.
    """

    def __init__(
        self,
        studies: Sequence[Study],
        image_dir: str | Path,
        num_views: int,
        transform: Callable,
        encode: BatchEncoder | None = None,
        max_seq_length: int | None = None,
        image_cache: ImageCache | None = None,
        *,
        ann_path: str | Path | None = None,
        augment_seed: int | None = None,
    ):
        self.studies = list(studies)
        self.image_dir = Path(image_dir)
        self.num_views = num_views
        self.transform = transform
        self.image_cache = image_cache
        self.augment_seed = augment_seed
        source = f"{ann_path}: " if ann_path is not None else ""
        if image_cache is not None and not isinstance(transform, ImageTransform):
            raise TypeError("image_cache needs an ImageTransform from build_transform (it caches the resize step)")
        _check_views(self.studies, num_views, source)
        self.paths = [tuple(str(self.image_dir / p) for p in s.image_paths) for s in self.studies]
        _check_files_exist(self.paths, self.image_dir, source)
        self.targets: list[np.ndarray] | None = None
        if encode is not None:
            if max_seq_length is None or max_seq_length < 1:
                raise ValueError(f"max_seq_length must be a positive int with encode, got {max_seq_length}")
            self.targets = _encode_reports(encode, [s.report for s in self.studies], max_seq_length)

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        try:
            return self._item(key)
        except DataError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            # In a loader worker an exception comes back wrapped in a worker traceback; the item
            # carries the message instead and the main process raises it (see check_batch).
            return {"error": str(e)}

    def _item(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            epoch, index = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_item_seed(self.augment_seed or 0, epoch, index))
                views = [self._view(p) for p in self.paths[index]]  # V x (3, S, S)
        else:
            index = key
            views = [self._view(p) for p in self.paths[index]]  # V x (3, S, S)
        item = {"id": self.studies[index].id, "images": torch.stack(views, 0)}  # (V, 3, S, S)
        if self.targets is not None:
            targets = torch.from_numpy(self.targets[index])  # (L,) int64
            item["targets"] = targets
            item["mask"] = torch.ones(targets.shape[0], dtype=torch.float32)  # (L,)
        return item

    def _view(self, path: str) -> torch.Tensor:
        if self.image_cache is None:
            return self.transform(load_image(path))  # (3, S, S)
        tf = cast(ImageTransform, self.transform)  # checked in __init__ when there is a cache
        return tf.rest(self.image_cache.get(path, tf.resize, tf.resize_key))  # (3, S, S)

    def __repr__(self) -> str:
        return f"ReportDataset({len(self)} studies, {self.num_views} views, image_dir={str(self.image_dir)!r})"


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler):
    """Wraps a sampler with ``set_epoch`` (e.g. DistributedSampler) to yield ``(epoch, index)``
    keys, so :class:`ReportDataset` seeds each item's augmentation by epoch and index."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def _check_views(studies: Sequence[Study], num_views: int, source: str) -> None:
    for s in studies:
        if len(s.image_paths) != num_views:
            raise DataError(
                f"{source}study {s.id!r} has {len(s.image_paths)} image(s), expected {num_views} "
                f"(num_views is {num_views} for this dataset)"
            )


def _check_files_exist(paths: Sequence[tuple[str, ...]], image_dir: Path, source: str) -> None:
    if not image_dir.is_dir():
        raise DataError(f"{source}image directory {image_dir} not found")
    missing = [p for views in paths for p in views if not os.path.isfile(p)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise DataError(f"{source}{len(missing)} image file(s) not found under {image_dir}: {listed}")


def _encode_reports(encode: BatchEncoder, reports: list[str], max_len: int) -> list[np.ndarray]:
    padded = np.asarray(encode(reports, max_len), dtype=np.int64)  # (n, max_len)
    if padded.shape != (len(reports), max_len):
        raise ValueError(f"encode returned shape {padded.shape}, expected {(len(reports), max_len)}")
    # id 0 is BOS, EOS and padding, and never inside a report: a row's length is its
    # non-zero tokens plus BOS and EOS, unless the cut removed the EOS.
    lengths = np.minimum((padded != 0).sum(axis=1) + 2, max_len)  # (n,)
    return [row[:n].copy() for row, n in zip(padded, lengths)]


def check_batch(batch: dict) -> dict:
    """Raise the DataError an item of ``batch`` met while loading (one line, no worker traceback)."""
    if "error" in batch:
        raise DataError(batch["error"])
    return batch


def collate(batch: Sequence[dict]) -> dict:
    """Stack items of :class:`ReportDataset` into a batch.

    Returns ``ids`` list[str]; ``images`` float32 (B, V, 3, S, S); and, when the items have
    reports, ``targets`` int64 (B, T) zero-padded to the longest item and ``masks``
    float32 (B, T) with 1 on real tokens.
    """
    failed = next((item for item in batch if "error" in item), None)
    if failed is not None:
        return {"error": failed["error"]}
    out = {"ids": [item["id"] for item in batch], "images": torch.stack([item["images"] for item in batch], 0)}
    if "targets" in batch[0]:
        t_max = max(item["targets"].shape[0] for item in batch)
        targets = torch.zeros(len(batch), t_max, dtype=torch.int64)  # (B, T)
        masks = torch.zeros(len(batch), t_max, dtype=torch.float32)  # (B, T)
        for i, item in enumerate(batch):
            n = item["targets"].shape[0]
            targets[i, :n] = item["targets"]
            masks[i, :n] = item["mask"]
        out["targets"], out["masks"] = targets, masks
    return out

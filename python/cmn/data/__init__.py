"""Data: R2Gen annotation files, images and transforms, the dataset, the image cache, demo data.

Names are imported on first use (PEP 562), so ``cmn.data.annotation`` alone does not pull in
torch and torchvision (``cmn-prepare`` and ``cmn-eval`` start faster and smaller).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "SPLITS": "annotation",
    "Study": "annotation",
    "drop_empty_reports": "annotation",
    "is_empty_report": "annotation",
    "load_annotation": "annotation",
    "ImageCache": "cache",
    "ReportDataset": "dataset",
    "collate": "dataset",
    "IMAGENET_MEAN": "images",
    "IMAGENET_STD": "images",
    "ImageTransform": "images",
    "build_transform": "images",
    "load_image": "images",
    "resize_size": "images",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cmn.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cmn.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value

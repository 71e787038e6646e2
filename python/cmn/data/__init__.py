"""Data: R2Gen annotation files, images and transforms, the dataset, the image cache, demo data."""
from cmn.data.annotation import SPLITS, Study, drop_empty_reports, is_empty_report, load_annotation
from cmn.data.cache import ImageCache
from cmn.data.dataset import ReportDataset, collate
from cmn.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, build_transform, load_image, resize_size

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "ImageCache",
    "ImageTransform",
    "ReportDataset",
    "Study",
    "build_transform",
    "collate",
    "drop_empty_reports",
    "is_empty_report",
    "load_annotation",
    "load_image",
    "resize_size",
]

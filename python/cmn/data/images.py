"""Image loading with clear errors, and the reference's image transforms.

Transforms (as R2GenCMN, with the 224 crop generalised to ``image_size``):
  train: Resize(shorter side to round(size*256/224)), RandomCrop(size), RandomHorizontalFlip,
         ToTensor, Normalize(ImageNet mean/std)
  eval:  Resize((size, size)), ToTensor, Normalize(ImageNet mean/std)
The resize step is kept apart (``ImageTransform.resize``) so the optional image cache can
store its deterministic output and skip decoding large files every epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from cmn.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as an RGB PIL image.

    The whole file is decoded here (``img.load()``), so a truncated PNG or JPEG is a
    DataError naming the file now rather than a garbled image later. Pillow's
    ``LOAD_TRUNCATED_IMAGES`` is left False on purpose.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image too large to decode safely ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an image file") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError with a short reason.
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB 8-bit. Integer images deeper than 8 bits (16-bit PNGs of radiographs, often holding
    12 bits) are scaled by the bit depth their values use, not clipped at 255 (which is what
    ``convert("RGB")`` does to them)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode == "F":
            lo = float(arr.min()) if arr.size else 0.0
            arr = (arr - lo) / (top - lo) * 255.0 if top > lo else np.zeros_like(arr)
        else:
            bits = max(8, int(np.ceil(np.log2(top + 1.0)))) if top > 0 else 8
            arr = np.clip(arr, 0, None) * (255.0 / (2.0**bits - 1.0))
        img = Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_size(image_size: int) -> int:
    """Shorter-side size before the training crop: 256 for the reference's 224 crop."""
    return round(image_size * 256 / 224)


@dataclass(frozen=True)
class ImageTransform:
    """PIL RGB image -> float32 tensor (3, S, S): a deterministic resize, then the rest.

    ``resize_key`` names the resize exactly, so cached resized images are keyed by it.
    """

    resize: transforms.Resize
    rest: transforms.Compose
    resize_key: str

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.rest(self.resize(img))  # (3, S, S) float32


def build_transform(
    image_size: int, train: bool, hflip: bool = True, crop: bool = True, jitter: float = 0.0
) -> ImageTransform:
    """The reference's train (random crop + flip) or eval (square resize) transform.

    ``hflip=False`` leaves out the training flip (for data whose reports name sides).
    ``crop=False`` trains on the eval transform's square resize instead of a random crop of a
    larger resize, which shows training images 1.14x larger than evaluation images (for data
    whose reports state sizes). ``jitter`` > 0 scales each training image's brightness and
    contrast by factors drawn from [1 - jitter, 1 + jitter] (geometry untouched)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [transforms.RandomHorizontalFlip()] if train and hflip else []
    if train and jitter:
        augment.append(transforms.ColorJitter(brightness=jitter, contrast=jitter))
    if train and crop:
        short = resize_size(image_size)
        resize = transforms.Resize(short)
        rest = transforms.Compose([transforms.RandomCrop(image_size), *augment, *normalize])
        return ImageTransform(resize, rest, f"short{short}-bilinear")
    resize = transforms.Resize((image_size, image_size))
    return ImageTransform(resize, transforms.Compose([*augment, *normalize]), f"square{image_size}-bilinear")

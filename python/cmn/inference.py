"""Reports from image files with a loaded checkpoint: single study, many studies, batched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from PIL import Image

from cmn.errors import DataError

if TYPE_CHECKING:
    from cmn.checkpoint import Bundle

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
PathLike = Union[str, Path]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def group_studies(inputs: Sequence[PathLike], num_views: int) -> list[tuple[str, tuple[Path, ...]]]:
    """Turn command-line inputs into studies ``(id, view paths)``.

    - image files are taken in order, ``num_views`` consecutive files per study;
    - a folder holding image files is one study when ``num_views > 1`` (it must hold exactly
      ``num_views`` images, taken in name order), or one study per image when ``num_views == 1``;
    - a folder holding only sub-folders is one study per sub-folder (the R2Gen IU X-Ray layout).
    """
    studies: list[tuple[str, tuple[Path, ...]]] = []
    pending: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            images = _images_in(p)
            if images:
                if num_views == 1:
                    studies.extend((img.stem, (img,)) for img in images)
                elif len(images) == num_views:
                    studies.append((p.name, tuple(images)))
                else:
                    raise DataError(
                        f"{p}: a study folder needs exactly {num_views} images for this model, found {len(images)}"
                    )
            else:
                subdirs = sorted(d for d in p.iterdir() if d.is_dir())
                if not subdirs:
                    raise DataError(f"{p}: folder has no images and no study sub-folders")
                studies.extend(group_studies(subdirs, num_views))
        elif p.is_file():
            pending.append(p)
            if len(pending) == num_views:
                studies.append(
                    (pending[0].stem if num_views == 1 else pending[0].parent.name or pending[0].stem, tuple(pending))
                )
                pending = []
        else:
            raise DataError(f"{p}: no such image file or folder")
    if pending:
        raise DataError(
            f"this model reads {num_views} views per study, but {len(pending)} image file(s) are left over "
            f"({', '.join(map(str, pending))}); give the views of each study together"
        )
    return studies


def read_study_list(path: PathLike, num_views: int) -> list[tuple[str, tuple[Path, ...]]]:
    """Studies from a ``--list`` file: one study per line, its image paths separated by spaces."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--list {path}: cannot be read ({e})") from None
    studies: list[tuple[str, tuple[Path, ...]]] = []
    for n, line in enumerate(lines, 1):
        paths = line.split()
        if not paths:
            continue
        if len(paths) != num_views:
            raise DataError(
                f"--list {path}, line {n}: {len(paths)} image(s), but this model reads {num_views} per study"
            )
        try:
            studies.extend(group_studies(paths, num_views))
        except DataError as e:
            raise DataError(f"--list {path}, line {n}: {e}") from None
    return studies


def collect_studies(
    inputs: Sequence[PathLike], list_file: Optional[PathLike], num_views: int
) -> list[tuple[str, tuple[Path, ...]]]:
    """The studies of a command line: IMAGE arguments (:func:`group_studies`), then ``--list``."""
    studies = group_studies(inputs, num_views)
    if list_file:
        studies.extend(read_study_list(list_file, num_views))
    if not studies:
        raise DataError("no studies given: pass IMAGE paths or folders, or --list FILE")
    return studies


def load_study(bundle: Bundle, views: Sequence[PathLike]) -> tuple[torch.Tensor, list]:
    """One study's image files (or PIL images) -> the model's input (V, 3, S, S) float32 and the decoded
    RGB PIL images, with the image settings of ``bundle`` (from :func:`cmn.load_checkpoint`)."""
    from cmn.data.images import build_transform, load_image

    num_views, image_size = bundle.num_views, bundle.image_size
    if len(views) != num_views:
        raise DataError(f"study {list(map(str, views))}: this model reads {num_views} view(s), got {len(views)}")
    transform = build_transform(image_size, train=False)
    pictures = [v.convert("RGB") if isinstance(v, Image.Image) else load_image(v) for v in views]
    return torch.stack([transform(p) for p in pictures]), pictures  # (V, 3, S, S)


@torch.no_grad()
def generate_reports(
    bundle: Bundle,
    studies: Sequence[Sequence[PathLike]],
    *,
    beam_size: int = 3,
    block_ngram: int = 0,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
    max_len: Optional[int] = None,
    decode: str = "cmn",
) -> list[str]:
    """One report per study; each study is a list of image paths (``num_views`` of them).

    ``bundle`` comes from :func:`cmn.load_checkpoint` (model, tokenizer and image settings).
    """
    device = device or bundle.device
    reports: list[str] = []
    for start in range(0, len(studies), batch_size):
        chunk = studies[start : start + batch_size]
        images = torch.stack([load_study(bundle, views)[0] for views in chunk]).to(device)  # (B, V, 3, S, S)
        seqs = bundle.model.generate(
            images, beam_size=beam_size, block_ngram=block_ngram, max_len=max_len, decode=decode
        )
        reports.extend(bundle.tokenizer.decode(list(s)) for s in seqs)
    return reports

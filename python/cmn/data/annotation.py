"""R2Gen annotation files: parsing and validation.

The format is the one R2Gen/R2GenCMN ship for IU X-Ray and MIMIC-CXR::

    {"train": [{"id": "...", "report": "...", "image_path": ["a/0.png", ...], ...}, ...],
     "val": [...], "test": [...]}

``image_path`` entries are relative to the image directory. Entries may carry other keys
(MIMIC-CXR has ``study_id``, ``subject_id``, ``split``); they are ignored.

Differences from the reference: the reference indexes the JSON with no checks, so a
malformed file fails deep inside a DataLoader worker; here every structural problem is a
:class:`~cmn.errors.DataError` naming the file, split and entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cmn.errors import DataError

SPLITS = ("train", "val", "test")
_REQUIRED_KEYS = ("id", "report", "image_path")


@dataclass(frozen=True)
class Study:
    """One study: a report and the image files (relative to the image directory) it describes."""

    id: str
    report: str
    image_paths: tuple[str, ...]


def load_annotation(path: str | Path, splits: Sequence[str] = SPLITS, *, images: bool = True) -> dict[str, list[Study]]:
    """Read an R2Gen ``annotation.json`` and return ``{split: [Study, ...]}`` for ``splits``.

    ``images=False`` (reports only, e.g. for scoring) lets entries lack ``image_path``.
    Reports are returned raw (uncleaned, possibly empty); see :func:`drop_empty_reports`.
    Raises DataError naming the file and the cause for every structural problem.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object with the splits as keys, got {type(data).__name__}")
    result = {}
    for split in splits:
        if split not in data:
            present = ", ".join(sorted(map(repr, data))) or "none"
            raise DataError(f"{path}: split {split!r} is missing (splits present: {present})")
        result[split] = _parse_split(path, split, data[split], images)
    return result


def _read_json(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an annotation JSON file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _parse_split(path: Path, split: str, entries: object, images: bool = True) -> list[Study]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: split {split!r} must be a list of entries, got {type(entries).__name__}")
    studies = []
    first_index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: {split}[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: entry must be an object, got {type(entry).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in entry and (images or k != "image_path")]
        if missing and "id" in entry:
            where = f"{path}: {split}[{i}] (id {entry['id']!r})"
        if missing:
            raise DataError(f"{where}: entry lacks {', '.join(map(repr, missing))}")
        study_id, report, image_paths = entry["id"], entry["report"], entry.get("image_path", [])
        if not isinstance(study_id, (str, int)) or isinstance(study_id, bool):
            raise DataError(f"{where}: 'id' must be a string, got {type(study_id).__name__}")
        study_id = str(study_id)
        where = f"{path}: {split}[{i}] (id {study_id!r})"
        if not isinstance(report, str):
            raise DataError(f"{where}: 'report' must be a string, got {type(report).__name__}")
        if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
            raise DataError(f"{where}: 'image_path' must be a list of strings, got {image_paths!r:.80}")
        if study_id in first_index:
            raise DataError(f"{where}: duplicate id, first seen at {split}[{first_index[study_id]}]")
        first_index[study_id] = i
        studies.append(Study(study_id, report, tuple(image_paths)))
    return studies


def is_empty_report(cleaned: str) -> bool:
    """True when a cleaned report has no words (the IU X-Ray rules turn "" into " .")."""
    return not cleaned.replace(".", "").strip()


def drop_empty_reports(studies: Iterable[Study], clean_fn: Callable[[str], str]) -> tuple[list[Study], int]:
    """Drop studies whose report is empty after ``clean_fn``; return ``(kept, n_dropped)``.

    Policy: training and evaluation use only studies with a report, as the paper drops
    studies without a findings section; the caller warns with the count.
    """
    kept, n_dropped = [], 0
    for study in studies:
        if is_empty_report(clean_fn(study.report)):
            n_dropped += 1
        else:
            kept.append(study)
    return kept, n_dropped

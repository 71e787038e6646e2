"""What the three ``cmn-prepare`` sources share: the tally of kept and dropped studies, the
split rules, the output folder, the annotation writer and ``--check``.

An output folder holds ``annotation.json`` (R2Gen format), ``images/`` (the image root the
annotation's paths are relative to: a folder or a link to the source's image root) and
``dropped.tsv`` (every study or image left out, with the reason). The folder is built in a
temporary sibling and renamed into place when complete (:func:`cmn.fsutil.folder_writer`),
so an interrupted or failed run leaves no half-written output.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Union

from cmn.data.annotation import SPLITS, load_annotation
from cmn.errors import CMNError, DataError
from cmn.fsutil import remove_stale_temps

ANNOTATION = "annotation.json"
IMAGES = "images"
DROPPED = "dropped.tsv"
_MAX_WARNINGS = 20  # warnings printed one by one; the rest are counted
_STALE_TMP_S = 3600.0
SECTIONS = ("findings", "impression", "both")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}


class Tally:
    """Counts what a run keeps and drops, and says why.

    ``unit`` names what is counted ("studies", "images"). Warnings (a skipped file, a missing
    image) go to stderr one line each, up to a limit, and are counted; ``strict`` turns the
    first one into an error instead.
    """

    def __init__(self, unit: str, strict: bool = False):
        self.unit = unit
        self.strict = strict
        self.kept: Counter[str] = Counter()  # split -> count
        self.dropped: Counter[str] = Counter()  # reason -> count
        self.dropped_rows: list[tuple[str, str]] = []  # (name, reason)
        self.notes: Counter[str] = Counter()  # things kept but worth saying (extra images used or not)
        self.warnings: Counter[str] = Counter()  # kind -> count
        self._printed = 0

    def keep(self, split: str) -> None:
        self.kept[split] += 1

    def drop(self, name: str, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_rows.append((name, reason))

    def note(self, what: str) -> None:
        self.notes[what] += 1

    def warn(self, kind: str, message: str) -> None:
        """A problem with one input that the run can skip; an error under ``--strict``."""
        if self.strict:
            raise DataError(f"{message} (--strict)")
        self.warnings[kind] += 1
        if self._printed < _MAX_WARNINGS:
            print(f"warning: {message}; skipped", file=sys.stderr)
        elif self._printed == _MAX_WARNINGS:
            print("warning: more warnings follow; only their count is shown", file=sys.stderr)
        self._printed += 1

    def write_dropped(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("name\treason\n")
            for name, reason in self.dropped_rows:
                f.write(f"{name}\t{reason}\n")

    def summary(self, source: str) -> list[str]:
        total_kept = sum(self.kept.values())
        lines = [f"{source}: kept {total_kept} {self.unit} ({', '.join(f'{s} {self.kept[s]}' for s in SPLITS)})"]
        if self.dropped:
            lines.append(f"dropped {sum(self.dropped.values())} {self.unit}:")
            lines += [f"  {n:>8}  {reason}" for reason, n in self.dropped.most_common()]
        else:
            lines.append(f"dropped 0 {self.unit}")
        lines += [f"note: {n} {what}" for what, n in self.notes.most_common()]
        lines += [f"warnings: {n} {kind}" for kind, n in self.warnings.most_common()]
        empty = [s for s in SPLITS if not self.kept[s]]
        if total_kept and empty:
            lines.append(f"warning: split(s) {', '.join(empty)} are empty; cmn-train needs studies in every split")
        return lines


def missing_text_reason(section: str, impression_fallback: bool) -> str:
    """Why a report without text for ``--section`` is dropped."""
    if section == "findings":
        return "no findings or impression" if impression_fallback else "no findings"
    return "no impression" if section == "impression" else "no findings or impression"


# ---- splits ---------------------------------------------------------------------------------
def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) sizes for ``n`` studies; with 3 or more studies every split with a
    non-zero fraction gets at least one, taken from train."""
    _, f_val, f_test = fractions
    n_val, n_test = round(n * f_val), round(n * f_test)
    if n >= 3:
        n_val = max(n_val, 1) if f_val > 0 else n_val
        n_test = max(n_test, 1) if f_test > 0 else n_test
    n_val, n_test = min(n_val, n), min(n_test, n - min(n_val, n))
    return n - n_val - n_test, n_val, n_test


def seeded_split(ids: Iterable[str], seed: int, fractions: Sequence[float]) -> dict[str, str]:
    """``{id: split}``: the ids sorted, shuffled with ``random.Random(seed)``, then cut into
    train, val and test by ``fractions``. The same ids and seed always give the same split,
    whatever order the ids come in."""
    order = sorted(set(ids))
    random.Random(seed).shuffle(order)
    n_train, n_val, _ = split_counts(len(order), fractions)
    return {sid: ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, sid in enumerate(order)}


@dataclass(frozen=True)
class SplitFrom:
    """The split of an existing annotation: ``split[id]`` and each id's position in its file."""

    path: Path
    split: Mapping[str, str]
    position: Mapping[str, int]


def read_split_from(path: Path) -> SplitFrom:
    """Read another R2Gen annotation (validated by cmn's own loader) for ``--split-from``."""
    studies = load_annotation(path)
    split: dict[str, str] = {}
    position: dict[str, int] = {}
    for name in SPLITS:
        for study in studies[name]:
            if study.id in split:
                raise DataError(f"{path}: id {study.id!r} is in both {split[study.id]!r} and {name!r}")
            split[study.id] = name
            position[study.id] = len(position)
    return SplitFrom(path, split, position)


def split_value(text: str, where: str) -> str:
    split = SPLIT_ALIASES.get(text.strip().lower())
    if split is None:
        raise DataError(f"{where}: split {text!r} is not one of train, val (validate), test")
    return split


# ---- input files ----------------------------------------------------------------------------
def open_text(path: Path) -> IO[str]:
    """A UTF-8 text file, gzipped or not (told apart by the gzip magic bytes), for the csv module."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        # handed to the reader, closed by it
        raw: Union[gzip.GzipFile, io.BufferedReader]
        if magic == b"\x1f\x8b":
            raw = gzip.open(path, "rb")  # noqa: SIM115
        else:
            raw = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for each data row of a CSV file (gzipped or plain, UTF-8).

    A missing column, text that is not UTF-8, a damaged gzip stream or a malformed row is a
    DataError naming the file (and the line where it is known)."""
    line = 0
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})"
                )
            for row in reader:
                line = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}: line {line}: {len(columns)} columns expected")
                yield line, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} after line {line})") from None
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: damaged or truncated file after line {line} ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: line {line + 1}: not valid CSV ({e})") from None


def count_csv_rows(path: Path) -> Optional[int]:
    """Data rows of a CSV file, for a progress bar's total (None when it cannot be read)."""
    try:
        with open_text(path) as f:
            return max(sum(1 for _ in f) - 1, 0)
    except (OSError, EOFError, UnicodeDecodeError):
        return None


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: Optional[int] = None, unit: str = " files"):
    """A tqdm bar on stderr (hidden when not a terminal or when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if enabled else True,
        leave=False,
    )


# ---- output folder -------------------------------------------------------------------------
def check_output_target(out: Path, force: bool, inputs: Mapping[str, Optional[Path]]) -> None:
    """Refuse, before any work, a missing input (``{flag: path}``), an output that exists
    (without ``--force``), that does not look like a cmn-prepare output (with it), or that
    holds one of the inputs."""
    out_abs = Path(os.path.abspath(out))
    for flag, p in inputs.items():
        if p is None:
            continue
        if not p.exists():
            raise DataError(f"{flag} {p}: not found")
        p_abs = Path(os.path.abspath(p))
        if p_abs == out_abs or out_abs in p_abs.parents:
            raise CMNError(f"--output {out}: holds the input {p}; choose another folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CMNError(f"--output {out}: exists and is not a folder")
    if out.is_dir():
        if not force:
            raise CMNError(f"--output {out}: already exists (pass --force to replace it)")
        if any(out.iterdir()) and not (out / ANNOTATION).is_file():
            raise CMNError(
                f"--output {out}: not a cmn-prepare output (no {ANNOTATION}); "
                "refusing to replace it, remove it yourself"
            )
    remove_stale_temps(out, older_than_s=_STALE_TMP_S)


def link_images(folder: Path, image_root: Path) -> None:
    """``folder/images`` as a link to ``image_root`` (absolute), so the output folder is used
    like any other: ``--image-dir OUT/images``."""
    try:
        os.symlink(os.path.abspath(image_root), folder / IMAGES, target_is_directory=True)
    except OSError as e:
        raise CMNError(f"{folder.name}/{IMAGES}: cannot link to {image_root} ({e.strerror or e})") from None


class AnnotationWriter:
    """Writes ``annotation.json`` entry by entry, with bounded memory; a context manager.

    Entries arrive in any split order; each split goes to its own part file and the parts are
    joined into one R2Gen JSON object (``{"train": [...], "val": [...], "test": [...]}``,
    one entry per line, keys sorted) when the block ends without an error.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts: Counter[str] = Counter()
        self._parts: dict[str, IO[str]] = {}
        for s in SPLITS:
            self._parts[s] = open(folder / f".{s}.part", "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> AnnotationWriter:
        return self

    def add(self, entry: Mapping) -> None:
        split = entry["split"]
        f = self._parts[split]
        if self.counts[split]:
            f.write(",\n")
        f.write(json.dumps(entry, sort_keys=True, ensure_ascii=False))
        self.counts[split] += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        for part in self._parts.values():
            part.close()
        if exc_type is None:
            self._join()
        for part in self._parts.values():
            os.unlink(part.name)

    def _join(self) -> None:
        with open(self.folder / ANNOTATION, "w", encoding="utf-8") as out:
            out.write("{")
            for i, split in enumerate(SPLITS):
                out.write(f'{"," if i else ""}\n"{split}": [\n')
                with open(self._parts[split].name, encoding="utf-8") as f:
                    while chunk := f.read(1 << 20):
                        out.write(chunk)
                out.write("\n]")
            out.write("\n}\n")


# ---- --check -------------------------------------------------------------------------------
def check_output(out: Path, num_views: int, *, enabled_progress: bool = False) -> list[str]:
    """Verify ``out/annotation.json`` against ``out/images`` and return the summary lines.

    Checks what cmn-train needs before it starts: the file passes cmn's annotation loader, no
    id is in two splits, every study has ``num_views`` images, every image file exists under
    ``out/images`` and has a readable image header. Problems are one DataError listing the
    first few and their count."""
    from PIL import Image, UnidentifiedImageError

    ann, image_dir = out / ANNOTATION, out / IMAGES
    if not ann.is_file():
        raise DataError(f"--check: {ann} not found")
    if not image_dir.is_dir():
        raise DataError(f"--check: image folder {image_dir} not found")
    studies = load_annotation(ann)
    problems: list[str] = []
    seen: dict[str, str] = {}
    n_images = 0
    items = [(split, i, s) for split in SPLITS for i, s in enumerate(studies[split])]
    for split, i, study in progress(items, enabled=enabled_progress, desc="check", unit=" studies"):
        where = f"{split}[{i}] (id {study.id!r})"
        if study.id in seen:
            problems.append(f"{where}: id also in {seen[study.id]!r}")
        seen.setdefault(study.id, split)
        if len(study.image_paths) != num_views:
            problems.append(f"{where}: {len(study.image_paths)} image(s), expected {num_views}")
        for rel in study.image_paths:
            n_images += 1
            path = image_dir / rel
            if not path.is_file():
                problems.append(f"{where}: {rel} not found under {image_dir}")
                continue
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                problems.append(f"{where}: {rel} is not a readable image ({e})")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise DataError(f"{ann}: {len(problems)} problem(s): {shown}")
    counts = ", ".join(f"{s} {len(studies[s])}" for s in SPLITS)
    return [f"{ann}: ok: {counts} entries, {n_images} image files found under {image_dir}"]


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)

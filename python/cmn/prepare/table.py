"""A user's own studies from a CSV table: the documented way in for private data.

One row per study (UTF-8, header row, optionally gzipped). Columns (names configurable):

- ``id``: unique study id;
- ``report``: the report text (the findings, for a model comparable to the paper's);
- ``image_path``: the image file(s), relative to ``--image-root`` (or absolute inside it);
  one column with several paths separated by ``;`` (``--separator``), or several columns
  (``--image-columns frontal,lateral``), each cell one or more paths;
- ``split`` (optional): train, val (or validate) or test; without the column a seeded
  70/10/20 split is drawn.

The ``--preset`` is the ``cmn-train --dataset`` the data is for: ``iu_xray`` takes two images
per study, ``mimic_cxr`` one; a study with fewer is dropped, one with more uses the first.
A path that leaves ``--image-root`` (``../``), a missing column, a duplicate id or text that
is not UTF-8 stops the run with one error naming the file and line.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cmn.data.annotation import is_empty_report
from cmn.errors import DataError
from cmn.fsutil import folder_writer
from cmn.prepare.common import (
    IMAGES,
    AnnotationWriter,
    Tally,
    check_output_target,
    link_images,
    progress,
    read_csv,
    seeded_split,
    split_value,
)

PRESET_VIEWS = {"iu_xray": 2, "mimic_cxr": 1}


@dataclass(frozen=True)
class TableOptions:
    table: Path
    image_root: Path
    output: Path
    preset: str = "iu_xray"
    id_column: str = "id"
    report_column: str = "report"
    image_columns: tuple[str, ...] = ("image_path",)
    separator: str = ";"
    split_column: Optional[str] = None  # None: use a "split" column when there is one
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    copy_images: bool = False
    strict: bool = False
    force: bool = False
    progress: bool = True


def relative_to_root(root: Path, path: str) -> Optional[str]:
    """``path`` (relative to ``root``, or absolute) as a POSIX path relative to ``root``;
    None when it leaves ``root``. Decided on the text of the path, so a link inside the root
    that points elsewhere is allowed."""
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, path))
    rel = os.path.relpath(full, base)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return Path(rel).as_posix()


@dataclass(frozen=True)
class _Row:
    id: str
    report: str
    images: tuple[str, ...]  # relative to the image root
    split: Optional[str]


def prepare(opts: TableOptions) -> list[str]:
    """Build ``opts.output`` (annotation.json, images, dropped.tsv); return the summary lines."""
    from cmn.text import clean_reports

    num_views = PRESET_VIEWS[opts.preset]
    check_output_target(opts.output, opts.force, {"--table": opts.table, "--image-root": opts.image_root})
    if not opts.image_root.is_dir():
        raise DataError(f"--image-root {opts.image_root}: folder not found")
    tally = Tally("studies", strict=opts.strict)
    required = [opts.id_column, opts.report_column, *opts.image_columns]
    if opts.split_column:
        required.append(opts.split_column)
    first_line: dict[str, int] = {}
    candidates: list[_Row] = []
    split_column = opts.split_column
    for line, row in progress(read_csv(opts.table, required), enabled=opts.progress, desc="rows", unit=" rows"):
        where = f"{opts.table}: line {line}"
        if split_column is None and not first_line:
            split_column = "split" if "split" in row else ""
        sid = row[opts.id_column].strip()
        if not sid:
            raise DataError(f"{where}: empty {opts.id_column!r}")
        if sid in first_line:
            raise DataError(f"{where}: duplicate id {sid!r} (first on line {first_line[sid]})")
        first_line[sid] = line
        split = split_value(row[split_column], where) if split_column else None
        paths = [p.strip() for col in opts.image_columns for p in row[col].split(opts.separator) if p.strip()]
        images = []
        for p in paths:
            rel = relative_to_root(opts.image_root, p)
            if rel is None:
                raise DataError(f"{where}: image path {p!r} is outside --image-root {opts.image_root}")
            images.append(rel)
        report = row[opts.report_column].strip()
        if not report:
            tally.drop(sid, "no report")
            continue
        if len(images) < num_views:
            tally.drop(sid, f"fewer than {num_views} image(s) ({opts.preset} takes {num_views})")
            continue
        if len(images) > num_views:
            tally.note(f"studies with more than {num_views} image(s) (the first {num_views} are used)")
        used = tuple(images[:num_views])
        missing = [rel for rel in used if not (opts.image_root / rel).is_file()]
        if missing:
            for rel in missing:
                tally.warn("image files not found", f"{where}: image {rel} not found under {opts.image_root}")
            tally.drop(sid, "missing image")
            continue
        candidates.append(_Row(sid, report, used, split))
    if not first_line:
        raise DataError(f"{opts.table}: no rows")

    rule = "mimic_cxr" if opts.preset == "mimic_cxr" else "iu_xray"
    kept = []
    for row, clean in zip(candidates, clean_reports([r.report for r in candidates], rule)):
        if is_empty_report(clean):
            tally.drop(row.id, "empty after cleaning")
        else:
            kept.append(row)
    drawn = seeded_split((r.id for r in kept), opts.seed, opts.fractions) if not split_column else {}

    with folder_writer(opts.output, replace=opts.force) as tmp:
        with AnnotationWriter(tmp) as writer:
            for row in kept:
                split = row.split or drawn[row.id]
                writer.add({"id": row.id, "report": row.report, "image_path": list(row.images), "split": split})
                tally.keep(split)
                if opts.copy_images:
                    for rel in row.images:
                        (tmp / IMAGES / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(opts.image_root / rel, tmp / IMAGES / rel)
        if opts.copy_images:
            (tmp / IMAGES).mkdir(exist_ok=True)
        else:
            link_images(tmp, opts.image_root)
        tally.write_dropped(tmp / "dropped.tsv")

    lines = tally.summary("csv")
    how = "copies of the images" if opts.copy_images else f"a link to {opts.image_root}"
    lines.append(f"wrote {opts.output}/annotation.json, {opts.output}/{IMAGES} ({how}), and {opts.output}/dropped.tsv")
    lines.append(
        f"train: cmn-train --dataset {opts.preset} --ann-path {opts.output}/annotation.json "
        f"--image-dir {opts.output}/{IMAGES}"
    )
    return lines

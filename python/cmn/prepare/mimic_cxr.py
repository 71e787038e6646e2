"""MIMIC-CXR from the PhysioNet files: the reports (``mimic-cxr-reports.zip`` with
``files/p10/p10000032/s50414267.txt``), the official split (``mimic-cxr-2.0.0-split.csv.gz``:
dicom_id, study_id, subject_id, split), optionally the metadata
(``mimic-cxr-2.0.0-metadata.csv.gz``, for ``ViewPosition``) and the MIMIC-CXR-JPG images
(``files/p10/p10000032/s50414267/<dicom_id>.jpg``).

The output follows the published R2Gen MIMIC-CXR annotation: one entry per image (dicom) of
the split file, ``{"id": dicom_id, "study_id": int, "subject_id": int, "report": ...,
"image_path": ["p10/p10000032/s50414267/<dicom_id>.jpg"], "split": "train"|"val"|"test"}``,
in the split file's order, the split file's ``validate`` written as ``val``.

Sections are found the way MIT-LCP's ``txt/section_parser.py`` (mimic-cxr repository) finds
them, and the report is the text of the *last* section named findings, as its
``create_section_files.py`` writes to ``mimic_cxr_sectioned.csv``; the lines of that text are
joined with one space. Differences from MIT-LCP: its script sets 54 hand-picked studies apart
(it stores only a hand-cut conclusion for them, so they have no findings there); here they
are sectioned like every other report. Only findings and impression are used, so section
names are normalised only as far as deciding which sections those are.

Memory stays bounded: the split file is read as a stream, one report is read at a time from
the zip (by name, random access) and entries go to disk as they are made; only the metadata's
view of each image is held, when ``--views`` is given.
"""

from __future__ import annotations

import re
import zipfile
import zlib
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
    count_csv_rows,
    link_images,
    missing_text_reason,
    progress,
    read_csv,
    split_value,
)

NUM_VIEWS = 1
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
# Section names that MIT-LCP's normaliser maps to impression / findings although they do not
# contain the word (a synonym and the misspellings found in MIMIC-CXR).
_IMPRESSION_NAMES = frozenset(
    {
        "conclusion",
        "ndication",
        "impresson",
        "imprression",
        "imoression",
        "impressoin",
        "imprssion",
        "impresion",
        "imperssion",
        "mpression",
        "impession",
    }
)
_FINDINGS_NAMES = frozenset({"finding", "findins", "findindgs", "findgings", "findngs", "findnings", "finidngs"})
# Headers that name the main sections, checked in this order (a name with two of them takes the first).
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# A header that describes the whole examination ("CHEST, PA AND LATERAL") opens the findings.
_VIEW_WORDS = (
    "chest",
    "portable",
    "pa and lateral",
    "lateral and pa",
    "ap and lateral",
    "lateral and ap",
    "frontal and",
    "two views",
    "frontal view",
    "pa view",
    "ap view",
    "one view",
    "lateral view",
    "bone window",
    "frontal upright",
    "frontal semi-upright",
    "ribs",
    "pa and lat",
)
_REPORT_NAME = re.compile(r"^(.*?)p\d\d/p\d+/s\d+\.txt$")


def section_name(header: str) -> str:
    """The normalised name of a section header (only findings and impression matter here)."""
    name = header.lower().strip()
    if name in _IMPRESSION_NAMES:
        return "impression"
    if name in _FINDINGS_NAMES:
        return "findings"
    for main in _MAIN_SECTIONS:
        if main in name:
            return main
    if any(w in name for w in _VIEW_WORDS):
        return "findings"
    return name


def split_sections(text: str) -> list[tuple[str, str]]:
    """``[(name, text), ...]`` of a MIMIC-CXR report, as MIT-LCP's ``section_text``.

    A header is an upper-case name and a colon after a newline and one space; a section runs
    to the next header, which cannot be on the section's first line. Text before the first
    header is the ``preamble``; a report without headers is one ``full report`` section. Empty
    findings and impression sections are dropped; a report with neither gets a
    ``last_paragraph`` section: its last section's text after the first blank line."""
    m = _HEADER.search(text)
    if m is None:
        parts = [("full report", text)]
    else:
        parts = [("preamble", text[: m.start(1)])]
        while m is not None:
            header, start = m.group(1), m.end()
            line_end = text.find("\n", start)
            m = _HEADER.search(text, start if line_end < 0 else line_end)
            parts.append((section_name(header), text[start : len(text) if m is None else m.start()]))
    parts = [(n, t) for n, t in parts if not (n in ("findings", "impression") and not t.strip())]
    if not any(n in ("findings", "impression") for n, _ in parts):
        name, last = parts[-1]
        first, sep, rest = last.partition("\n \n")
        if sep:
            parts[-1] = (name, first)
            parts.append(("last_paragraph", rest))
    return parts


def _last(parts: list[tuple[str, str]], name: str) -> str:
    for n, t in reversed(parts):
        if n == name:
            return t.strip()
    return ""


def one_line(text: str) -> str:
    """The report's lines joined by one space (each line's own leading/trailing space dropped)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def report_text(text: str, section: str, impression_fallback: bool = False) -> str:
    """FINDINGS (the last findings section), IMPRESSION, or both joined by a space; with
    ``impression_fallback`` a report without findings uses its impression."""
    parts = split_sections(text)
    findings, impression = one_line(_last(parts, "findings")), one_line(_last(parts, "impression"))
    if section == "findings":
        return findings or (impression if impression_fallback else "")
    if section == "impression":
        return impression
    return " ".join(t for t in (findings, impression) if t)


class ReportStore:
    """The free-text reports, from ``mimic-cxr-reports.zip`` or its unpacked folder."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: Optional[zipfile.ZipFile] = None
        if path.is_dir():
            self.base = path / "files" if (path / "files").is_dir() else path
            self.prefix = ""
            return
        try:
            self.zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise DataError(f"{path}: not found") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .zip archive or folder ({e})") from None
        for name in self.zip.namelist():
            m = _REPORT_NAME.match(name)
            if m:
                self.prefix = m.group(1)
                break
        else:
            raise DataError(f"{path}: no report files like files/p10/p10000032/s50414267.txt in the archive")

    def name(self, subject: str, study: str) -> str:
        return f"{self.prefix}p{subject[:2]}/p{subject}/s{study}.txt"

    def read(self, subject: str, study: str) -> Optional[bytes]:
        """The report's bytes, None when there is no such report."""
        name = self.name(subject, study)
        if self.zip is None:
            try:
                return (self.base / name).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise DataError(f"{self.base / name}: cannot read ({e.strerror or e})") from None
        try:
            return self.zip.read(name)
        except KeyError:
            return None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{self.path}: damaged archive, cannot read {name} ({e})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


@dataclass(frozen=True)
class MimicOptions:
    reports: Path
    split: Path
    images: Path
    output: Path
    metadata: Optional[Path] = None
    views: Optional[tuple[str, ...]] = None  # ViewPosition values to keep (None: all)
    section: str = "findings"
    impression_fallback: bool = False
    strict: bool = False
    force: bool = False
    progress: bool = True


def image_root(images: Path) -> Path:
    """The folder holding p10..p19: ``images/files`` when there is one, else ``images``."""
    if not images.is_dir():
        raise DataError(f"--images {images}: folder not found")
    return images / "files" if (images / "files").is_dir() else images


def read_views(path: Path) -> dict[str, str]:
    """``{dicom_id: ViewPosition}`` from the metadata file."""
    return {row["dicom_id"]: row["ViewPosition"].strip() for _, row in read_csv(path, ["dicom_id", "ViewPosition"])}


def prepare(opts: MimicOptions) -> list[str]:
    """Build ``opts.output`` (annotation.json, images -> the image root, dropped.tsv); return
    the summary lines to print."""
    from cmn.text import clean_report

    check_output_target(
        opts.output,
        opts.force,
        {"--reports": opts.reports, "--split": opts.split, "--metadata": opts.metadata, "--images": opts.images},
    )
    root = image_root(opts.images)
    wanted_views = opts.views or ()
    views: Optional[dict[str, str]] = None
    if wanted_views:
        if opts.metadata is None:
            raise DataError("--views needs --metadata (mimic-cxr-2.0.0-metadata.csv.gz, for ViewPosition)")
        views = read_views(opts.metadata)
    store = ReportStore(opts.reports)
    tally = Tally("images", strict=opts.strict)
    studies_kept: set[str] = set()
    # the images of a study are consecutive rows of the split file: its report is read once
    last_study, last_report = None, ("", "")

    def study_report(subject: str, study: str) -> tuple[str, str]:
        """``(report text, "")``, or ``("", why there is none)``."""
        data = store.read(subject, study)
        if data is None:
            return "", "no report file"
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as e:
            tally.warn(
                "unreadable report files",
                f"{opts.reports}: {store.name(subject, study)}: not UTF-8 text "
                f"(invalid byte 0x{data[e.start]:02x} at offset {e.start})",
            )
            return "", "unreadable report"
        text = report_text(raw, opts.section, opts.impression_fallback)
        if not text:
            return "", missing_text_reason(opts.section, opts.impression_fallback)
        if is_empty_report(clean_report(text, "mimic_cxr")):
            return "", "empty after cleaning"
        return text, ""

    try:
        with folder_writer(opts.output, replace=opts.force) as tmp:
            with AnnotationWriter(tmp) as writer:
                rows = read_csv(opts.split, ["dicom_id", "study_id", "subject_id", "split"])
                total = count_csv_rows(opts.split) if opts.progress else None
                for line, row in progress(rows, enabled=opts.progress, desc="images", total=total, unit=" images"):
                    dicom, study, subject = row["dicom_id"].strip(), row["study_id"].strip(), row["subject_id"].strip()
                    where = f"{opts.split}: line {line}"
                    if not (study.isdigit() and subject.isdigit() and dicom):
                        raise DataError(f"{where}: dicom_id, study_id and subject_id must be set, the ids numbers")
                    split = split_value(row["split"], where)
                    rel = f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
                    if views is not None:
                        view = views.get(dicom)
                        if view is None:
                            tally.drop(rel, "not in --metadata")
                            continue
                        if view not in wanted_views:
                            tally.drop(rel, f"view {view or '(none)'} not in --views")
                            continue
                    if study != last_study:
                        last_study, last_report = study, study_report(subject, study)
                    text, reason = last_report
                    if reason:
                        tally.drop(rel, reason)
                        continue
                    if not (root / rel).is_file():
                        tally.warn("image files not found", f"--images {root}: {rel} not found")
                        tally.drop(rel, "missing image")
                        continue
                    writer.add(
                        {
                            "id": dicom,
                            "study_id": int(study),
                            "subject_id": int(subject),
                            "report": text,
                            "image_path": [rel],
                            "split": split,
                        }
                    )
                    tally.keep(split)
                    studies_kept.add(study)
            link_images(tmp, root)
            tally.write_dropped(tmp / "dropped.tsv")
    finally:
        store.close()

    lines = tally.summary("mimic_cxr")
    lines.insert(1, f"({len(studies_kept)} studies; one entry per image)")
    lines.append(
        f"wrote {opts.output}/annotation.json, {opts.output}/{IMAGES} (a link to {root}), and {opts.output}/dropped.tsv"
    )
    lines.append(
        f"train: cmn-train --dataset mimic_cxr --ann-path {opts.output}/annotation.json "
        f"--image-dir {opts.output}/{IMAGES}"
    )
    return lines

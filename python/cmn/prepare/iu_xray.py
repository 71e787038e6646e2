"""IU X-Ray from the Open-i downloads (``NLMCXR_reports.tgz``, ``NLMCXR_png.tgz``).

Each report is one XML file (``ecgen-radiology/<n>.xml``, root ``<eCitation>``) with the
sections as ``MedlineCitation/Article/Abstract/AbstractText Label="FINDINGS"`` (also
IMPRESSION, INDICATION, COMPARISON), MeSH terms under ``MeSH/major`` and ``MeSH/automatic``
and one ``<parentImage id="CXR1_1_IM-0001-3001">`` per image; the image archive holds
``<id>.png`` for each.

The rule that reproduces the published R2Gen annotation (worked out from the public data;
see docs/data.md for the measurement):

- a study is kept when its FINDINGS text is not empty and at least two of its images exist;
- its images are taken in file-name order; the id is the first name without its last
  ``-<digits>`` part (``CXR2384_IM-0942-1001`` gives ``CXR2384_IM-0942``);
- ``images/<id>/<k>.png`` is the k-th image in that order (all of them are written, as in the
  published folder), and the annotation uses ``0.png`` and ``1.png``;
- the report is the FINDINGS text as given (surrounding white space removed).

The published split cannot be derived from the reports (it is random); ``--split-from``
reuses it by id, otherwise a seeded 70/10/20 split is drawn.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, Protocol
from xml.etree import ElementTree

from cmn.data.annotation import is_empty_report
from cmn.errors import DataError
from cmn.fsutil import folder_writer
from cmn.prepare.common import (
    IMAGES,
    AnnotationWriter,
    SplitFrom,
    Tally,
    check_output_target,
    missing_text_reason,
    progress,
    read_split_from,
    seeded_split,
)

NUM_VIEWS = 2
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_NUMBER = re.compile(r"(\d+)\.xml$")


class ReportError(ValueError):
    """A report file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class OpenIReport:
    """What cmn uses of one Open-i report file."""

    name: str  # member or file name, e.g. "ecgen-radiology/12.xml"
    sections: Mapping[str, str]  # AbstractText Label (upper case) -> text, empty ones left out
    image_ids: tuple[str, ...]  # parentImage ids, document order, without repeats
    mesh_major: tuple[str, ...] = ()
    mesh_automatic: tuple[str, ...] = ()

    @property
    def number(self) -> int:
        """The report number of ``<n>.xml`` (for a stable order), or -1."""
        m = _NUMBER.search(self.name)
        return int(m.group(1)) if m else -1


def parse_report(data: bytes, name: str) -> OpenIReport:
    """Parse one Open-i XML report; ReportError when it does not parse or is not a report."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as e:
        raise ReportError(f"XML does not parse ({e})") from None
    if root.tag != "eCitation":
        raise ReportError(f"root element is <{root.tag}>, expected <eCitation>")
    sections: dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        text = "".join(el.itertext()).strip()
        if label and text:
            sections.setdefault(label, text)
    image_ids = []
    for el in root.iter("parentImage"):
        image_id = (el.get("id") or "").strip()
        if image_id and image_id not in image_ids:
            image_ids.append(image_id)

    def mesh(kind: str) -> tuple[str, ...]:
        return tuple(t for t in ("".join(e.itertext()).strip() for e in root.iterfind(f"MeSH/{kind}")) if t)

    return OpenIReport(name, sections, tuple(image_ids), mesh("major"), mesh("automatic"))


def report_text(report: OpenIReport, section: str, impression_fallback: bool = False) -> str:
    """The report text for ``--section``: FINDINGS, IMPRESSION, or both joined by a space
    (FINDINGS first). With ``impression_fallback``, a study without FINDINGS uses IMPRESSION."""
    findings = report.sections.get("FINDINGS", "")
    impression = report.sections.get("IMPRESSION", "")
    if section == "findings":
        return findings or (impression if impression_fallback else "")
    if section == "impression":
        return impression
    return " ".join(t for t in (findings, impression) if t)


def study_id(image_ids: Sequence[str]) -> str:
    """The R2Gen id of a study: its first image in name order without the last ``-<digits>``."""
    first = sorted(image_ids)[0]
    head, sep, tail = first.rpartition("-")
    return head if sep and tail.isdigit() else first


@dataclass(frozen=True)
class IUStudy:
    id: str
    report: str
    images: tuple[str, ...]  # image ids in file-name order; images[:2] are the two views
    source: OpenIReport = field(repr=False, compare=False)

    def entry(self, split: str) -> dict:
        return {
            "id": self.id,
            "report": self.report,
            "image_path": [f"{self.id}/{k}.png" for k in range(NUM_VIEWS)],
            "split": split,
            "mesh": {"major": list(self.source.mesh_major), "automatic": list(self.source.mesh_automatic)},
        }


def select_studies(
    reports: Sequence[OpenIReport],
    present: Callable[[str], bool],
    tally: Tally,
    *,
    section: str = "findings",
    impression_fallback: bool = False,
    split_from: Optional[SplitFrom] = None,
    source: str = "",
) -> list[IUStudy]:
    """Apply the selection rule (module docstring) to parsed reports.

    ``present(image_id)`` says whether the image file exists. Every report left out is
    counted in ``tally`` with its reason; a referenced image that does not exist is a warning
    (an error under ``--strict``)."""
    from cmn.text import clean_reports

    candidates = []
    for rep in sorted(reports, key=lambda r: (r.number, r.name)):
        text = report_text(rep, section, impression_fallback)
        if not text:
            tally.drop(rep.name, missing_text_reason(section, impression_fallback))
            continue
        missing = [i for i in rep.image_ids if not present(i)]
        for image_id in missing:
            tally.warn("referenced images not found", f"{source}: {rep.name}: image {image_id}.png not found")
        images = sorted(i for i in rep.image_ids if present(i))
        if len(images) < NUM_VIEWS:
            tally.drop(rep.name, "missing image" if missing else f"fewer than {NUM_VIEWS} images")
            continue
        candidates.append(IUStudy(study_id(images), text, tuple(images), rep))
    cleaned = clean_reports([s.report for s in candidates], "iu_xray")
    kept: dict[str, IUStudy] = {}
    for study, clean in zip(candidates, cleaned):
        if is_empty_report(clean):
            tally.drop(study.source.name, "empty after cleaning")
        elif study.id in kept:
            tally.drop(study.source.name, f"duplicate id {study.id} (first: {kept[study.id].source.name})")
        elif split_from is not None and study.id not in split_from.split:
            tally.drop(study.source.name, "id not in --split-from")
        else:
            kept[study.id] = study
            if len(study.images) > NUM_VIEWS:
                tally.note(f"studies with more than {NUM_VIEWS} images (the first {NUM_VIEWS} by name are used)")
    return list(kept.values())


# ---- reading the downloads ----------------------------------------------------------------
class MemberFile(Protocol):
    """What :attr:`Member.open` gives: a binary file to read, used in a ``with``."""

    def read(self, n: int = -1, /) -> bytes: ...
    def __enter__(self) -> MemberFile: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None: ...


@dataclass(frozen=True)
class Member:
    name: str  # path inside the archive or folder
    open: Callable[[], MemberFile]  # valid until the next member is read


def _file_opener(full: Path) -> Callable[[], MemberFile]:
    return lambda: open(full, "rb")  # the caller closes it


def _archive_opener(archive: Path, tar: tarfile.TarFile, m: tarfile.TarInfo) -> Callable[[], MemberFile]:
    def open_member() -> _ArchiveFile:
        f = tar.extractfile(m)
        assert f is not None  # only regular files are members
        return _ArchiveFile(archive, f)

    return open_member


def iter_members(path: Path, suffix: str) -> Iterator[Member]:
    """Regular files ending in ``suffix`` of a tar archive (any compression, read as a stream)
    or of a folder (recursively, sorted). An unreadable archive is a DataError naming it."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(suffix):
                    full = Path(root, name)
                    yield Member(full.relative_to(path).as_posix(), _file_opener(full))
        return
    try:
        tar = tarfile.open(path, mode="r|*")  # noqa: SIM115 - closed by the `with tar` below
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: not a readable .tgz archive or folder ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with tar:
        members = iter(tar)
        while True:
            try:
                m = next(members)
            except StopIteration:
                return
            except _ARCHIVE_ERRORS as e:
                raise DataError(f"{path}: damaged or truncated archive ({e})") from None
            if m.isfile() and m.name.lower().endswith(suffix):
                yield Member(m.name, _archive_opener(path, tar, m))


class _ArchiveFile:
    """A member's file object whose read errors name the archive."""

    def __init__(self, archive: Path, f: IO[bytes]):
        self.archive, self.f = archive, f

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except _ARCHIVE_ERRORS as e:
            raise DataError(f"{self.archive}: damaged or truncated archive ({e})") from None

    def __enter__(self) -> _ArchiveFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def image_stem(name: str) -> str:
    return Path(name).name[: -len(".png")]


# ---- the command --------------------------------------------------------------------------
@dataclass(frozen=True)
class IUOptions:
    reports: Path
    images: Path
    output: Path
    section: str = "findings"
    impression_fallback: bool = False
    split_from: Optional[Path] = None
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    strict: bool = False
    force: bool = False
    progress: bool = True


def prepare(opts: IUOptions) -> list[str]:
    """Build ``opts.output`` (annotation.json, images/<id>/<k>.png, dropped.tsv); return the
    summary lines to print."""
    check_output_target(
        opts.output, opts.force, {"--reports": opts.reports, "--images": opts.images, "--split-from": opts.split_from}
    )
    split_from = read_split_from(opts.split_from) if opts.split_from else None
    tally = Tally("studies", strict=opts.strict)

    reports = []
    n_files = 0
    for member in progress(iter_members(opts.reports, ".xml"), enabled=opts.progress, desc="reports"):
        n_files += 1
        with member.open() as f:
            data = f.read()
        try:
            reports.append(parse_report(data, member.name))
        except ReportError as e:
            tally.warn("unreadable report files", f"{opts.reports}: {member.name}: {e}")
            tally.drop(member.name, "unreadable report")
    if not n_files:
        raise DataError(f"--reports {opts.reports}: no .xml report files found")

    with_text = [r for r in reports if report_text(r, opts.section, opts.impression_fallback)]
    wanted = {i for r in with_text for i in r.image_ids}
    with folder_writer(opts.output, replace=opts.force) as tmp:
        sources, n_images, n_other = _collect_images(opts, wanted, tmp / ".staging")
        studies = select_studies(
            reports,
            sources.__contains__,
            tally,
            section=opts.section,
            impression_fallback=opts.impression_fallback,
            split_from=split_from,
            source=str(opts.images),
        )
        if split_from is not None:
            split = {s.id: split_from.split[s.id] for s in studies}
            studies.sort(key=lambda s: split_from.position[s.id])
        else:
            split = seeded_split((s.id for s in studies), opts.seed, opts.fractions)
        with AnnotationWriter(tmp) as writer:
            n_written = 0
            # an image a second study also uses is copied; its last use moves a staged file
            uses = Counter(i for s in studies for i in s.images)
            staged = not opts.images.is_dir()
            for study in progress(studies, enabled=opts.progress, desc="images", unit=" studies"):
                folder = tmp / IMAGES / study.id
                folder.mkdir(parents=True)
                for k, image_id in enumerate(study.images):
                    uses[image_id] -= 1
                    if staged and not uses[image_id]:
                        os.replace(sources[image_id], folder / f"{k}.png")
                    else:
                        shutil.copyfile(sources[image_id], folder / f"{k}.png")
                    n_written += 1
                writer.add(study.entry(split[study.id]))
                tally.keep(split[study.id])
            (tmp / IMAGES).mkdir(exist_ok=True)
        tally.write_dropped(tmp / "dropped.tsv")
        shutil.rmtree(tmp / ".staging", ignore_errors=True)

    lines = [f"read {n_files} report files and {n_images} images ({n_other} images referenced by no report with text)"]
    lines += tally.summary("iu_xray")
    if split_from is not None:
        absent = len(set(split_from.split) - {s.id for s in studies})
        lines.append(
            f"--split-from {opts.split_from}: {len(split_from.split) - absent} of {len(split_from.split)} ids prepared"
        )
    lines.append(
        f"wrote {opts.output}/annotation.json, {n_written} images under {opts.output}/{IMAGES}, "
        f"and {opts.output}/dropped.tsv"
    )
    lines.append(
        f"train: cmn-train --dataset iu_xray --ann-path {opts.output}/annotation.json "
        f"--image-dir {opts.output}/{IMAGES}"
    )
    return lines


def _collect_images(opts: IUOptions, wanted: set[str], staging: Path) -> tuple[dict[str, Path], int, int]:
    """``({image id: file}, images seen, images not wanted)``. From an archive the wanted
    images are staged in ``staging`` in one streaming pass; from a folder they stay put."""
    found: dict[str, Path] = {}
    n_seen = 0
    if opts.images.is_dir():
        for member in iter_members(opts.images, ".png"):
            n_seen += 1
            stem = image_stem(member.name)
            if stem in found:
                raise DataError(
                    f"--images {opts.images}: two files named {stem}.png "
                    f"({found[stem].relative_to(opts.images)} and {member.name})"
                )
            found[stem] = opts.images / member.name
    else:
        staging.mkdir()
        for member in progress(iter_members(opts.images, ".png"), enabled=opts.progress, desc="image archive"):
            n_seen += 1
            stem = image_stem(member.name)
            if stem not in wanted:
                continue
            if stem in found:
                raise DataError(f"--images {opts.images}: two members named {stem}.png")
            target = staging / f"{stem}.png"
            with member.open() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            found[stem] = target
    if not n_seen:
        raise DataError(f"--images {opts.images}: no .png images found")
    n_other = sum(1 for stem in found if stem not in wanted) if opts.images.is_dir() else n_seen - len(found)
    return {k: v for k, v in found.items() if k in wanted}, n_seen, n_other

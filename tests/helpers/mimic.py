"""MIMIC-CXR files in their real format, built from small descriptions.

- ``mimic-cxr-reports.zip``: ``files/p10/p10000032/s50414267.txt`` per study, a free-text
  report laid out as MIMIC-CXR's: a centred ``FINAL REPORT`` line, then sections whose
  ``NAME:`` header starts a line after one space, text lines wrapped with a leading space and
  blank lines written as a single space;
- ``mimic-cxr-2.0.0-split.csv.gz`` (dicom_id, study_id, subject_id, split) and
  ``mimic-cxr-2.0.0-metadata.csv.gz`` (the real columns, ViewPosition among them);
- MIMIC-CXR-JPG images: ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.

Run as a module, it writes a synthetic download of MIMIC-CXR's full size (227,835 reports,
377,110 images) to measure cmn-prepare's time and memory (docs/data.md):

    python -m tests.helpers.mimic OUT_DIR
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import random
import sys
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from PIL import Image

SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}


def dicom_id(subject: int, study: int, k: int) -> str:
    h = hashlib.sha1(f"{subject}/{study}/{k}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def report(*sections: tuple[str, str]) -> str:
    """A report text from ``(HEADER, text)`` pairs; HEADER "" is text without a header."""
    lines = ["                                 FINAL REPORT"]
    for header, text in sections:
        body = textwrap.wrap(text, 76) if text else []
        if header and len(header) + len(text) < 60:
            lines.append(f" {header}:  {text}".rstrip())
        else:
            if header:
                lines.append(f" {header}:")
                lines.append(" ")
            lines += [f" {line}" for line in body]
        lines.append(" ")
    return "\n".join(lines) + "\n"


@dataclass
class Study:
    subject: int
    study: int
    split: str  # as in the split file: train, validate, test
    views: list[str]  # ViewPosition of each image
    text: Optional[Union[str, bytes]]  # the report file; None: no report file
    image_missing: bool = False
    dicoms: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dicoms = [dicom_id(self.subject, self.study, k) for k in range(len(self.views))]

    @property
    def folder(self) -> str:
        return f"p{str(self.subject)[:2]}/p{self.subject}/s{self.study}"

    def image_paths(self) -> list[str]:
        return [f"{self.folder}/{d}.jpg" for d in self.dicoms]


def _gz_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_bytes(gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))
    return path


def jpg_bytes(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), shade % 256).save(buf, format="JPEG")
    return buf.getvalue()


@dataclass(frozen=True)
class MimicFiles:
    reports: Path
    split: Path
    metadata: Path
    images: Path  # the MIMIC-CXR-JPG root, holding files/


def write_mimic(root: Path, studies: list[Study]) -> MimicFiles:
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for s in studies:
            if s.text is not None:
                z.writestr(f"files/{s.folder}.txt", s.text)
    split_rows, meta_rows = [], []
    for s in studies:
        for d, view in zip(s.dicoms, s.views):
            split_rows.append({"dicom_id": d, "study_id": s.study, "subject_id": s.subject, "split": s.split})
            meta_rows.append(
                {
                    "dicom_id": d,
                    "subject_id": s.subject,
                    "study_id": s.study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view,
                    "Rows": 3056,
                    "Columns": 2544,
                    "StudyDate": 21800506,
                    "StudyTime": 213014.531,
                    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                    "ViewCodeSequence_CodeMeaning": _VIEW_MEANING.get(view, ""),
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                }
            )
    images = root / "mimic-cxr-jpg"
    for s in studies:
        if s.image_missing:
            continue
        for k, rel in enumerate(s.image_paths()):
            path = images / "files" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpg_bytes(s.study + k))
    return MimicFiles(
        root / "mimic-cxr-reports.zip",
        _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows),
        _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows),
        images,
    )


_SENTENCES = [
    "The lungs are clear.",
    "No pleural effusion or pneumothorax.",
    "Heart size is normal.",
    "Mild cardiomegaly.",
    "Bibasilar atelectasis.",
    "Right internal jugular line ends in the SVC.",
]


def synthetic_studies(n_studies: int = 227835, n_images: int = 377110, seed: int = 0) -> list[Study]:
    """Studies shaped like MIMIC-CXR's: three per subject, one or two images each, two thirds
    of the reports with a findings section, about 1.4% test and 0.9% validate."""
    rng = random.Random(seed)
    studies, extra = [], n_images - n_studies
    for i in range(n_studies):
        sections = [("EXAMINATION", "CHEST (PA AND LAT)"), ("INDICATION", "___ with cough")]
        if rng.random() < 0.68:
            sections.append(("FINDINGS", " ".join(rng.choice(_SENTENCES) for _ in range(rng.randint(3, 9)))))
        sections.append(("IMPRESSION", rng.choice(_SENTENCES)))
        two = extra > 0 and rng.random() < 0.66
        extra -= two
        split = "test" if i % 70 == 0 else "validate" if i % 113 == 0 else "train"
        studies.append(Study(10000001 + i // 3, 50000001 + i, split, ["PA", "LATERAL"][: 1 + two], report(*sections)))
    return studies


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = write_mimic(Path(sys.argv[1]), synthetic_studies())
    print("\n".join(map(str, (files.reports, files.split, files.metadata, files.images))))

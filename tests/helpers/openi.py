"""Open-i (IU X-Ray) downloads in their real format, built from small descriptions.

``NLMCXR_reports.tgz`` holds ``ecgen-radiology/<n>.xml``: an ``<eCitation>`` with the
collection's header elements, ``MedlineCitation/Article/Abstract/AbstractText Label=...``
for COMPARISON, INDICATION, FINDINGS and IMPRESSION (an empty element where the report has
no such section), ``MeSH/major`` and ``MeSH/automatic`` terms and one ``parentImage`` per
image with its figure id, caption and panel. ``NLMCXR_png.tgz`` holds ``<image id>.png``.

Run as a module, it rebuilds the Open-i layout from the Kaggle derivative
(``indiana_reports.csv``, ``indiana_projections.csv``) with 8x8 placeholder images, to
measure the IU X-Ray rule on the real report contents (docs/data.md):

    python -m tests.helpers.openi indiana_reports.csv indiana_projections.csv OUT_DIR
"""

from __future__ import annotations

import csv
import io
import sys
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image


@dataclass
class Report:
    number: int
    findings: Optional[str] = None
    impression: Optional[str] = None
    indication: Optional[str] = "Chest pain"
    comparison: Optional[str] = "None."
    image_ids: list[str] = field(default_factory=list)
    mesh_major: list[str] = field(default_factory=lambda: ["normal"])
    mesh_automatic: list[str] = field(default_factory=list)
    caption: str = "Xray Chest PA and Lateral"


def _abstract(label: str, text: Optional[str]) -> str:
    if not text:
        return f'            <AbstractText Label="{label}"/>'
    return f'            <AbstractText Label="{label}">{escape(text)}</AbstractText>'


def report_xml(r: Report) -> bytes:
    """The XML file of one report, laid out as the files of NLMCXR_reports.tgz."""
    mesh = "\n".join(
        [f"      <major>{escape(t)}</major>" for t in r.mesh_major]
        + [f"      <automatic>{escape(t)}</automatic>" for t in r.mesh_automatic]
    )
    images = "\n".join(
        f"""   <parentImage id={quoteattr(image_id)}>
      <figureId>F{k + 1}</figureId>
      <caption>{escape(r.caption)}</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{escape(image_id)}.jpg</url>
         <imgModality>7</imgModality>
         <region type="panel">
            <globalImageFeatures>
               <CEDD>f2p0k1231</CEDD>
            </globalImageFeatures>
         </region>
      </panel>
   </parentImage>"""
        for k, image_id in enumerate(r.image_ids)
    )
    text = f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{r.number}"/>
   <pmcId id="{r.number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{r.number}"/>
   <licenseType>open-access</licenseType>
   <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>
   <ccLicense>byncnd</ccLicense>
   <articleURL/>
   <articleDate>2013-08-01</articleDate>
   <articleType>XR</articleType>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <note>The data are drawn from multiple hospital systems.</note>
   <specialty>pulmonary diseases</specialty>
   <subset>CXR</subset>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Journal>
            <JournalIssue>
               <PubDate>
                  <Year>2013</Year>
                  <Month>08</Month>
                  <Day>01</Day>
               </PubDate>
            </JournalIssue>
         </Journal>
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
{_abstract("COMPARISON", r.comparison)}
{_abstract("INDICATION", r.indication)}
{_abstract("FINDINGS", r.findings)}
{_abstract("IMPRESSION", r.impression)}
         </Abstract>
         <Affiliation>Indiana University School of Medicine</Affiliation>
         <AuthorList CompleteYN="Y">
            <Author ValidYN="Y">
               <LastName>Kohli</LastName>
               <ForeName>Marc</ForeName>
               <Initials>MD</Initials>
            </Author>
         </AuthorList>
         <Language>eng</Language>
         <PublicationTypeList>
            <PublicationType>Radiology Report</PublicationType>
         </PublicationTypeList>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{images}
</eCitation>
"""
    return text.encode("utf-8")


def png_bytes(shade: int, size: int = 8) -> bytes:
    """A small grey PNG (different shades make different files)."""
    rng = np.random.default_rng(shade)
    pixels = np.clip(rng.normal(shade % 256, 20, (size, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1375315200
    tar.addfile(info, io.BytesIO(data))


def write_reports_tgz(path: Path, reports: list[Report], extra: dict[str, bytes] | None = None) -> Path:
    """NLMCXR_reports.tgz: ``ecgen-radiology/<n>.xml`` per report, plus ``extra`` members as given."""
    with tarfile.open(path, "w:gz") as tar:
        for r in reports:
            add_bytes(tar, f"ecgen-radiology/{r.number}.xml", report_xml(r))
        for name, data in (extra or {}).items():
            add_bytes(tar, name, data)
    return path


def write_images_tgz(path: Path, images: dict[str, bytes]) -> Path:
    """NLMCXR_png.tgz: ``<image id>.png`` per image."""
    with tarfile.open(path, "w:gz") as tar:
        for image_id, data in images.items():
            add_bytes(tar, f"{image_id}.png", data)
    return path


def images_for(reports: list[Report], skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    ids = [i for r in reports for i in r.image_ids if i not in skip]
    return {image_id: png_bytes(k) for k, image_id in enumerate(ids)}


def from_kaggle(reports_csv: Path, projections_csv: Path, out: Path) -> tuple[Path, Path]:
    """Open-i archives rebuilt from the Kaggle derivative. Its image names drop the ``CXR``
    prefix and end in ``.dcm.png`` (``1_IM-0001-4001.dcm.png``); here they become Open-i ids
    (``CXR1_IM-0001-4001``). Kaggle's file order is not the XML's; parentImage order here is
    the projections file's. The PNGs are placeholders."""
    images = defaultdict(list)
    with open(projections_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            images[row["uid"]].append("CXR" + row["filename"].removesuffix(".dcm.png"))
    reports = []
    with open(reports_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            reports.append(
                Report(
                    int(row["uid"]),
                    findings=row["findings"],
                    impression=row["impression"],
                    indication=row["indication"],
                    comparison=row["comparison"],
                    image_ids=images.get(row["uid"], []),
                    mesh_major=[t for t in row["MeSH"].split(";") if t],
                    caption=row["image"],
                )
            )
    out.mkdir(parents=True, exist_ok=True)
    tiny = png_bytes(0)
    return (
        write_reports_tgz(out / "NLMCXR_reports.tgz", reports),
        write_images_tgz(out / "NLMCXR_png.tgz", {i: tiny for r in reports for i in r.image_ids}),
    )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    for p in from_kaggle(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])):
        print(p)

"""Built-in demo data: procedural chest radiographs with reports that describe them.

Nothing is downloaded. ``ensure_demo_data`` renders a small IU-X-Ray-like dataset
(R2Gen ``annotation.json`` + two PNG views per study) deterministically from a seed, so
``cmn-train`` works out of the box and a model has something real to learn: each report
sentence is decided by what is drawn in the images.

Findings (each present in roughly a quarter to a third of studies, independently):
  cardiomegaly (mild / moderate: cardiothoracic ratio), pleural effusion (left / right /
  bilateral, small / moderate: fluid height), apical pneumothorax (left / right: dark apex
  without markings behind a pleural line), pulmonary nodule (1 cm / 2 cm, in one of four
  lobes), lower-lobe consolidation (left / right: hazy patch), support device (right
  internal jugular catheter or left chest pacemaker with two leads).
View 0 is a frontal PA image (patient's right on the image left, as in radiographs);
view 1 a lateral image (anterior on the left) showing the same findings without side.
Sentences follow a fixed order (heart, mediastinum, lungs, pleura, devices, bones); each
fact has two or three phrasings, chosen at random with a dominant first phrasing.

Each study is drawn from its own generator seeded by (seed, split, index), so changing
``n_train`` leaves the validation and test studies unchanged.
"""

from cmn.data.demo.findings import FINDINGS, Findings, sample_findings
from cmn.data.demo.render import render_study
from cmn.data.demo.reports import read_report, score_findings, write_report
from cmn.data.demo.store import (
    DEMO_VERSION,
    MARKER,
    DemoParams,
    drawn_findings,
    ensure_demo_data,
    finding_regions,
    read_params,
)

__all__ = [
    "DEMO_VERSION",
    "FINDINGS",
    "MARKER",
    "DemoParams",
    "Findings",
    "drawn_findings",
    "ensure_demo_data",
    "finding_regions",
    "read_params",
    "read_report",
    "render_study",
    "sample_findings",
    "score_findings",
    "write_report",
]

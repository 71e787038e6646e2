"""cmn.data.demo: deterministic, atomic generation; reports that the images determine."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from cmn.data.annotation import load_annotation
from cmn.data.dataset import ReportDataset, collate
from cmn.data.demo import FINDINGS, MARKER, Findings, ensure_demo_data, render_study, sample_findings, write_report
from cmn.data.images import build_transform
from cmn.text import clean_reports

SMALL = dict(n_train=8, n_val=2, n_test=2, image_size=64)


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo-v1", **SMALL)


def test_layout_and_format(demo):
    ann_path, image_dir = demo
    assert ann_path.name == "annotation.json" and image_dir.is_dir()
    splits = load_annotation(ann_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    ids = [s.id for split in splits.values() for s in split]
    assert ids == [f"demo_{i:04d}" for i in range(1, 13)]
    for study in splits["train"]:
        assert study.image_paths == (f"{study.id}/0.png", f"{study.id}/1.png")
        for rel in study.image_paths:
            with Image.open(image_dir / rel) as img:
                assert img.mode == "L" and img.size == (64, 64)


def test_dataset_reads_the_demo(demo):
    ann_path, image_dir = demo
    studies = load_annotation(ann_path)["val"]
    ds = ReportDataset(studies, image_dir, 2, build_transform(32, train=True), ann_path=ann_path)
    assert collate([ds[0], ds[1]])["images"].shape == (2, 2, 3, 32, 32)


def test_deterministic_bytes(demo, tmp_path):
    again, _ = ensure_demo_data(tmp_path / "other", **SMALL)
    assert tree_digest(again.parent) == tree_digest(demo[0].parent)


def test_other_seed_differs(demo, tmp_path):
    other, _ = ensure_demo_data(tmp_path / "other", **{**SMALL, "seed": 1})
    assert other.read_bytes() != demo[0].read_bytes()


def test_val_and_test_do_not_depend_on_train_size(demo, tmp_path):
    bigger, _ = ensure_demo_data(tmp_path / "other", **{**SMALL, "n_train": 9})
    old, new = json.loads(demo[0].read_text()), json.loads(bigger.read_text())
    assert [e["report"] for e in new["val"]] == [e["report"] for e in old["val"]]
    assert [e["report"] for e in new["train"][:8]] == [e["report"] for e in old["train"]]


def test_complete_folder_is_reused(tmp_path):
    ann, _ = ensure_demo_data(tmp_path / "d", **SMALL)
    stamp = ann.stat().st_mtime_ns
    assert ensure_demo_data(tmp_path / "d", **SMALL)[0].stat().st_mtime_ns == stamp


def test_leftovers_of_a_killed_run_do_not_break_it(demo, tmp_path):
    # A killed generation leaves a temporary sibling; a stale root has no marker.
    partial = tmp_path / ".d.tmp-deadbeef"
    (partial / "images" / "demo_0001").mkdir(parents=True)
    (partial / "annotation.json").write_text("{")
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "annotation.json").write_text('{"train": []}')
    ann, image_dir = ensure_demo_data(tmp_path / "d", **SMALL)
    assert (ann.parent / MARKER).is_file()
    assert tree_digest(ann.parent) == tree_digest(demo[0].parent)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.tmp-") and p != partial]


def test_other_parameters_replace_the_folder(tmp_path):
    ensure_demo_data(tmp_path / "d", **SMALL)
    ann, _ = ensure_demo_data(tmp_path / "d", **{**SMALL, "n_test": 3})
    assert len(json.loads(ann.read_text())["test"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_demo_reports_clean_to_non_empty_text(demo):
    entries = [e for split in json.loads(demo[0].read_text()).values() for e in split]
    cleaned = clean_reports([e["report"] for e in entries], "iu_xray")
    for text in cleaned:
        words = text.replace(".", " ").split()
        assert len(words) >= 15
        assert re.fullmatch(r"[a-z0-9 .-]+", text), text


# ---- reports describe the findings --------------------------------------------------------

KEYWORDS = {
    "cardiomegaly": ("heart", "cardiac", "cardiomegaly"),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodul",),
    "consolidation": ("consolidation", "airspace"),
    "device": ("catheter", "pacemaker", "pacing", "lines or tubes", "devices", "central line"),
}
NEGATION = re.compile(r"\b(no|without|normal)\b")


def stated_findings(report):
    """Which findings a report states as present, read back from its sentences."""
    sentences = [s.lower() for s in report.split(". ")]
    return {
        name: any(any(k in s for k in keys) and not NEGATION.search(s) for s in sentences)
        for name, keys in KEYWORDS.items()
    }


def test_every_finding_is_stated_positive_and_negative_as_drawn():
    rng = np.random.default_rng(123)
    seen = {name: set() for name in FINDINGS}
    for _ in range(400):
        findings = sample_findings(rng)
        report = write_report(findings, rng)
        assert stated_findings(report) == findings.labels(), report
        for name, present in findings.labels().items():
            seen[name].add(present)
    assert all(values == {True, False} for values in seen.values()), seen


def test_positive_sentences_carry_side_and_size():
    rng = np.random.default_rng(5)
    f = Findings("mild", "right", "moderate", "left", "left upper", 2, "right", "catheter")
    report = write_report(f, rng).lower()
    assert "moderate right pleural effusion" in report
    assert "left apical pneumothorax" in report
    assert "2 cm" in report and "left upper lobe" in report
    assert "right lower lobe" in report


def test_demo_annotation_records_the_findings(demo):
    for entry in json.loads(demo[0].read_text())["train"]:
        findings = Findings(**entry["findings"])
        assert stated_findings(entry["report"]) == findings.labels()


# ---- images show the findings on the right side ----------------------------------------


NONE = Findings("", "", "small", "", "", 1, "", "")


def frontal(findings, seed=3):
    return render_study(findings, 128, np.random.default_rng(seed))[0].astype(np.float64)


def changed_blocks(a, b):
    """Image-left and image-right counts of 4x4 blocks whose mean changed by > 12 levels."""
    diff = np.abs(a - b).reshape(32, 4, 32, 4).mean(axis=(1, 3))  # block means average out the noise
    changed = diff > 12
    return int(changed[:, :16].sum()), int(changed[:, 16:].sum())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "make",
    [
        lambda side: Findings("", side, "small", "", "", 1, "", ""),
        lambda side: Findings("", "", "small", side, "", 1, "", ""),
        lambda side: Findings("", "", "small", "", f"{side} lower", 1, "", ""),
        lambda side: Findings("", "", "small", "", "", 1, side, ""),
    ],
    ids=["effusion", "pneumothorax", "nodule", "consolidation"],
)
def test_finding_is_visible_on_its_side(side, make):
    image_left, image_right = changed_blocks(frontal(make(side)), frontal(NONE))
    # PA view: the patient's right is on the image left.
    near, far = (image_left, image_right) if side == "right" else (image_right, image_left)
    assert near >= 3 and far == 0, (near, far)


def test_cardiomegaly_widens_the_heart():
    normal, enlarged = frontal(NONE), frontal(Findings("moderate", "", "small", "", "", 1, "", ""))
    assert sum(changed_blocks(normal, enlarged)) >= 20

"""The labeler on real-style report sentences (tests/data/labeler_sentences.tsv), full reports
with sections, and ``cmn-label --sections``."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from cmn.errors import ConfigError
from cmn.metrics import CHEXPERT_OBSERVATIONS, label_reports
from cmn.metrics.cli import label_main
from cmn.metrics.clinical import report_sections

IDX = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}
SENTENCES = Path(__file__).parent / "data" / "labeler_sentences.tsv"


def _cases():
    cases = []
    for n, line in enumerate(SENTENCES.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, expected, text = line.split("\t")
        want = {}
        for item in expected.split("; "):
            name, _, value = item.partition("=")
            assert name in IDX, f"line {n}: unknown observation {name!r}"
            want[name] = math.nan if value == "-" else float(value)
        cases.append(pytest.param(text.replace("\\n", "\n"), want, id=f"{n}-{kind}"))
    return cases


CASES = _cases()


def test_every_class_has_positive_negative_uncertain_and_blank_cases():
    kinds: dict[str, set] = {}
    for case in CASES:
        _, want = case.values
        kind = case.id.split("-", 1)[1]
        kinds.setdefault(kind, set()).update("-" if math.isnan(v) else v for v in want.values())
    assert {"coordinated-normal", "not-asserted", "resolved", "hedge", "borderline"} <= set(kinds)
    every = set().union(*kinds.values())
    assert {1.0, 0.0, -1.0, "-"} <= every
    assert {0.0, 1.0} <= kinds["coordinated-normal"] and "-" in kinds["not-asserted"]


@pytest.mark.parametrize("text, want", CASES)
def test_sentence(text, want):
    row = label_reports([text])[0]
    got = {name: row[IDX[name]] for name in want}
    assert all((math.isnan(w) and math.isnan(got[k])) or got[k] == w for k, w in want.items()), (text, got)


def test_sentences_batch_equals_one_by_one():
    texts = [c.values[0] for c in CASES]
    one = np.stack([label_reports([t])[0] for t in texts])
    np.testing.assert_array_equal(label_reports(texts), one)


# ------------------------------------------------------------------------------ sections

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___M with known left pleural effusion, eval for pneumothorax.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 Moderate cardiomegaly is unchanged.  No pneumothorax.  Lungs are clear.

 IMPRESSION:

 1. Stable moderate cardiomegaly.
 2. No acute cardiopulmonary process.
"""

OPENI_STYLE = (
    "Indication: Cough, history of pneumonia. Comparison: None. "
    "Findings: The heart size and upper mediastinum have a normal appearance. The lungs are clear. "
    "Impression: Normal chest."
)


def _obs(row, name):
    return row[IDX[name]]


def test_auto_sections_label_findings_and_impression_only():
    auto, whole = label_reports([MIMIC_STYLE, OPENI_STYLE], sections="auto"), label_reports([MIMIC_STYLE, OPENI_STYLE])
    # The indication's effusion and the history of pneumonia count only when labeling everything.
    assert _obs(whole[0], "Pleural Effusion") == 1 and math.isnan(_obs(auto[0], "Pleural Effusion"))
    assert _obs(auto[0], "Cardiomegaly") == 1 and _obs(auto[0], "Pneumothorax") == 0
    assert _obs(whole[1], "Pneumonia") == 1 and math.isnan(_obs(auto[1], "Pneumonia"))
    assert _obs(auto[1], "No Finding") == 1 and _obs(auto[1], "Cardiomegaly") == 0


def test_report_sections_text():
    kept = report_sections(MIMIC_STYLE)
    assert "Moderate cardiomegaly" in kept and "2. No acute" in kept
    assert "INDICATION" not in kept and "pleural effusion" not in kept and "FINAL REPORT" not in kept
    kept = " ".join(report_sections(OPENI_STYLE).split())
    assert kept == "The heart size and upper mediastinum have a normal appearance. The lungs are clear. Normal chest."


@pytest.mark.parametrize(
    "text",
    [
        "Moderate cardiomegaly. No pneumothorax.",  # model output: no headings
        "the heart size is normal . no pleural effusion .",  # cleaned training text
        "History of pneumonia. Lungs are clear.",  # a heading needs its colon
    ],
)
def test_text_without_headings_is_labeled_whole(text):
    assert report_sections(text) == text
    np.testing.assert_array_equal(label_reports([text], sections="auto"), label_reports([text]))


def test_upper_case_heading_inside_a_line_and_subheadings():
    report = (
        "COMPARISON: Chest radiograph showing a right pneumothorax. FINDINGS: LUNGS: Clear. HEART: Mild cardiomegaly."
    )
    row = label_reports([report], sections="auto")[0]
    assert math.isnan(_obs(row, "Pneumothorax")) and _obs(row, "Cardiomegaly") == 1


def test_only_other_headings_label_the_rest_after_a_blank_line():
    report = "INDICATION: Fever, pleural effusion?\n\nSmall left pleural effusion. No pneumothorax."
    assert report_sections(report).strip() == "Small left pleural effusion. No pneumothorax."
    row = label_reports([report], sections="auto")[0]
    assert _obs(row, "Pleural Effusion") == 1 and _obs(row, "Pneumothorax") == 0
    assert report_sections("HISTORY: Pneumonia.").strip() == ""


def test_sections_argument_is_checked():
    with pytest.raises(ConfigError, match="sections"):
        label_reports(["x"], sections="findings")


def test_cmn_label_sections(tmp_path, capsys):
    src = tmp_path / "reports.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "report"], ["1", MIMIC_STYLE], ["2", "Small left effusion."]])
    out = tmp_path / "labels.csv"
    rows = {}
    for mode in ("auto", "all"):
        assert label_main([str(src), "--output", str(out), "--sections", mode]) == 0
        with out.open(newline="", encoding="utf-8") as f:
            rows[mode] = list(csv.DictReader(f))
    assert rows["auto"][0]["Pleural Effusion"] == "" and rows["all"][0]["Pleural Effusion"] == "1"
    assert rows["auto"][1]["Pleural Effusion"] == rows["all"][1]["Pleural Effusion"] == "1"
    assert rows["auto"][0]["Reports"] == MIMIC_STYLE  # the CSV keeps the full report
    # The default is auto.
    assert label_main([str(src), "--output", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == rows["auto"]
    assert label_main([str(src), "--output", str(out), "--sections", "some"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sections") and err.count("\n") == 1

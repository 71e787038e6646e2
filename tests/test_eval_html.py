"""cmn-eval --html: one row per study, disagreeing findings highlighted, sortable by BLEU-4."""

import json
import re

import pytest

from cmn.metrics.cli import eval_main
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS, label_reports
from cmn.viz.eval_page import disagreements, marked_text, per_study_bleu4, render_eval_page
from helpers.browser import chromium, console_errors, open_page

ROWS = [
    {
        "id": "a",
        "prediction": "the heart is normal . there is a small left pleural effusion .",
        "reference": "the heart is normal . no pleural effusion .",
    },
    {
        "id": "b",
        "prediction": "the heart is normal . no pneumothorax .",
        "reference": "the heart is normal . no pneumothorax .",
    },
    {
        "id": "c",
        "prediction": "the lungs are clear . no pneumothorax .",
        "reference": "there is a right apical pneumothorax . <script>alert(1)</script>",
    },
]


@pytest.fixture()
def preds(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_highlights_only_the_findings_the_labeler_disagrees_on():
    refs = {r["id"]: r["reference"] for r in ROWS}
    preds = {r["id"]: r["prediction"] for r in ROWS}
    keys = sorted(preds)
    differ = disagreements(label_reports([refs[k] for k in keys]), label_reports([preds[k] for k in keys]), "negative")
    names = [{CHEXPERT_OBSERVATIONS[j] for j in row.nonzero()[0]} for row in differ]
    # "No Finding" differs with them, but no words name it
    assert names == [{"Pleural Effusion", "No Finding"}, set(), {"Pneumothorax", "No Finding"}]
    text = marked_text(preds["a"], {"Pleural Effusion": "why"})
    assert re.findall(r"<mark[^>]*>(.*?)</mark>", text) == ["effusion"]
    assert marked_text("a < b", {}) == "a &lt; b"
    bleu = per_study_bleu4(refs, preds)
    assert bleu["b"] == pytest.approx(1.0, abs=1e-6) and 0 <= bleu["a"] < 1
    page = render_eval_page(refs, preds, {"BLEU_4": 0.5})
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert page.count("<mark") == 4 + 1  # two texts of a, two of c, one in the legend


def test_cli_writes_the_page_and_the_browser_sorts_it(preds, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert eval_main(["--predictions", str(preds), "--no-meteor", "--html", str(out)]) == 0
    assert "BLEU_4" in capsys.readouterr().out
    with chromium() as driver:
        open_page(driver, out)

        def ids():
            return [r.get_attribute("data-id") for r in driver.find_elements("css selector", "table.studies tbody tr")]

        assert ids() == ["a", "b", "c"]
        button = driver.find_element("css selector", "button[data-sort=bleu]")
        button.click()
        bleus = [
            float(r.get_attribute("data-bleu")) for r in driver.find_elements("css selector", "table.studies tbody tr")
        ]
        assert bleus == sorted(bleus) and ids()[-1] == "b"
        button.click()
        assert ids()[0] == "b"
        assert len(driver.find_elements("css selector", "table.studies mark")) == 4
        assert console_errors(driver) == []


def test_unwritable_html_path_is_one_error_line(preds, tmp_path, capsys):
    assert (
        eval_main(
            [
                "--predictions",
                str(preds),
                "--no-meteor",
                "--no-clinical",
                "--html",
                str(tmp_path / "missing" / "r.html"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "r.html" in err[0]

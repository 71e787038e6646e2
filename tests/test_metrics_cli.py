"""cmn-eval and cmn-label end to end, and their errors on bad input."""

import csv
import json

import pytest

from cmn.metrics import CHEXPERT_OBSERVATIONS
from cmn.metrics.cli import eval_main, label_main

ROWS = [
    {
        "id": "s1",
        "prediction": "the heart size is normal . no pleural effusion or pneumothorax .",
        "reference": "the heart size is normal . there is no pleural effusion or pneumothorax .",
    },
    {
        "id": "s2",
        "prediction": "moderate cardiomegaly . small left pleural effusion .",
        "reference": "moderate cardiomegaly . small bilateral pleural effusions .",
    },
    {"id": "s3", "prediction": "the lungs are clear .", "reference": "right lower lobe pneumonia ."},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_eval_jsonl_end_to_end_with_meteor(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert eval_main(["--predictions", str(_jsonl(tmp_path / "p.jsonl", ROWS)), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "BLEU_4" in table and "CE_F1" in table and "Pleural Effusion" in table
    payload = json.loads(out.read_text())
    scores = payload["scores"]
    assert payload["n"] == 3 and 0 < scores["METEOR"] < 1
    # Cardiomegaly and effusion found in both s2 texts; pneumonia missed in s3.
    per = payload["clinical"]["per_observation"]
    assert per["Cardiomegaly"]["f1"] == 1.0 and per["Pneumonia"]["recall"] == 0.0
    assert scores["CE_F1"] == pytest.approx(payload["clinical"]["f1_macro"])
    assert payload["clinical"]["uncertain"] == "negative"


def test_eval_csv_without_meteor_or_clinical(tmp_path, capsys):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prediction", "reference"])
        w.writeheader()
        w.writerows(ROWS)
    out = tmp_path / "s.json"
    assert eval_main(["--predictions", str(path), "--no-meteor", "--no-clinical", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert scores["METEOR"] is None and "CE_F1" not in scores and scores["BLEU_1"] > 0


def test_eval_with_annotation_split(tmp_path):
    ann = {"test": [{"id": r["id"], "report": r["reference"].upper(), "image_path": []} for r in ROWS], "train": []}
    (tmp_path / "annotation.json").write_text(json.dumps(ann), encoding="utf-8")
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "prediction": r["prediction"]} for r in ROWS[:2]])
    out = tmp_path / "s.json"
    code = eval_main(
        [
            "--predictions",
            str(preds),
            "--annotation",
            str(tmp_path / "annotation.json"),
            "--split",
            "test",
            "--dataset",
            "mimic_cxr",
            "--no-meteor",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads(out.read_text())["n"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (
            b'{"id": "a", "prediction": "x", "reference": "y"}\n{"id": "a", "prediction": "x", "reference": "y"}\n',
            "duplicate id 'a'",
        ),
        (b'{"id": "a", "prediction": "x"}\n', "lacks field"),
        (b'{"id": "a", "prediction": "\xff\xfe", "reference": "y"}\n', "not UTF-8"),
        (b'{"id": "a", "prediction": ', "not valid JSON"),
    ],
)
def test_eval_bad_input_names_file_and_problem(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert eval_main(["--predictions", str(path), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and message in err


def test_eval_mismatched_ids_with_annotation(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"test": [{"id": "s1", "report": "ok ."}]}), encoding="utf-8")
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": "nope", "prediction": "x"}])
    assert eval_main(["--predictions", str(preds), "--annotation", str(tmp_path / "a.json"), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "not in split 'test'" in err


def test_eval_missing_csv_column(tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text("id,prediction\na,x\n", encoding="utf-8")
    assert eval_main(["--predictions", str(path), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "missing column(s) reference" in err


def test_label_text_and_csv(tmp_path, capsys):
    txt = tmp_path / "reports.txt"
    txt.write_text("No pneumothorax.\nModerate cardiomegaly, possible edema.\n\n", encoding="utf-8")
    out = tmp_path / "labels.csv"
    assert label_main([str(txt), "--output", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Reports", *CHEXPERT_OBSERVATIONS]
    header = rows[0]
    first = dict(zip(header, rows[1]))
    second = dict(zip(header, rows[2]))
    assert len(rows) == 3
    assert first["Pneumothorax"] == "0" and first["No Finding"] == "1" and first["Edema"] == ""
    assert second["Cardiomegaly"] == "1" and second["Edema"] == "-1" and second["No Finding"] == ""

    src = tmp_path / "reports.csv"
    src.write_text('id,report\n1,"Small left effusion, no pneumothorax."\n', encoding="utf-8")
    assert label_main([str(src), "--output", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        row = dict(zip(header, list(csv.reader(f))[1]))
    assert row["Pleural Effusion"] == "1" and row["Pneumothorax"] == "0"


def test_label_errors(tmp_path, capsys):
    src = tmp_path / "r.csv"
    src.write_text("id,text\n1,x\n", encoding="utf-8")
    assert label_main([str(src), "--output", str(tmp_path / "o.csv")]) == 2
    assert "missing column(s) report" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    assert label_main([str(missing), "--output", str(tmp_path / "o.csv")]) == 2
    assert str(missing) in capsys.readouterr().err

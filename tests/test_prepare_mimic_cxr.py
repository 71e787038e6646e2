"""cmn-prepare mimic_cxr on MIMIC-CXR files in the real format (tests/helpers/mimic.py)."""

import gzip
import json
import zipfile

import pytest

from cmn.data.annotation import load_annotation
from cmn.prepare.cli import main
from cmn.prepare.mimic_cxr import report_text, section_name, split_sections
from helpers.mimic import Study, dicom_id, report, write_mimic

F1 = (
    "There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal silhouette is "
    "normal. Surgical clips project over the right upper quadrant. Mild degenerative changes of the spine."
)
F3 = "Lungs are well expanded and clear. Heart size is normal."
F4 = "Mild cardiomegaly. Small bilateral pleural effusions with adjacent atelectasis."
F11 = "Right internal jugular catheter ends in the mid SVC. No pneumothorax."


def fixture_studies() -> list[Study]:
    head = [("EXAMINATION", "CHEST (PA AND LAT)"), ("INDICATION", "___M with cough  // pneumonia?")]
    return [
        Study(
            10000001,
            50000001,
            "train",
            ["PA", "LATERAL"],
            report(*head, ("COMPARISON", "None."), ("FINDINGS", F1), ("IMPRESSION", "No acute process.")),
        ),
        Study(10000001, 50000002, "train", ["AP"], report(*head, ("IMPRESSION", "Interval improvement."))),
        Study(10000002, 50000003, "validate", ["PA"], report(*head, ("FINDINS", F3), ("IMPRESSION", "Normal."))),
        Study(
            10000002,
            50000004,
            "test",
            ["PA", "LL"],
            report(
                ("CHEST, PA AND LATERAL", "Comparison is made to the prior study."),
                ("FINDINGS", F4),
                ("IMPRESSION", "Cardiomegaly and effusions."),
            ),
        ),
        Study(10000003, 50000005, "test", ["PA"], None),
        Study(10000003, 50000006, "train", ["PA"], report(("FINDINGS", F3)), image_missing=True),
        Study(10000003, 50000007, "train", ["AP"], report(("FINDINGS", "Caf\xe9 au lait.")).encode("latin-1")),
        Study(
            10000004,
            50000008,
            "train",
            ["PA"],
            "                                 FINAL REPORT\n Chest radiograph: lungs are clear.\n",
        ),
        Study(10000004, 50000009, "validate", ["PA"], report(("FINDINGS", ""), ("IMPRESSION", "Stable."))),
        Study(10000005, 50000010, "train", ["PA"], report(*head, ("CONCLUSION", "No pneumonia."))),
        Study(11000006, 50000011, "test", ["PA"], report(*head, ("FINDINGS", F11))),
    ]


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    studies = fixture_studies()
    return studies, write_mimic(tmp_path_factory.mktemp("mimic"), studies)


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def prepare(files, out, capsys, *extra, reports=None, split=None):
    return run(
        [
            "mimic_cxr",
            "--reports",
            str(reports or files.reports),
            "--split",
            str(split or files.split),
            "--metadata",
            str(files.metadata),
            "--images",
            str(files.images),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ],
        capsys,
    )


def entries_of(out):
    return {e["id"]: e for v in json.loads((out / "annotation.json").read_text()).values() for e in v}


def test_section_names_as_mit_lcp():
    assert section_name("FINDINGS") == "findings"
    assert section_name("FINIDNGS") == "findings"
    assert section_name("CONCLUSION") == "impression"
    assert section_name("FINDINGS AND IMPRESSION") == "impression"
    assert section_name("CHEST, PA AND LATERAL") == "findings"
    assert section_name("PORTABLE AP VIEW") == "findings"
    assert section_name("COMPARISON CHEST") == "comparison"  # a main section wins over a view name
    assert section_name("INDICATION") == "indication"


def test_split_sections_quirks():
    # a section cannot end on its own first line: a header on the next line is part of it
    text = "                FINAL REPORT\n FINDINGS:\n IMPRESSION:  Normal.\n"
    assert split_sections(text) == [
        ("preamble", "                FINAL REPORT\n "),
        ("findings", " IMPRESSION:  Normal.\n"),
    ]
    # empty findings are dropped; the last findings section is the one used
    text = "X\n FINDINGS: \n \n FINDINGS:  First.\n \n FINDINGS:  Second one.\n \n IMPRESSION:  Done.\n"
    assert report_text(text, "findings") == "Second one."
    # no findings and no impression: the text after the last section's first blank line
    text = "X\n INDICATION:  Cough.\n \n Lungs are clear.\n \n Heart normal.\n"
    assert split_sections(text)[-1] == ("last_paragraph", " Lungs are clear.\n \n Heart normal.\n")
    assert report_text(text, "findings", impression_fallback=True) == ""
    # no header at all: one "full report" section
    assert split_sections("just text") == [("full report", "just text")]


def test_report_text_joins_lines():
    text = report(("FINDINGS", F1), ("IMPRESSION", "No acute process."))
    assert "\n" in split_sections(text)[1][1].strip()
    assert report_text(text, "findings") == F1
    assert report_text(text, "impression") == "No acute process."
    assert report_text(text, "both") == F1 + " No acute process."


def test_golden_output(mimic, tmp_path, capsys):
    studies, files = mimic
    out = tmp_path / "mimic"
    code, stdout, stderr = prepare(files, out, capsys)
    assert code == 0, stderr
    ann = json.loads((out / "annotation.json").read_text())
    s = {st.study: st for st in studies}
    expect = {
        "train": [(s[50000001], 0, F1), (s[50000001], 1, F1)],
        "val": [(s[50000003], 0, F3)],
        "test": [(s[50000004], 0, F4), (s[50000004], 1, F4), (s[50000011], 0, F11)],
    }
    assert ann == {
        split: [
            {
                "id": st.dicoms[k],
                "study_id": st.study,
                "subject_id": st.subject,
                "report": text,
                "image_path": [st.image_paths()[k]],
                "split": split,
            }
            for st, k, text in rows
        ]
        for split, rows in expect.items()
    }
    assert ann["test"][2]["image_path"][0].startswith("p11/p11000006/s50000011/")
    assert "mimic_cxr: kept 6 images (train 2, val 1, test 3)" in stdout
    assert "(4 studies; one entry per image)" in stdout
    for line in ["4  no findings", "1  no report file", "1  missing image", "1  unreadable report"]:
        assert line in stdout
    assert "s50000007.txt: not UTF-8 text (invalid byte 0xe9" in stderr
    assert f"{s[50000006].image_paths()[0]} not found" in stderr
    assert "warnings: 1 image files not found" in stdout
    dropped = (out / "dropped.tsv").read_text().splitlines()
    assert len(dropped) == 8 and f"{s[50000006].image_paths()[0]}\tmissing image" in dropped
    # the output is used as any other: images/ leads to the MIMIC-CXR-JPG files
    assert (out / "images").resolve() == (files.images / "files").resolve()
    assert sum(len(v) for v in load_annotation(out / "annotation.json").values()) == 6
    code, stdout, _ = run(["mimic_cxr", "--check", "--output", str(out)], capsys)
    assert code == 0 and "ok: train 2, val 1, test 3 entries, 6 image files" in stdout


def test_views_and_fallback(mimic, tmp_path, capsys):
    studies, files = mimic
    code, stdout, err = prepare(files, tmp_path / "a", capsys, "--views", "PA,AP")
    assert code == 0, err
    assert len(entries_of(tmp_path / "a")) == 4
    assert "1  view LATERAL not in --views" in stdout and "1  view LL not in --views" in stdout
    code, stdout, err = prepare(files, tmp_path / "b", capsys, "--impression-fallback")
    assert code == 0, err
    reports = {e["study_id"]: e["report"] for e in entries_of(tmp_path / "b").values()}
    assert reports[50000002] == "Interval improvement."
    assert reports[50000010] == "No pneumonia."
    assert reports[50000009] == "Stable."
    assert 50000008 not in reports and reports[50000001] == F1


def test_unpacked_reports_give_the_same_output(mimic, tmp_path, capsys):
    _, files = mimic
    with zipfile.ZipFile(files.reports) as z:
        z.extractall(tmp_path / "reports")
    assert prepare(files, tmp_path / "a", capsys)[0] == 0
    assert prepare(files, tmp_path / "b", capsys, reports=tmp_path / "reports")[0] == 0
    assert (tmp_path / "a" / "annotation.json").read_text() == (tmp_path / "b" / "annotation.json").read_text()


def _csv_gz(path, text):
    path.write_bytes(gzip.compress(text.encode("latin-1")))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "damaged_zip",
        "missing_column",
        "bad_split",
        "not_utf8_csv",
        "strict_image",
        "strict_report",
        "views_without_metadata",
        "truncated_gz",
    ],
)
def test_bad_inputs(mimic, tmp_path, capsys, case):
    _, files = mimic
    out = tmp_path / "out"
    kw, extra = {}, []
    if case == "damaged_zip":
        kw["reports"] = tmp_path / "mimic-cxr-reports.zip"
        kw["reports"].write_bytes(b"PK\x03\x04 broken")
        expect = "mimic-cxr-reports.zip: not a readable .zip archive"
    elif case == "missing_column":
        kw["split"] = _csv_gz(tmp_path / "split.csv.gz", "dicom_id,study_id,subject_id\na,1,2\n")
        expect = "split.csv.gz: missing column(s) split"
    elif case == "bad_split":
        kw["split"] = _csv_gz(
            tmp_path / "split.csv.gz", "dicom_id,study_id,subject_id,split\na,50000001,10000001,train\nb,1,2,training\n"
        )
        expect = "split.csv.gz: line 3: split 'training' is not one of"
    elif case == "not_utf8_csv":
        kw["split"] = _csv_gz(tmp_path / "split.csv.gz", "dicom_id,study_id,subject_id,split\n\xe9,1,2,train\n")
        expect = "split.csv.gz: not UTF-8 text"
    elif case == "truncated_gz":
        kw["split"] = tmp_path / "split.csv.gz"
        kw["split"].write_bytes(files.split.read_bytes()[:-10])
        expect = "split.csv.gz: damaged or truncated file"
    elif case == "strict_image":
        extra = ["--strict"]
        expect = "s50000006/" + dicom_id(10000003, 50000006, 0) + ".jpg not found (--strict)"
    elif case == "strict_report":
        kw["split"] = _csv_gz(
            tmp_path / "split.csv.gz",
            f"dicom_id,study_id,subject_id,split\n{dicom_id(10000003, 50000007, 0)},50000007,10000003,train\n",
        )
        extra = ["--strict"]
        expect = "s50000007.txt: not UTF-8 text"
    else:
        code, _, err = run(
            [
                "mimic_cxr",
                "--reports",
                str(files.reports),
                "--split",
                str(files.split),
                "--images",
                str(files.images),
                "--views",
                "PA",
                "--output",
                str(out),
            ],
            capsys,
        )
        assert code == 2 and "--views needs --metadata" in err
        return
    code, _, err = prepare(files, out, capsys, *extra, **kw)
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and expect in last, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

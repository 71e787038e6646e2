"""cmn-prepare csv: a user's own studies from a table."""

import gzip
import json

import pytest

from cmn.data.annotation import load_annotation
from cmn.prepare.cli import main
from cmn.prepare.table import relative_to_root
from helpers.openi import png_bytes


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "pictures"
    for study in ("a", "b", "c", "d", "e"):
        (root / study).mkdir(parents=True)
        for view in ("front", "side", "extra"):
            (root / study / f"{view}.png").write_bytes(png_bytes(ord(study) + len(view)))
    return root


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def prepare(table, images, out, capsys, *extra):
    return run(
        ["csv", "--table", str(table), "--image-root", str(images), "--output", str(out), "--no-progress", *extra],
        capsys,
    )


TABLE = """id,report,image_path,split
a,"Heart size normal. Lungs clear.",a/front.png;a/side.png,train
b,"Mild cardiomegaly.",b/front.png ; b/side.png;b/extra.png,validate
c,"",c/front.png;c/side.png,train
d,"Small effusion.",d/front.png,test
e,"No pneumothorax.",e/front.png;e/missing.png,test
f,"Clear lungs, no effusion.",/ABS/a/front.png;a/side.png,test
"""


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_golden_output_with_a_split_column(images, tmp_path, capsys):
    table = write(tmp_path / "studies.csv", TABLE.replace("/ABS", str(images)))
    out = tmp_path / "mine"
    code, stdout, err = prepare(table, images, out, capsys)
    assert code == 0, err
    ann = json.loads((out / "annotation.json").read_text())
    assert ann == {
        "train": [
            {
                "id": "a",
                "report": "Heart size normal. Lungs clear.",
                "image_path": ["a/front.png", "a/side.png"],
                "split": "train",
            }
        ],
        "val": [
            {"id": "b", "report": "Mild cardiomegaly.", "image_path": ["b/front.png", "b/side.png"], "split": "val"}
        ],
        "test": [
            {
                "id": "f",
                "report": "Clear lungs, no effusion.",
                "image_path": ["a/front.png", "a/side.png"],
                "split": "test",
            }
        ],
    }
    assert (tmp_path / "mine" / "dropped.tsv").read_text().splitlines() == [
        "name\treason",
        "c\tno report",
        "d\tfewer than 2 image(s) (iu_xray takes 2)",
        "e\tmissing image",
    ]
    assert "csv: kept 3 studies (train 1, val 1, test 1)" in stdout
    assert "note: 1 studies with more than 2 image(s) (the first 2 are used)" in stdout
    assert "e/missing.png not found" in err
    assert (out / "images").resolve() == images.resolve()
    assert sum(len(v) for v in load_annotation(out / "annotation.json").values()) == 3
    code, stdout, _ = run(["csv", "--check", "--output", str(out)], capsys)
    assert code == 0 and "ok: train 1, val 1, test 1 entries, 6 image files" in stdout


def test_seeded_split_columns_copy_and_gzip(images, tmp_path, capsys):
    rows = ["study,text,frontal,lateral"] + [
        f"{s}{n},Report {n} of {s}.,{s}/front.png,{s}/side.png" for s in "abcde" for n in range(2)
    ]
    table = tmp_path / "studies.csv.gz"
    table.write_bytes(gzip.compress("\n".join(rows).encode()))
    out = tmp_path / "mine"
    args = ["--id-column", "study", "--report-column", "text", "--image-columns", "frontal,lateral", "--copy-images"]
    code, stdout, err = prepare(table, images, out, capsys, *args)
    assert code == 0, err
    ann = json.loads((out / "annotation.json").read_text())
    assert [len(ann[s]) for s in ("train", "val", "test")] == [7, 1, 2]
    assert not (out / "images").is_symlink()
    assert (out / "images" / "c" / "side.png").read_bytes() == (images / "c" / "side.png").read_bytes()
    again = tmp_path / "again"
    assert prepare(table, images, again, capsys, *args)[0] == 0
    assert (again / "annotation.json").read_text() == (out / "annotation.json").read_text()
    # one view per study for the mimic_cxr preset
    one = tmp_path / "one"
    code, _, err = prepare(table, images, one, capsys, *args, "--preset", "mimic_cxr")
    assert code == 0, err
    assert all(len(e["image_path"]) == 1 for v in json.loads((one / "annotation.json").read_text()).values() for e in v)
    code, stdout, _ = run(["csv", "--check", "--preset", "mimic_cxr", "--output", str(one)], capsys)
    assert code == 0
    code, _, err = run(["csv", "--check", "--output", str(one)], capsys)
    assert code == 2 and "1 image(s), expected 2" in err


def test_relative_to_root(tmp_path):
    assert relative_to_root(tmp_path, "a/b.png") == "a/b.png"
    assert relative_to_root(tmp_path, "a/../b.png") == "b.png"
    assert relative_to_root(tmp_path, str(tmp_path / "x.png")) == "x.png"
    assert relative_to_root(tmp_path, "../b.png") is None
    assert relative_to_root(tmp_path, "a/../../b.png") is None
    assert relative_to_root(tmp_path, "/etc/passwd") is None
    assert relative_to_root(tmp_path, ".") is None


@pytest.mark.parametrize(
    "case, text, expect",
    [
        (
            "outside",
            "id,report,image_path\na,x,../secret.png;a/side.png\n",
            "line 2: image path '../secret.png' is outside --image-root",
        ),
        ("missing_column", "id,text,image_path\na,x,a/front.png\n", "missing column(s) report"),
        (
            "duplicate",
            "id,report,image_path\na,x,a/front.png;a/side.png\nb,y,b/front.png\na,z,c/front.png\n",
            "line 4: duplicate id 'a' (first on line 2)",
        ),
        ("bad_split", "id,report,image_path,split\na,x,a/front.png;a/side.png,dev\n", "line 2: split 'dev' is not"),
        ("empty_id", "id,report,image_path\n,x,a/front.png\n", "line 2: empty 'id'"),
        ("ragged", "id,report,image_path\na,x,a/front.png,extra\n", "line 2: 3 columns expected"),
        ("no_rows", "id,report,image_path\n", "no rows"),
        ("not_utf8", "id,report,image_path\na,caf\xe9,a/front.png\n", "not UTF-8 text (invalid byte 0xe9"),
        ("strict", "id,report,image_path\na,x,a/front.png;a/nothere.png\n", "a/nothere.png not found"),
    ],
)
def test_bad_tables(images, tmp_path, capsys, case, text, expect):
    table = write(tmp_path / "t.csv", text, "latin-1" if case == "not_utf8" else "utf-8")
    out = tmp_path / "out"
    code, _, err = prepare(table, images, out, capsys, *(["--strict"] if case == "strict" else []))
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and expect in last and "t.csv" in last, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_image_root_and_flags(images, tmp_path, capsys):
    table = write(tmp_path / "t.csv", TABLE)
    code, _, err = prepare(table, tmp_path / "nowhere", tmp_path / "out", capsys)
    assert code == 2 and "--image-root" in err and "not found" in err
    code, _, err = run(["csv", "--table", str(table), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "--image-root required" in err

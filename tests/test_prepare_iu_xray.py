"""cmn-prepare iu_xray on Open-i archives in the real format (tests/helpers/openi.py)."""

import json
import shutil
import tarfile

import pytest

from cmn.data.annotation import load_annotation
from cmn.prepare.cli import main
from cmn.prepare.iu_xray import parse_report, study_id
from helpers.openi import Report, images_for, png_bytes, report_xml, write_images_tgz, write_reports_tgz

FINDINGS = {
    1: "The cardiac silhouette and mediastinum size are within normal limits. There is no focal consolidation.",
    2: "Heart size is mildly enlarged. No pleural effusion or pneumothorax.",
    5: "The lungs are clear. No XXXX of a pleural effusion.",
    6: "Low lung volumes. Bibasilar atelectasis.",
}
NORMAL = "Heart size is normal. The lungs are clear. No pneumothorax or pleural effusion."


def fixture_reports() -> list[Report]:
    reports = [
        # parentImage order is not name order; id and views follow the names
        Report(
            1,
            FINDINGS[1],
            "Normal chest x-XXXX.",
            image_ids=["CXR1_1_IM-0001-4001", "CXR1_1_IM-0001-3001"],
            mesh_major=["normal"],
            mesh_automatic=["heart"],
        ),
        # three images: the first two by name are the views, all three are written
        Report(
            2,
            FINDINGS[2],
            "Cardiomegaly.",
            image_ids=["CXR2_IM-0652-2001", "CXR2_IM-0652-1001-0001", "CXR2_IM-0652-1001"],
            mesh_major=["Cardiomegaly/mild"],
        ),
        Report(3, None, "No acute disease.", image_ids=["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"]),
        Report(4, "One view only. Lungs clear.", "Clear.", image_ids=["CXR4_IM-2050-1001"]),
        Report(5, FINDINGS[5], "Negative.", image_ids=["CXR5_IM-2117-1003", "CXR5_IM-2117-2001"]),  # 2001 missing
        Report(6, FINDINGS[6], "Atelectasis.", image_ids=["CXR6_IM-2000-4004", "CXR6_IM-2000-0001-0001"]),
    ]
    reports += [
        Report(
            n, f"{NORMAL} Study {n}.", "Normal.", image_ids=[f"CXR{n}_IM-{3000 + n}-1001", f"CXR{n}_IM-{3000 + n}-2001"]
        )
        for n in range(7, 17)
    ]
    return reports


BROKEN_XML = b'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><MedlineCitation>\n'
# declared UTF-8, written in Latin-1
LATIN1_XML = report_xml(Report(18, "Caf\u00e9 au lait spots.", image_ids=["CXR18_IM-0001-1001"])).replace(
    "Caf\u00e9".encode(), b"Caf\xe9"
)


@pytest.fixture(scope="module")
def openi(tmp_path_factory):
    root = tmp_path_factory.mktemp("openi")
    reports = fixture_reports()
    images = images_for(reports, skip=("CXR5_IM-2117-2001",))
    images["CXR999_IM-9999-1001"] = png_bytes(999)  # referenced by no report
    return {
        "root": root,
        "images": images,
        "reports_tgz": write_reports_tgz(
            root / "NLMCXR_reports.tgz",
            reports,
            extra={"ecgen-radiology/17.xml": BROKEN_XML, "ecgen-radiology/18.xml": LATIN1_XML},
        ),
        "png_tgz": write_images_tgz(root / "NLMCXR_png.tgz", images),
    }


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def prepare(openi, out, capsys, *extra):
    return run(
        [
            "iu_xray",
            "--reports",
            str(openi["reports_tgz"]),
            "--images",
            str(openi["png_tgz"]),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ],
        capsys,
    )


GOLDEN_IDS = ["CXR1_1_IM-0001", "CXR2_IM-0652", "CXR6_IM-2000-0001"] + [f"CXR{n}_IM-{3000 + n}" for n in range(7, 17)]
# seeded_split(GOLDEN_IDS, seed 0, 70/10/20): 13 studies -> 9 / 1 / 3
GOLDEN_SPLIT = {"val": ["CXR14_IM-3014"], "test": ["CXR10_IM-3010", "CXR16_IM-3016", "CXR9_IM-3009"]}


def test_parse_report_reads_the_real_structure():
    r = fixture_reports()[0]
    rep = parse_report(report_xml(r), "ecgen-radiology/1.xml")
    assert rep.sections == {
        "COMPARISON": "None.",
        "INDICATION": "Chest pain",
        "FINDINGS": FINDINGS[1],
        "IMPRESSION": "Normal chest x-XXXX.",
    }
    assert rep.image_ids == ("CXR1_1_IM-0001-4001", "CXR1_1_IM-0001-3001")
    assert rep.mesh_major == ("normal",) and rep.mesh_automatic == ("heart",)
    assert rep.number == 1
    empty = parse_report(report_xml(fixture_reports()[2]), "3.xml")
    assert "FINDINGS" not in empty.sections  # <AbstractText Label="FINDINGS"/>


def test_study_id_rule():
    assert study_id(["CXR2384_IM-0942-2001", "CXR2384_IM-0942-1001"]) == "CXR2384_IM-0942"
    assert study_id(["CXR3912_IM-1988-2001-0001", "CXR3912_IM-1988-1001"]) == "CXR3912_IM-1988"
    assert study_id(["CXR372_IM-1858-4004", "CXR372_IM-1858-0001-0001"]) == "CXR372_IM-1858-0001"
    assert study_id(["CXR1_1_IM-0001-4001", "CXR1_1_IM-0001-3001"]) == "CXR1_1_IM-0001"


def test_golden_output(openi, tmp_path, capsys):
    out = tmp_path / "iu"
    code, stdout, stderr = prepare(openi, out, capsys)
    assert code == 0, stderr
    ann = json.loads((out / "annotation.json").read_text())
    entries = {e["id"]: e for split in ann.values() for e in split}
    assert sorted(entries) == sorted(GOLDEN_IDS)
    for split in ("val", "test"):
        assert sorted(e["id"] for e in ann[split]) == sorted(GOLDEN_SPLIT[split])
    assert len(ann["train"]) == 9
    assert entries["CXR1_1_IM-0001"] == {
        "id": "CXR1_1_IM-0001",
        "report": FINDINGS[1],
        "split": "train",
        "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"],
        "mesh": {"major": ["normal"], "automatic": ["heart"]},
    }
    assert entries["CXR2_IM-0652"]["report"] == FINDINGS[2]
    # views in file-name order; every image of the study is written
    images = openi["images"]
    folder = out / "images" / "CXR1_1_IM-0001"
    assert (folder / "0.png").read_bytes() == images["CXR1_1_IM-0001-3001"]
    assert (folder / "1.png").read_bytes() == images["CXR1_1_IM-0001-4001"]
    folder = out / "images" / "CXR2_IM-0652"
    assert [(folder / f"{k}.png").read_bytes() for k in range(3)] == [
        images["CXR2_IM-0652-1001"],
        images["CXR2_IM-0652-1001-0001"],
        images["CXR2_IM-0652-2001"],
    ]
    # dropped, with reasons, on screen and in dropped.tsv
    dropped = (out / "dropped.tsv").read_text().splitlines()
    assert dropped == [
        "name\treason",
        "ecgen-radiology/17.xml\tunreadable report",
        "ecgen-radiology/18.xml\tunreadable report",
        "ecgen-radiology/3.xml\tno findings",
        "ecgen-radiology/4.xml\tfewer than 2 images",
        "ecgen-radiology/5.xml\tmissing image",
    ]
    assert "iu_xray: kept 13 studies (train 9, val 1, test 3)" in stdout
    assert "dropped 5 studies:" in stdout
    assert "note: 1 studies with more than 2 images" in stdout
    assert "read 18 report files and 32 images" in stdout
    assert "ecgen-radiology/17.xml: XML does not parse" in stderr
    assert "CXR5_IM-2117-2001.png not found" in stderr
    assert "ecgen-radiology/18.xml: XML does not parse (not well-formed (invalid token)" in stderr
    assert "warnings: 2 unreadable report files" in stdout
    # cmn's own loader accepts it, and --check agrees
    assert sum(len(v) for v in load_annotation(out / "annotation.json").values()) == 13
    code, stdout, _ = run(["iu_xray", "--check", "--output", str(out)], capsys)
    assert code == 0 and "ok: train 9, val 1, test 3 entries, 26 image files" in stdout


def test_folders_give_the_same_output(openi, tmp_path, capsys):
    src = tmp_path / "src"
    for name in ("reports_tgz", "png_tgz"):
        with tarfile.open(openi[name]) as tar:
            tar.extractall(src / name, filter="data")
    a, b = tmp_path / "a", tmp_path / "b"
    assert prepare(openi, a, capsys)[0] == 0
    code, _, err = run(
        [
            "iu_xray",
            "--reports",
            str(src / "reports_tgz"),
            "--images",
            str(src / "png_tgz"),
            "--output",
            str(b),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert (a / "annotation.json").read_text() == (b / "annotation.json").read_text()
    assert sorted(p.relative_to(a) for p in (a / "images").rglob("*.png")) == sorted(
        p.relative_to(b) for p in (b / "images").rglob("*.png")
    )


def test_split_from_reuses_a_published_split(openi, tmp_path, capsys):
    published = {
        "train": [
            {"id": "CXR9_IM-3009", "report": "x", "image_path": ["CXR9_IM-3009/0.png"], "split": "train"},
            {"id": "CXR1_1_IM-0001", "report": "x", "image_path": [], "split": "train"},
        ],
        "val": [{"id": "CXR2_IM-0652", "report": "x", "image_path": []}],
        "test": [
            {"id": "CXR7_IM-3007", "report": "x", "image_path": []},
            {"id": "CXR404_IM-0001", "report": "x", "image_path": []},
        ],
    }
    other = tmp_path / "published.json"
    other.write_text(json.dumps(published))
    out = tmp_path / "iu"
    code, stdout, err = prepare(openi, out, capsys, "--split-from", str(other))
    assert code == 0, err
    ann = json.loads((out / "annotation.json").read_text())
    assert {k: [e["id"] for e in v] for k, v in ann.items()} == {
        "train": ["CXR9_IM-3009", "CXR1_1_IM-0001"],
        "val": ["CXR2_IM-0652"],
        "test": ["CXR7_IM-3007"],
    }
    assert "9  id not in --split-from" in stdout
    assert "4 of 5 ids prepared" in stdout


@pytest.mark.parametrize(
    "flags, kept, report_of_3",
    [
        (["--section", "impression"], 14, "No acute disease."),
        (["--section", "both"], 14, "No acute disease."),
        (["--impression-fallback"], 14, "No acute disease."),
    ],
)
def test_sections(openi, tmp_path, capsys, flags, kept, report_of_3):
    out = tmp_path / "iu"
    code, stdout, err = prepare(openi, out, capsys, *flags)
    assert code == 0, err
    entries = {e["id"]: e for v in json.loads((out / "annotation.json").read_text()).values() for e in v}
    assert len(entries) == kept
    assert entries["CXR3_IM-1384"]["report"] == report_of_3
    if flags == ["--section", "both"]:
        assert entries["CXR2_IM-0652"]["report"] == FINDINGS[2] + " Cardiomegaly."


def test_seed_changes_the_split_only(openi, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert prepare(openi, a, capsys)[0] == 0
    assert prepare(openi, b, capsys, "--seed", "3")[0] == 0
    ids = [{e["id"] for v in json.loads((d / "annotation.json").read_text()).values() for e in v} for d in (a, b)]
    assert ids[0] == ids[1]
    assert (a / "annotation.json").read_text() != (b / "annotation.json").read_text()


def test_strict_stops_at_a_broken_report(openi, tmp_path, capsys):
    out = tmp_path / "iu"
    code, _, err = prepare(openi, out, capsys, "--strict")
    assert code == 2
    assert err.startswith("error: ") and "ecgen-radiology/17.xml: XML does not parse" in err
    assert "(--strict)" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".iu.tmp-*"))


def test_existing_output_needs_force(openi, tmp_path, capsys):
    out = tmp_path / "iu"
    assert prepare(openi, out, capsys)[0] == 0
    code, _, err = prepare(openi, out, capsys)
    assert code == 2 and "already exists (pass --force" in err
    assert prepare(openi, out, capsys, "--force", "--seed", "1")[0] == 0
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    code, _, err = prepare(openi, stranger, capsys, "--force")
    assert code == 2 and "not a cmn-prepare output" in err
    assert (stranger / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "case",
    [
        "garbage_archive",
        "truncated_archive",
        "no_reports",
        "missing_flag",
        "output_holds_input",
        "bad_fractions",
        "images_not_found",
    ],
)
def test_bad_inputs(openi, tmp_path, capsys, case):
    reports, images = openi["reports_tgz"], openi["png_tgz"]
    out = tmp_path / "out"
    if case == "garbage_archive":
        reports = tmp_path / "NLMCXR_reports.tgz"
        reports.write_bytes(b"this is not a tar archive" * 10)
        expect = "NLMCXR_reports.tgz: not a readable .tgz archive"
    elif case == "truncated_archive":
        images = tmp_path / "NLMCXR_png.tgz"
        images.write_bytes(openi["png_tgz"].read_bytes()[:-200])
        expect = "NLMCXR_png.tgz: damaged or truncated archive"
    elif case == "no_reports":
        reports = tmp_path / "empty"
        reports.mkdir()
        expect = "no .xml report files found"
    elif case == "images_not_found":
        images = tmp_path / "nothing.tgz"
        expect = "--images " + str(images) + ": not found"
    elif case == "output_holds_input":
        out = openi["root"]
        expect = "holds the input"
    args = ["iu_xray", "--reports", str(reports), "--images", str(images), "--output", str(out), "--no-progress"]
    if case == "missing_flag":
        args = ["iu_xray", "--reports", str(reports), "--output", str(out)]
        expect = "--images required"
    if case == "bad_fractions":
        args += ["--split-fractions", "0.5", "0.1", "0.1"]
        expect = "must add up to 1"
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert err.splitlines()[-1].startswith("error: ") and expect in err.splitlines()[-1], err
    assert "Traceback" not in err
    if case != "output_holds_input":
        assert not out.exists() and not list(out.parent.glob(".out.tmp-*"))


def test_check_finds_problems(openi, tmp_path, capsys):
    out = tmp_path / "iu"
    assert prepare(openi, out, capsys)[0] == 0
    (out / "images" / "CXR7_IM-3007" / "1.png").unlink()
    (out / "images" / "CXR8_IM-3008" / "0.png").write_bytes(b"not a png")
    code, _, err = run(["iu_xray", "--check", "--output", str(out)], capsys)
    assert code == 2
    assert "2 problem(s)" in err and "CXR7_IM-3007/1.png not found" in err and "CXR8_IM-3008/0.png is not a" in err
    shutil.rmtree(out / "images")
    code, _, err = run(["iu_xray", "--check", "--output", str(out)], capsys)
    assert code == 2 and "image folder" in err and "not found" in err

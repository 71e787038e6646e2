"""cmn-train and cmn-generate end to end on a tiny demo configuration, and their bad inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmn.cli import generate_main, train_main
from helpers.tiny import TINY_DEMO_FLAGS

TINY = [
    *TINY_DEMO_FLAGS,
    "--epochs",
    "1",
    "--beam-size",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:  # set for this module's training only, restored after
        mp.setenv("CMN_DEMO_DIR", str(root / "demo"))
        out = root / "run"
        assert train_main(TINY + ["--output-dir", str(out), "--quiet"]) == 0
    return root, out


@pytest.fixture(autouse=True)
def demo_env(trained, monkeypatch):
    monkeypatch.setenv("CMN_DEMO_DIR", str(trained[0] / "demo"))


def demo_study(root: Path, index: int = 0) -> list[str]:
    ann = json.loads((root / "demo" / "annotation.json").read_text())
    entry = ann["test"][index]
    return [str(root / "demo" / "images" / p) for p in entry["image_path"]]


def test_train_writes_metrics(trained):
    _, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val", "test", "baseline_test"} <= set(metrics)
    assert 0.0 <= metrics["test"]["BLEU_4"] <= 1.0
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_generate_text_and_jsonl(trained, capsys):
    root, out = trained
    views = demo_study(root, 0) + demo_study(root, 1)
    assert generate_main(["--checkpoint", str(out / "checkpoint"), *views]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert generate_main(["--checkpoint", str(out / "checkpoint"), "--format", "jsonl", *views[:2]]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["report"] == lines[0] and len(rec["images"]) == 2


def test_generate_from_study_folders_and_list(trained, tmp_path, capsys):
    root, out = trained
    for i in range(2):
        d = tmp_path / "studies" / f"s{i}"
        d.mkdir(parents=True)
        for j, v in enumerate(demo_study(root, i)):
            shutil.copy(v, d / f"{j}.png")
    assert generate_main(["--checkpoint", str(out / "checkpoint"), "--format", "jsonl", str(tmp_path / "studies")]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in recs] == ["s0", "s1"]
    lst = tmp_path / "list.txt"
    lst.write_text(" ".join(demo_study(root, 0)) + "\n")
    assert generate_main(["--checkpoint", str(out / "checkpoint"), "--list", str(lst)]) == 0
    assert capsys.readouterr().out.splitlines() == [recs[0]["report"]]


def test_console_scripts_run_as_installed(trained):
    root, out = trained
    exe = Path(sys.executable).parent / "cmn-generate"
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from cmn.cli import generate_main; import sys; sys.exit(generate_main())"]
    )
    proc = subprocess.run(
        cmd + ["--checkpoint", str(out / "checkpoint"), *demo_study(root, 2)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


@pytest.mark.parametrize("case", ["missing_image", "odd_views", "no_checkpoint", "corrupt_png", "no_studies"])
def test_generate_bad_inputs(trained, tmp_path, capsys, case):
    root, out = trained
    ck = ["--checkpoint", str(out / "checkpoint")]
    views = demo_study(root, 0)
    if case == "missing_image":
        args, expect = ck + [views[0], str(tmp_path / "missing.png")], "missing.png: no such image"
    elif case == "odd_views":
        args, expect = ck + views + views[:1], "2 views per study"
    elif case == "no_checkpoint":
        args, expect = ["--checkpoint", str(tmp_path / "nothing"), *views], "no such checkpoint folder"
    elif case == "corrupt_png":
        bad = tmp_path / "bad.png"
        bad.write_bytes(Path(views[0]).read_bytes()[:200])
        args, expect = ck + [views[0], str(bad)], "bad.png"
    else:
        args, expect = ck, "no studies given"
    assert generate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err
    assert "Traceback" not in err


def test_train_bad_inputs(tmp_path, capsys):
    cases = [
        (["--dataset", "iu_xray"], "--ann-path FILE and --image-dir DIR"),
        (
            ["--dataset", "iu_xray", "--ann-path", str(tmp_path / "a.json"), "--image-dir", str(tmp_path)],
            "a.json: no such file",
        ),
        (TINY + ["--device", "cuda:7"], "--device cuda:7"),
        (TINY + ["--topk", "64"], "--topk"),
    ]
    notjson = tmp_path / "ann.json"
    notjson.write_text("{oops")
    cases.append(
        (
            [
                "--dataset",
                "iu_xray",
                "--ann-path",
                str(notjson),
                "--image-dir",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "o"),
            ],
            "ann.json",
        )
    )
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root writes anywhere: use a path under a file instead
        cases.append((TINY + ["--output-dir", str(ro / "x")], "not writable"))
    (tmp_path / "afile").write_text("")
    cases.append((TINY + ["--output-dir", str(tmp_path / "afile" / "x")], "--output-dir"))
    for args, expect in cases:
        assert train_main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expect in err, (args, err)

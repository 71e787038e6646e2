"""cmn-compare: variants x seeds and a sweep, tiny, end to end (runs are normal run folders)."""

import json

import pytest

from cmn.compare import main, plan, summarize

TINY = [
    "--demo-size",
    "8",
    "4",
    "4",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--d-model",
    "16",
    "--d-ff",
    "16",
    "--num-heads",
    "2",
    "--num-layers",
    "1",
    "--memory-size",
    "16",
    "--topk",
    "4",
    "--epochs",
    "1",
    "--beam-size",
    "2",
    "--no-progress",
    "--quiet",
    "--eval-max-batches",
    "1",
]


@pytest.fixture(autouse=True)
def demo_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CMN_DEMO_DIR", str(tmp_path_factory.getbasetemp() / "demo-compare"))


def test_plan_and_summary():
    runs = plan(["base", "cmn"], [], [0, 1])
    assert [r.folder for r in runs] == ["base-s0", "base-s1", "cmn-s0", "cmn-s1"]
    sweep = plan(["cmn"], [("topk", ["4", "8"])], [0])
    assert [r.flags for r in sweep] == [("--model", "cmn", "--topk", "4"), ("--model", "cmn", "--topk", "8")]
    s = summarize({"cmn": [{"test": {"BLEU_4": 0.2}}, {"test": {"BLEU_4": 0.4}}]})
    assert s["cmn"]["BLEU_4"]["mean"] == pytest.approx(0.3)
    assert s["cmn"]["BLEU_4"]["std"] == pytest.approx(0.1414213562, rel=1e-6)  # sample std of 0.2, 0.4


def test_demo_findings_per_finding_tables():
    """On demo data each drawn finding gets its own mean ± std (F1, and sides where stated),
    in the demo's finding order, not the JSON's alphabetical one."""
    from cmn.compare import markdown

    def run(f1_nodule, side_effusion):
        return {
            "test": {"BLEU_4": 0.5},
            "demo_findings": {
                "device": {"f1": 1.0, "laterality": None},
                "effusion": {"f1": 0.9, "laterality": side_effusion},
                "nodule": {"f1": f1_nodule, "laterality": None},
                "macro_f1": {"f1": 0.5},
            },
        }

    s = summarize({"cmn": [run(0.6, 1.0), run(0.8, None)]})
    assert s["cmn"]["finding_F1/nodule"]["mean"] == pytest.approx(0.7)
    assert s["cmn"]["finding_side/effusion"] == {
        "mean": 1.0,
        "std": 0.0,
        "n": 1,
    }  # a run with no stated side adds nothing
    assert "finding_side/device" not in s["cmn"]
    table = markdown(s, [0, 1], "t")
    assert "| model | effusion | nodule | device |" in table
    assert "| BASE+CMN | 0.900 ± 0.000 | 0.700 ± 0.141 | 1.000 ± 0.000 |" in table
    assert "| model | effusion |\n" in table


@pytest.mark.slow
def test_variants_and_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--model", "base,cmn", "--seeds", "0,1", "--output-dir", str(out), *TINY]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["summary"]) == {"base", "cmn"}
    assert result["summary"]["cmn"]["BLEU_4"]["n"] == 2
    table = (out / "comparison.md").read_text()
    assert "| BASE |" in table and "| BASE+CMN |" in table and "±" in table
    assert "Drawn findings (demo data): F1" in table and "| model | cardiomegaly | effusion |" in table
    assert (out / "cmn-s1" / "checkpoint" / "model.safetensors").is_file()  # a normal run folder
    # a finished run is not redone; a missing one is run
    before = (out / "base-s0" / "metrics.json").stat().st_mtime_ns
    assert main(["--model", "base,cmn,mem", "--seeds", "0,1", "--output-dir", str(out), *TINY]) == 0
    assert (out / "base-s0" / "metrics.json").stat().st_mtime_ns == before
    assert set(json.loads((out / "comparison.json").read_text())["summary"]) == {"base", "cmn", "mem"}
    assert "done before, kept" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_a_plot(tmp_path):
    out = tmp_path / "sweep"
    i = TINY.index("--memory-size")
    args = TINY[:i] + TINY[i + 2 :]  # the sweep sets it
    assert main(["--model", "cmn", "--seeds", "0", "--sweep", "memory_size=8,16", "--output-dir", str(out), *args]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["summary"]) == {"memory_size=8", "memory_size=16"}
    assert (out / "sweep_memory_size.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "cmn,transformer"], "--model"),
        (["--seeds", "0,x"], "--seeds"),
        (["--sweep", "lr=1,2"], "--sweep"),
        (["--seed", "3"], "--seed"),
    ],
)
def test_bad_arguments(args, needle, tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1

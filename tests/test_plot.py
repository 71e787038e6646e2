"""cmn-plot: training curves from a run folder's log.jsonl, and its bad inputs."""

import json
import math
import sys

import pytest
from PIL import Image

from cmn.viz.plot import main, read_log


def record(epoch, **extra):
    """A log.jsonl line as cmn-train writes it (cmn.train._fit)."""
    r = {
        "epoch": epoch,
        "train_loss": 3.0 / epoch,
        "train_tokens": 1e4,
        "train_batches": 10,
        "train_seconds": 20.0,
        "train_tokens_per_s": 500.0 + epoch,
        "lr_ve": 1e-3,
        "lr_ed": 1e-3,
        "val_BLEU_1": 0.3 + 0.05 * epoch,
        "val_BLEU_2": 0.2,
        "val_BLEU_3": 0.15,
        "val_BLEU_4": 0.1 + 0.01 * epoch,
        "val_METEOR": math.nan,
        "val_ROUGE_L": 0.4,
        "val_CIDEr": 0.2,
        "best_epoch": epoch,
    }
    r.update(extra)
    return json.dumps(r)  # NaN as cmn-train writes it when java is missing


@pytest.fixture()
def run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        record(1),
        record(2),
        record(3, val_CE_F1=0.2, val_CE_precision=0.3, val_CE_recall=0.25),
        record(3, train_loss=0.5, val_CE_F1=0.3),
    ]  # a resumed run re-logged epoch 3: the later line wins
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_writes_the_curves(run, capsys):
    assert main([str(run)]) == 0
    out = run / "plots"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves.png", "loss.png", "throughput.png", "val_ce.png", "val_nlg.png"]
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300
    assert "3 epoch(s)" in capsys.readouterr().out
    records = read_log(run / "log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["train_loss"] == 0.5


def test_no_ce_panel_without_ce(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "log.jsonl").write_text(record(1) + "\n")
    assert main([str(run), "--output", str(tmp_path / "figs")]) == 0
    assert not (tmp_path / "figs" / "val_ce.png").exists() and (tmp_path / "figs" / "curves.png").exists()


@pytest.mark.parametrize("case", ["no folder", "no log", "bad json", "no epoch", "empty"])
def test_bad_inputs_are_one_error_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "no folder":
        run.mkdir()
    text = {"bad json": record(1) + "\n{oops\n", "no epoch": '{"loss": 1}\n', "empty": "\n"}.get(case)
    if text is not None:
        (run / "log.jsonl").write_text(text)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_missing_matplotlib_is_a_clear_error(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main([str(run)]) == 2
    assert "pip install 'cmn[plot]'" in capsys.readouterr().err

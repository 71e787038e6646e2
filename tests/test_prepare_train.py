"""A dataset made by cmn-prepare trains: Open-i archives -> cmn-prepare iu_xray -> cmn-train."""

import json

import pytest

from cmn.cli import train_main
from cmn.prepare.cli import main as prepare_main
from helpers.openi import Report, images_for, write_images_tgz, write_reports_tgz

TINY_MODEL = [
    "--image-size",
    "64",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--d-model",
    "32",
    "--d-ff",
    "32",
    "--num-heads",
    "4",
    "--num-layers",
    "1",
    "--memory-size",
    "32",
    "--topk",
    "4",
    "--epochs",
    "1",
    "--beam-size",
    "2",
    "--visual-extractor",
    "resnet18",
    "--visual-weights",
    "none",
    "--threshold",
    "1",
    "--no-progress",
    "--quiet",
]
SENTENCES = [
    "The heart is normal in size.",
    "The lungs are clear.",
    "No pleural effusion.",
    "Mild cardiomegaly.",
    "Small left effusion.",
    "No pneumothorax.",
]


@pytest.mark.slow  # METEOR (Java) on validation and test takes most of it
def test_prepared_iu_xray_trains_one_epoch(tmp_path, capsys):
    reports = [
        Report(
            n,
            " ".join(SENTENCES[(n + k) % len(SENTENCES)] for k in range(3)),
            "Normal.",
            image_ids=[f"CXR{n}_IM-{1000 + n}-1001", f"CXR{n}_IM-{1000 + n}-2001"],
        )
        for n in range(1, 13)
    ]
    reports_tgz = write_reports_tgz(tmp_path / "NLMCXR_reports.tgz", reports)
    png_tgz = write_images_tgz(tmp_path / "NLMCXR_png.tgz", images_for(reports))
    data = tmp_path / "iu_xray"
    assert (
        prepare_main(
            ["iu_xray", "--reports", str(reports_tgz), "--images", str(png_tgz), "--output", str(data), "--no-progress"]
        )
        == 0
    )
    assert "kept 12 studies (train 9, val 1, test 2)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--dataset",
                "iu_xray",
                "--ann-path",
                str(data / "annotation.json"),
                "--image-dir",
                str(data / "images"),
                "--output-dir",
                str(run),
                *TINY_MODEL,
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["BLEU_4"] <= 1.0
    assert (run / "checkpoint" / "model.safetensors").is_file()

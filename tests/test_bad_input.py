"""Bad input, table-driven, per command: exit status 2, one ``error:`` line, no traceback.

Numbers are checked at the command-line edge (argparse types from ``cmn.config.BOUNDS``) and
again when a checkpoint's ``config.json`` is read, before anything is allocated.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cmn.checkpoint import save_checkpoint
from cmn.cli import generate_main, train_main
from cmn.metrics.cli import eval_main, label_main
from cmn.model import build_model
from cmn.text import Tokenizer
from helpers.tiny import TINY_DEMO_FLAGS, tiny_cfg

TINY = [
    *TINY_DEMO_FLAGS[2:],  # --dataset comes from each case
    "--epochs",
    "1",
    "--beam-size",
    "2",
    "--no-progress",
    "--quiet",
]


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


TRAIN_CASES = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--image-size", "0"], "--image-size"),
    (["--num-heads", "0"], "--num-heads"),
    (["--d-model", "-5"], "--d-model"),
    (["--dropout", "1.5"], "--dropout"),
    (["--step-size", "0"], "--step-size"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--max-seq-length", "0"], "--max-seq-length"),
    (["--max-seq-length", "1099511627776"], "--max-seq-length"),
    (["--block-ngram", "-1"], "--block-ngram"),
    (["--demo-size", "0", "0", "0"], "--demo-size"),
    (["--lr-ed", "-1e-3"], "--lr-ed"),
    (["--lr-ve", "nan"], "--lr-ve"),
    (["--gamma", "-0.5"], "--gamma"),
    (["--epochs", "0"], "--epochs"),
    (["--beam-size", "3000000000"], "--beam-size"),
    (["--batch-size", "four"], "--batch-size"),
    (["--topk", "1000"], "topk"),
    (["--num-heads", "5"], "divisible"),
    (["--device", "tpu"], "--device"),
    (["--nonsense-flag"], "unrecognized"),
    (["--decode", "reference", "--beam-size", "1"], "--decode reference"),
    (["--resume", "--init-from", "x"], "--init-from"),
    (["--dataset", "iu_xray"], "--ann-path"),
    (["--dataset", "iu_xray", "--ann-path", "missing.json", "--image-dir", "."], "missing.json"),
    (["--dataset", "iu_xray", "--demo-size", "1", "1", "1"], "--demo-size"),
    (["--init-from", "no_such_bundle"], "no_such_bundle"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("args, needle", TRAIN_CASES, ids=[" ".join(a)[:40] for a, _ in TRAIN_CASES])
def test_train_bad_numbers_and_flags(args, needle, tmp_path, capsys):
    base = TINY[4:] if "--dataset" in args else TINY  # --demo-size is for the demo data only
    code = train_main(base + ["--output-dir", str(tmp_path / "run")] + args)
    assert code == 2
    one_error_line(capsys, needle)
    assert not (tmp_path / "run" / "last").exists()


# ---- cmn-generate ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tok = Tokenizer.build(["the heart is normal .", "no effusion ."], 1, "iu_xray")
    torch.manual_seed(0)
    model = build_model(tiny_cfg(vocab_size=len(tok), num_layers=1, max_seq_length=8))
    info = {
        "dataset": "iu_xray",
        "clean_rule": "iu_xray",
        "image_size": 64,
        "num_views": 2,
        "max_seq_length": 8,
        "threshold": 1,
    }
    save_checkpoint(root / "ckpt", model, tok, info)
    img = root / "img.png"
    Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(img)
    return root


def _tampered(bundle, tmp_path, edit):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(bundle / "ckpt", dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _nan_weights(cfg, dst):
    from safetensors.torch import load_file, save_file

    state = load_file(str(dst / "model.safetensors"))
    state["logit.bias"] = torch.full_like(state["logit.bias"], float("nan"))
    save_file(state, str(dst / "model.safetensors"))


GENERATE_CASES = {
    "max-len -5": (["--max-len", "-5"], None, "--max-len"),
    "max-len 0": (["--max-len", "0"], None, "--max-len"),
    "beam 3e9": (["--beam-size", "3000000000"], None, "--beam-size"),
    "batch -1": (["--batch-size", "-1"], None, "--batch-size"),
    "format_version text": ([], lambda c, d: c.update(format_version="2"), "format_version"),
    "no num_views": ([], lambda c, d: c["data"].pop("num_views"), "num_views"),
    "image_size huge": ([], lambda c, d: c["data"].update(image_size=10**9), "image_size"),
    "max_seq_length huge": ([], lambda c, d: c["model"].update(max_seq_length=10**9), "max_seq_length"),
    "d_model string": ([], lambda c, d: c["model"].update(d_model="32"), "d_model"),
    "model not object": ([], lambda c, d: c.update(model=[1, 2]), "model section"),
    "nan weights": ([], _nan_weights, "NaN"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_bad_input(case, bundle, tmp_path, capsys):
    args, edit, needle = GENERATE_CASES[case]
    ckpt = _tampered(bundle, tmp_path, edit) if edit else bundle / "ckpt"
    img = str(bundle / "img.png")
    assert generate_main(["--checkpoint", str(ckpt), "--device", "cpu", *args, img, img]) == 2
    one_error_line(capsys, needle)


def test_generate_corrupt_and_oversized_images(bundle, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes((bundle / "img.png").read_bytes()[:40])
    assert generate_main(["--checkpoint", str(bundle / "ckpt"), "--device", "cpu", str(bad), str(bad)]) == 2
    one_error_line(capsys, "bad.png", "corrupt")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb, cheaply
    img = str(bundle / "img.png")
    assert generate_main(["--checkpoint", str(bundle / "ckpt"), "--device", "cpu", img, img]) == 2
    one_error_line(capsys, "img.png", "too large")


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from cmn.data.images import load_image

    deep = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12 bits in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I;16")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < np.median(pixels) < 155  # the mid grey stays mid grey (clipping made it 255)


# ---- cmn-eval / cmn-label ------------------------------------------------------------------
def test_eval_lone_surrogate_is_an_error(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "a", "prediction": "no \\udcff effusion", "reference": "no effusion"}\n')
    assert eval_main(["--predictions", str(preds), "--no-meteor"]) == 2
    one_error_line(capsys, "surrogate")


def test_long_csv_fields_are_read(tmp_path, capsys):
    long_report = "no pleural effusion . " * 9000  # 198,000 characters, over csv's default limit
    src = tmp_path / "r.csv"
    src.write_text("report\n" + long_report + "\n")
    assert label_main([str(src), "--output", str(tmp_path / "l.csv")]) == 0
    long_word = "x" * 140_000  # one long token: scoring stays cheap (ROUGE-L is quadratic in tokens)
    preds = tmp_path / "p.csv"
    preds.write_text(f"id,prediction,reference\na,{long_word},{long_word} .\n")
    assert eval_main(["--predictions", str(preds), "--no-meteor", "--no-clinical"]) == 0


def test_full_stdout_is_one_error_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    src = tmp_path / "r.txt"
    src.write_text("no effusion .\n")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from cmn.metrics.cli import label_main; sys.exit(label_main(sys.argv[1:]))",
                str(src),
                "--output",
                str(tmp_path / "o.csv"),
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: standard output") and proc.stderr.count("\n") == 1


# ---- training: the run folder, loader workers ------------------------------------------------
@pytest.fixture
def demo_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CMN_DEMO_DIR", str(tmp_path_factory.getbasetemp() / "demo-bad"))


@pytest.mark.slow
def test_run_folder_is_not_reused_without_resume_or_overwrite(tmp_path, capsys, demo_env):
    out = ["--output-dir", str(tmp_path / "run")]
    assert train_main(TINY + out + ["--eval-max-batches", "1"]) == 0
    first = (tmp_path / "run" / "log.jsonl").read_text()
    assert train_main(TINY + out) == 2
    one_error_line(capsys, "already holds a run", "--overwrite")
    assert (tmp_path / "run" / "log.jsonl").read_text() == first
    assert train_main(TINY + out + ["--overwrite", "--eval-max-batches", "1"]) == 0
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(first.splitlines())  # a new run's log (warm-up, epoch 1), nothing appended
    assert [json.loads(x).get("epoch") for x in lines if "warmup_epoch" not in x] == [1]


def test_corrupt_image_in_a_loader_worker_is_one_line(tmp_path, capsys, demo_env):
    from cmn.data.demo import ensure_demo_data

    ann, images = ensure_demo_data(tmp_path / "demo", n_train=8, n_val=4, n_test=4)
    entry = json.loads(ann.read_text())["train"][3]
    victim = images / entry["image_path"][0]
    victim.write_bytes(victim.read_bytes()[:50])
    args = [a for a in TINY[4:] if a not in ("--num-workers", "0")]  # no --demo-size, no --num-workers 0
    code = train_main(
        args
        + [
            "--num-workers",
            "1",
            "--dataset",
            "iu_xray",
            "--ann-path",
            str(ann),
            "--image-dir",
            str(images),
            "--visual-weights",
            "none",
            "--visual-extractor",
            "resnet18",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    one_error_line(capsys, str(victim), "corrupt")

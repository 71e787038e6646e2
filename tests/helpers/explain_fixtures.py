"""Small inputs for the explanation tests: demo studies and a tiny checkpoint bundle, made here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cmn.checkpoint import load_checkpoint, save_checkpoint
from cmn.data.demo import ensure_demo_data
from cmn.model import build_model
from cmn.text import Tokenizer
from helpers.tiny import tiny_cfg

IMAGE_SIZE = 64  # a 2 x 2 patch grid per view with ResNet-18


def demo_data(root: Path) -> Path:
    """A 4/1/4-study demo set at 64 px (what cmn.data.demo writes for users)."""
    ensure_demo_data(root, n_train=4, n_val=1, n_test=4, image_size=IMAGE_SIZE)
    return root


def demo_views(root: Path, split: str = "test", index: int = 0) -> list[Path]:
    entry = json.loads((root / "annotation.json").read_text())[split][index]
    return [root / "images" / p for p in entry["image_path"]]


def demo_reports(root: Path, split: str = "train") -> list[str]:
    return [e["report"] for e in json.loads((root / "annotation.json").read_text())[split]]


def tiny_bundle(path: Path, demo_root: Path, variant: str = "cmn", seed: int = 0) -> Path:
    """A randomly initialised tiny model with a vocabulary of the demo reports, as a checkpoint."""
    torch.manual_seed(seed)
    reports = demo_reports(demo_root, "train") + demo_reports(demo_root, "test")
    tok = Tokenizer.build(reports, 1, "iu_xray")
    model = build_model(tiny_cfg(vocab_size=len(tok), variant=variant, max_seq_length=12)).eval()
    info = {"dataset": "demo", "clean_rule": "iu_xray", "image_size": IMAGE_SIZE, "num_views": 2, "max_seq_length": 60}
    return save_checkpoint(path, model, tok, info)


def tiny_model(path: Path, demo_root: Path, variant: str = "cmn"):
    return load_checkpoint(tiny_bundle(path, demo_root, variant))

"""Kills at every step of a bundle save, one or two in a row, keep one loadable bundle.

A save is: write a temporary folder; set the old bundle aside (``.<name>.previous``); rename the
new one into place; delete the set-aside copy. Simulated kills stop the save at each of its
filesystem steps (renames and deletions, a deletion also half done); real ``kill -9`` trials
hit a saving process at random moments.
"""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmn.checkpoint import load_checkpoint, resolve_bundle, save_checkpoint
from cmn.fsutil import remove_stale_temps
from cmn.model import build_model
from cmn.text import Tokenizer
from helpers.tiny import tiny_cfg

INFO = {
    "dataset": "iu_xray",
    "clean_rule": "iu_xray",
    "image_size": 64,
    "num_views": 2,
    "max_seq_length": 8,
    "threshold": 1,
}


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs (no cleanup handlers of ours)."""


@pytest.fixture(scope="module")
def parts():
    tok = Tokenizer.build(["the heart is normal ."], 1, "iu_xray")
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg(
            vocab_size=len(tok), d_model=16, d_ff=16, num_heads=2, num_layers=1, memory_size=8, topk=2, max_seq_length=8
        )
    )
    return model, tok


def _save(path, model, tok, epoch):
    save_checkpoint(path, model, tok, INFO, meta={"epoch": epoch})


def _steps(monkeypatch, kill_at):
    """Count the save's filesystem steps; raise Killed at step ``kill_at`` (a deletion then
    removes one file first, like a kill in the middle of it)."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    count = [0]

    def step():
        count[0] += 1
        return count[0] == kill_at

    def replace(src, dst):
        if os.path.isdir(src) and step():
            raise Killed
        real_replace(src, dst)

    def rmtree(path, *a, **k):
        if step():
            files = [p for p in Path(path).rglob("*") if p.is_file()]
            if files:
                files[0].unlink()
            raise Killed
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return count


def _loadable_epoch(path):
    return load_checkpoint(path).meta["epoch"]


def _count_steps(tmp_path, parts, monkeypatch):
    model, tok = parts
    path = tmp_path / "count" / "last"
    _save(path, model, tok, 1)
    with monkeypatch.context() as m:
        count = _steps(m, kill_at=-1)
        _save(path, model, tok, 2)
    return count[0]


def test_one_kill_at_every_step(tmp_path, parts, monkeypatch):
    model, tok = parts
    n = _count_steps(tmp_path, parts, monkeypatch)
    assert n >= 3  # set aside, rename into place, delete the old copy
    for k in range(1, n + 1):
        path = tmp_path / f"one{k}" / "last"
        _save(path, model, tok, 1)
        with monkeypatch.context() as m:
            _steps(m, kill_at=k)
            with pytest.raises(Killed):
                _save(path, model, tok, 2)
        assert _loadable_epoch(path) in (1, 2), k
        _save(path, model, tok, 3)  # the next save works and cleans up
        assert _loadable_epoch(path) == 3
        remove_stale_temps(path)
        assert sorted(p.name for p in path.parent.iterdir()) == ["last"], k


def test_two_kills_in_a_row_keep_a_bundle(tmp_path, parts, monkeypatch):
    model, tok = parts
    n = _count_steps(tmp_path, parts, monkeypatch)
    for k, j in itertools.product(range(1, n + 1), repeat=2):
        path = tmp_path / f"two{k}-{j}" / "last"
        _save(path, model, tok, 1)
        for kill_at, epoch in ((k, 2), (j, 3)):
            with monkeypatch.context() as m:
                _steps(m, kill_at=kill_at)
                try:
                    _save(path, model, tok, epoch)
                except Killed:
                    pass
            assert _loadable_epoch(path) in (1, 2, 3), (k, j)
        resolve_bundle(path)


SAVER = """
import sys, torch
from cmn.checkpoint import save_checkpoint
from cmn.config import ModelConfig
from cmn.model import build_model
from cmn.text import Tokenizer
tok = Tokenizer.build(["the heart is normal ."], 1, "iu_xray")
model = build_model(ModelConfig(vocab_size=len(tok), visual_extractor="resnet18", d_model=16, d_ff=16,
                                num_heads=2, num_layers=1, memory_size=8, topk=2, max_seq_length=8))
info = {"dataset": "iu_xray", "clean_rule": "iu_xray", "image_size": 64, "num_views": 2, "max_seq_length": 8,
        "threshold": 1}
print("ready", flush=True)
epoch = int(sys.argv[2])
while True:
    epoch += 1
    save_checkpoint(sys.argv[1], model, tok, info, meta={"epoch": epoch})
"""


@pytest.mark.slow
def test_kill_9_trials(tmp_path, parts):
    """Real SIGKILLs at random moments, two per trial (the second hits the recovery)."""
    model, tok = parts
    import random

    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for trial in range(4):
        path = tmp_path / f"kill{trial}" / "last"
        _save(path, model, tok, 0)
        for round_ in range(2):
            with subprocess.Popen(
                [sys.executable, "-c", SAVER, str(path), str(100 * round_)], stdout=subprocess.PIPE, env=env
            ) as proc:
                assert proc.stdout.readline().strip() == b"ready"
                time.sleep(rng.uniform(0.02, 0.6))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
            assert _loadable_epoch(path) >= 0, (trial, round_)
        remove_stale_temps(path)
        _save(path, model, tok, 999)
        assert _loadable_epoch(path) == 999
        assert sorted(p.name for p in path.parent.iterdir()) == ["last"]

"""Checkpoint bundles: exact round trip, atomic writes, and clear errors for wrong bundles."""

import json
import os

import pytest
import torch

from cmn import checkpoint as ckpt
from cmn.checkpoint import load_checkpoint, save_checkpoint
from cmn.errors import CheckpointError, CMNError
from cmn.model import build_model
from cmn.text import Tokenizer
from helpers.tiny import inputs, tiny_cfg

REPORTS = ["The heart is normal in size. No pleural effusion.", "There is a small left pleural effusion."] * 3
DATA_INFO = {"dataset": "iu_xray", "clean_rule": "iu_xray", "image_size": 64, "num_views": 2, "max_seq_length": 10}


@pytest.fixture()
def bundle(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.build(REPORTS, 1, "iu_xray")
    model = build_model(tiny_cfg(vocab_size=len(tok))).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, tok, DATA_INFO, meta={"epoch": 3})
    return path, model, tok


def test_round_trip_gives_identical_logits(bundle):
    path, model, tok = bundle
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_checkpoint(path)
    images, targets = inputs(vocab=len(tok))
    with torch.no_grad():
        assert torch.equal(model(images, targets), loaded.model(images, targets))
    assert not loaded.model.training
    assert loaded.tokenizer.encode(REPORTS[0]) == tok.encode(REPORTS[0])
    assert loaded.data == DATA_INFO and loaded.meta == {"epoch": 3}
    assert loaded.config == model.cfg and loaded.num_views == DATA_INFO["num_views"] and loaded.path == path


def test_loading_needs_no_annotation_file(bundle, tmp_path):
    # everything lives in the bundle: copy it elsewhere and load it there
    path, model, tok = bundle
    moved = tmp_path / "elsewhere"
    os.rename(path, moved)
    assert len(load_checkpoint(moved).tokenizer) == len(tok)


def test_interrupted_save_keeps_previous_bundle(bundle, monkeypatch):
    path, model, tok = bundle
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        if os.path.isdir(src):
            calls.append((src, dst))
            if len(calls) == 2:  # old bundle moved aside, new one not yet in place
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with torch.no_grad():
        model.logit.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tok, DATA_INFO, meta={"epoch": 4})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not path.exists()
    assert load_checkpoint(path).meta == {"epoch": 3}  # found at its set-aside place
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    save_checkpoint(path, model, tok, DATA_INFO, meta={"epoch": 4})
    assert load_checkpoint(path).meta == {"epoch": 4}
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_crash_while_writing_weights_leaves_old_bundle(bundle, monkeypatch):
    path, model, tok = bundle
    import safetensors.torch

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CMNError, match="No space left"):
        save_checkpoint(path, model, tok, DATA_INFO, meta={"epoch": 9})
    monkeypatch.undo()
    assert load_checkpoint(path).meta == {"epoch": 3}
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_other_variant_is_a_clear_error(bundle):
    path, model, tok = bundle
    other = build_model(tiny_cfg(vocab_size=len(tok), variant="mem"))
    with pytest.raises(CheckpointError, match="another model variant"):
        ckpt.load_state_into(other, path)


def test_other_vocabulary_is_a_clear_error(bundle, tmp_path):
    path, model, tok = bundle
    Tokenizer.build(REPORTS + ["A pacemaker is present."], 1, "iu_xray").save(str(path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="tokenizer.json.*vocabulary"):
        load_checkpoint(path)


def test_missing_and_corrupt_bundles(bundle, tmp_path):
    path, _, _ = bundle
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path / "file.bin")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "cmn-checkpoint", "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_truncated_weights(bundle):
    path, _, _ = bundle
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)

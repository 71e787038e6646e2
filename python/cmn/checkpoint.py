"""Self-contained checkpoint bundles.

A bundle is a folder:
- ``model.safetensors``: the weights;
- ``config.json``: the model config, the data settings generation needs (image size, views,
  cleaning rule), the epoch and scores it was saved at;
- ``tokenizer.json``: the vocabulary (readable by the ``tokenizers`` library), so loading a
  model never needs the annotation file it was trained on (unlike the reference code);
- ``trainer_state.pt`` (resumable bundles only): optimizer, scheduler, epoch, RNG states,
  best score and early-stopping counter.

Writes are atomic at the folder level: the new bundle is written to a temporary sibling
folder, the old one is moved aside, the new one renamed into place, the old one deleted. A
run killed at any moment leaves either the new or the previous bundle, and
:func:`load_checkpoint` finds whichever exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from cmn.config import ModelConfig
from cmn.errors import CheckpointError, CMNError

FORMAT = "cmn-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE = "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"
PathLike = Union[str, os.PathLike]


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def save_checkpoint(
    path: PathLike,
    model: torch.nn.Module,
    tokenizer,
    data_info: dict[str, Any],
    meta: Optional[dict[str, Any]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a bundle to ``path`` atomically (see module docstring). Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as e:
        raise CMNError(f"cannot write checkpoint to {parent}: {e.strerror or e}") from None
    try:
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        tokenizer.save(str(tmp / TOKENIZER))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.cfg.to_dict(),
            "data": dict(data_info),
            "tokenizer_sha256": _sha256(tmp / TOKENIZER),
            "meta": dict(meta or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for f in tmp.iterdir():
            _fsync(f)
        aside = _aside(path)
        if aside.exists():
            shutil.rmtree(aside)
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
        _fsync(parent)
        if aside.exists():
            shutil.rmtree(aside)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CMNError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync folders; the rename order still holds
    finally:
        os.close(fd)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def resolve_bundle(path: PathLike) -> Path:
    """The folder holding a complete bundle at ``path`` (or its set-aside previous version)."""
    path = Path(path)
    for candidate in (path, _aside(path)):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    if path.is_file():
        raise CheckpointError(f"{path}: a checkpoint is a folder (with {CONFIG}, {WEIGHTS}, {TOKENIZER}); got a file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    raise CheckpointError(f"{path}: not a cmn checkpoint (no {CONFIG} and {WEIGHTS} in it)")


def read_config(path: PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a bundle, validated."""
    bundle = resolve_bundle(path)
    try:
        config = json.loads((bundle / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{bundle / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{bundle / CONFIG}: not a cmn checkpoint config (format field missing)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{bundle}: checkpoint format {config['format_version']} is newer than this cmn understands "
            f"({FORMAT_VERSION}); upgrade cmn"
        )
    return config


def load_tokenizer(path: PathLike):
    from cmn.text import Tokenizer

    bundle = resolve_bundle(path)
    config = read_config(bundle)
    tok_path = bundle / TOKENIZER
    if not tok_path.is_file():
        raise CheckpointError(f"{bundle}: missing {TOKENIZER}")
    if config.get("tokenizer_sha256") and _sha256(tok_path) != config["tokenizer_sha256"]:
        raise CheckpointError(
            f"{tok_path}: does not match the vocabulary this model was trained with (sha256 differs); "
            "restore the bundle's own tokenizer.json"
        )
    try:
        return Tokenizer.from_file(str(tok_path))
    except CMNError:
        raise
    except Exception as e:
        raise CheckpointError(f"{tok_path}: cannot be read ({e})") from None


def load_state_into(model: torch.nn.Module, path: PathLike) -> None:
    """Load a bundle's weights into ``model``; a mismatch names the bundle and what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    bundle = resolve_bundle(path)
    try:
        state = load_file(str(bundle / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{bundle / WEIGHTS}: cannot be read ({e})") from None
    target = getattr(model, "module", model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong_shape:
            k = sorted(wrong_shape)[0]
            details.append(f"{len(wrong_shape)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the "
                           f"checkpoint vs {tuple(own[k].shape)} here)")
        raise CheckpointError(
            f"{bundle}: weights do not fit this model ({'; '.join(details)}); it was saved from another model "
            "variant, backbone or vocabulary"
        )
    target.load_state_dict(state)


def load_checkpoint(path: PathLike, device: Optional[Union[str, torch.device]] = None):
    """Load a bundle: returns the model in eval mode, ready for ``model.generate(images)``.

    The model carries ``model.tokenizer`` (a :class:`cmn.text.Tokenizer`) and
    ``model.data_info`` (image size, views, cleaning rule) for turning images into reports;
    see :func:`cmn.inference.generate_reports`.
    """
    from cmn.model import build_model

    config = read_config(path)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: config.json has no usable model section ({e})") from None
    tokenizer = load_tokenizer(path)
    if len(tokenizer) != model_cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {len(tokenizer)} ids but the model was built for {model_cfg.vocab_size}"
        )
    model = build_model(model_cfg)
    load_state_into(model, path)
    model.tokenizer = tokenizer
    model.data_info = dict(config.get("data", {}))
    model.meta = dict(config.get("meta", {}))
    if device is not None:
        model.to(device)
    return model.eval()


def load_trainer_state(path: PathLike) -> dict[str, Any]:
    bundle = resolve_bundle(path)
    p = bundle / TRAINER_STATE
    if not p.is_file():
        raise CheckpointError(f"{bundle}: no {TRAINER_STATE}; it is not a resumable checkpoint")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{p}: cannot be read ({e})") from None

"""Self-contained checkpoint bundles.

A bundle is a folder:
- ``model.safetensors``: the weights;
- ``config.json``: the model config, the data settings generation needs (image size, views,
  cleaning rule), the epoch and scores it was saved at;
- ``tokenizer.json``: the vocabulary (readable by the ``tokenizers`` library), so loading a
  model never needs the annotation file it was trained on (unlike the reference code);
- ``trainer_state.json`` + ``trainer_state.safetensors`` (resumable bundles only): optimizer,
  scheduler, epoch, RNG states, best score and early-stopping counter. No pickle: the JSON
  holds the structure and plain values, the tensors and arrays are safetensors entries, and
  only the types listed in :func:`encode_state` can be written or read back.

Writes are atomic at the folder level (:func:`cmn.fsutil.folder_writer`): the new bundle is
written to a temporary sibling folder, the old one is moved aside to ``.<name>.previous``,
the new one renamed into place, the old one deleted. Invariant: from the first complete save
on, ``<name>`` or ``.<name>.previous`` always holds a complete bundle, whatever step a kill
lands on and however many saves are killed in a row (the set-aside copy is deleted only while
``<name>`` is complete), and :func:`resolve_bundle` finds it. Temporary folders left by kills
are removed by :func:`cmn.fsutil.remove_stale_temps` (training does it at start).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import torch

from cmn.config import CLEAN_RULES, ModelConfig, describe_bounds, in_bounds
from cmn.errors import CheckpointError, CMNError, ConfigError
from cmn.fsutil import folder_writer

if TYPE_CHECKING:
    from cmn.model.cmn import CMN
    from cmn.text import Tokenizer

FORMAT = "cmn-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TRAINER_STATE = "trainer_state"  # trainer_state.json + trainer_state.safetensors
OPTIMIZER_STATE = "optimizer"  # optimizer.json + optimizer.safetensors (converted checkpoints, --keep-optimizer)
STATE_JSON, STATE_TENSORS = f"{TRAINER_STATE}.json", f"{TRAINER_STATE}.safetensors"
LEGACY_STATE = "trainer_state.pt"  # pickled trainer state of cmn 0.1: never unpickled by default
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
    extra_states: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a bundle to ``path`` atomically (see module docstring). Returns ``path``.

    ``extra_states`` maps a name to a state tree stored as ``<name>.json`` +
    ``<name>.safetensors`` (e.g. ``optimizer`` of a converted checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    model = cast("CMN", getattr(model, "module", model))  # unwrap DistributedDataParallel
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    trees = dict(extra_states or {})
    if trainer_state is not None:
        trees[TRAINER_STATE] = trainer_state
    try:
        with folder_writer(path, replace=True) as tmp:
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
            for name, tree in trees.items():
                encoded, tensors = encode_state(tree)
                save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": f"{FORMAT}-{name}"})
                (tmp / f"{name}.json").write_text(json.dumps(encoded, indent=1) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:  # disk full, no permission: the previous bundle stays
        raise CMNError(f"cannot write checkpoint {path}: {getattr(e, 'strerror', None) or e}") from None
    return path


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
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{bundle / CONFIG}: format_version must be a non-negative integer, got {version!r}")
    if version > FORMAT_VERSION:
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
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"{bundle / WEIGHTS}: {bad} holds NaN or infinite values")
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
            details.append(
                f"{len(wrong_shape)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the "
                f"checkpoint vs {tuple(own[k].shape)} here)"
            )
        raise CheckpointError(
            f"{bundle}: weights do not fit this model ({'; '.join(details)}); it was saved from another model "
            "variant, backbone or vocabulary"
        )
    target.load_state_dict(state)


def model_config_of(config: dict[str, Any], path: PathLike) -> ModelConfig:
    """The validated model section of a bundle's config (bounds included: a tampered file is an
    error before anything is allocated)."""
    try:
        section = config["model"]
        if not isinstance(section, dict):
            raise TypeError("not an object")
        return ModelConfig.from_dict(section)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: config.json has no usable model section ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: config.json: {e}") from None


def data_info_of(config: dict[str, Any], model_cfg: ModelConfig, path: PathLike) -> dict[str, Any]:
    """The validated data section: what generation needs to turn images into model inputs."""
    data = config.get("data")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: config.json has no data section")
    for key in ("image_size", "num_views", "max_seq_length"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not in_bounds(key, value):
            raise CheckpointError(
                f"{path}: config.json: data.{key} must be an integer {describe_bounds(key)}, got {value!r}"
            )
    if data["num_views"] != model_cfg.num_views:
        raise CheckpointError(
            f"{path}: config.json: data.num_views {data['num_views']} differs from the model's {model_cfg.num_views}"
        )
    if data.get("clean_rule", "iu_xray") not in CLEAN_RULES:
        raise CheckpointError(f"{path}: config.json: data.clean_rule must be one of {', '.join(CLEAN_RULES)}")
    return dict(data)


@dataclass
class Bundle:
    """A loaded checkpoint: the model (eval mode), its vocabulary, and what it was trained on.

    ``data`` holds what turning images into model inputs needs (``image_size``, ``num_views``,
    ``max_seq_length``, ``clean_rule``, ``dataset``); ``meta`` what the writer recorded
    (epoch, validation scores, conversion source); ``path`` the bundle folder it came from.
    """

    model: CMN
    tokenizer: Tokenizer
    data: dict[str, Any]
    meta: dict[str, Any]
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def num_views(self) -> int:
        return int(self.data["num_views"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def max_seq_length(self) -> int:
        return int(self.data.get("max_seq_length", self.model.cfg.max_seq_length))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: Union[str, torch.device]) -> Bundle:
        self.model.to(device)
        return self


def load_checkpoint(path: PathLike, device: Optional[Union[str, torch.device]] = None) -> Bundle:
    """Load a bundle (see the module docstring) into a :class:`Bundle`, model in eval mode.

    ``bundle.model.generate(images)`` gives token ids; :func:`cmn.inference.generate_reports`
    turns image files into report text.
    """
    from cmn.model import build_model

    config = read_config(path)
    model_cfg = model_config_of(config, path)
    data_info = data_info_of(config, model_cfg, path)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) != model_cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {len(tokenizer)} ids but the model was built for {model_cfg.vocab_size}"
        )
    model = build_model(model_cfg)
    load_state_into(model, path)
    if device is not None:
        model.to(device)
    meta = config.get("meta", {})
    return Bundle(
        model.eval(), tokenizer, data_info, dict(meta) if isinstance(meta, dict) else {}, resolve_bundle(path)
    )


# ---- trainer state without pickle ------------------------------------------------------------
# A state tree is encoded as JSON with tagged nodes; tensors and numpy arrays go to a safetensors
# file under generated names. Allowed leaves: None, bool, int, float, str, torch.Tensor,
# numpy.ndarray (non-object dtypes) and numpy scalars; containers: dict (any str/int keys), list,
# tuple. Anything else is refused on write, and an unknown tag is refused on read.
_TAG = "__cmn__"


def encode_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` -> (JSON-able structure, tensors by name). Raises TypeError for other types."""
    import numpy as np

    tensors: dict[str, torch.Tensor] = {}

    def put(t: torch.Tensor) -> str:
        name = f"t{len(tensors)}"
        tensors[name] = t.detach().cpu().contiguous()
        return name

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, np.generic):
            return x if isinstance(x, int) or math.isfinite(x) else {_TAG: "float", "v": repr(x)}
        if isinstance(x, torch.Tensor):
            return {_TAG: "tensor", "k": put(x)}
        if isinstance(x, np.ndarray) and x.dtype != object:
            raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # bytes: any dtype safetensors lacks
            return {
                _TAG: "ndarray",
                "k": put(torch.from_numpy(raw.copy())),
                "dtype": x.dtype.str,
                "shape": list(x.shape),
            }
        if isinstance(x, np.generic):
            return {_TAG: "npscalar", "dtype": x.dtype.str, "v": enc(x.item())}
        if isinstance(x, tuple):
            return {_TAG: "tuple", "v": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and _TAG not in x:
                return {k: enc(v) for k, v in x.items()}
            if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in x):
                return {_TAG: "dict", "v": [[k, enc(v)] for k, v in x.items()]}
        raise TypeError(f"trainer state cannot hold {type(x).__name__} values")

    return enc(tree), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], origin: str = "trainer state") -> Any:
    """Inverse of :func:`encode_state`; an unknown tag or missing tensor is a CheckpointError."""
    import numpy as np

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"{origin}: refers to a tensor {key!r} that is not stored")
        return tensors[key]

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        tag = x.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in x.items()}
        if tag == "tensor":
            return tensor(x.get("k"))
        if tag == "ndarray":
            return tensor(x.get("k")).numpy().view(np.dtype(x["dtype"])).reshape(x["shape"])
        if tag == "npscalar":
            return np.dtype(x["dtype"]).type(dec(x["v"]))
        if tag == "float":
            return float(x["v"])
        if tag == "tuple":
            return tuple(dec(v) for v in x["v"])
        if tag == "dict":
            return {k: dec(v) for k, v in x["v"]}
        raise CheckpointError(f"{origin}: unknown entry type {tag!r} (written by a newer cmn?)")

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{origin}: malformed ({e})") from None


def load_state_tree(path: PathLike, name: str) -> Optional[dict[str, Any]]:
    """The state tree ``<name>.json`` + ``<name>.safetensors`` of a bundle, or None if absent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    bundle = resolve_bundle(path)
    js, ts = bundle / f"{name}.json", bundle / f"{name}.safetensors"
    if not (js.is_file() and ts.is_file()):
        return None
    try:
        tree = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(ts))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js}: not valid JSON ({e})") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ts}: cannot be read ({e})") from None
    state = decode_state(tree, tensors, str(js))
    if not isinstance(state, dict):
        raise CheckpointError(f"{js}: not a state (top level is not an object)")
    return state


def load_trainer_state(path: PathLike, *, trust_legacy_pickle: bool = False) -> dict[str, Any]:
    """The trainer state of a resumable bundle (``last/``), read without unpickling anything.

    A bundle from cmn 0.1 holds a pickled ``trainer_state.pt`` instead; it is refused unless
    ``trust_legacy_pickle`` (``cmn-train --resume --trust-pickled-state``), and even then it is
    read with ``torch.load(weights_only=True)`` limited to the numpy types such a state holds,
    so no code in it can run. The next save writes the new format.
    """
    bundle = resolve_bundle(path)
    state = load_state_tree(bundle, TRAINER_STATE)
    if state is not None:
        return state
    legacy = bundle / LEGACY_STATE
    if legacy.is_file():
        if not trust_legacy_pickle:
            raise CheckpointError(
                f"{legacy}: a pickled trainer state from cmn 0.1; pickle files can run code, so cmn does not read "
                "them. If you made this run yourself, resume once with --trust-pickled-state (read with "
                "torch.load(weights_only=True), no code runs) and it is rewritten in the safe format"
            )
        return _load_legacy_state(legacy)
    raise CheckpointError(f"{bundle}: no {STATE_JSON}/{STATE_TENSORS}; it is not a resumable checkpoint")


def _load_legacy_state(p: Path) -> dict[str, Any]:
    state = load_plain_pickle(p)
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: refused: not a trainer state")
    return state


def load_plain_pickle(p: Path) -> Any:
    """``torch.load(weights_only=True)`` allowing, beyond tensors and plain containers, only the
    numpy arrays and scalars that training states hold (RNG state, ``monitor_best``).

    No code in the file can run. A file that needs any other type is refused with a
    :class:`CheckpointError` naming it; a truncated or corrupt file likewise.
    """
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: list[Any] = [np.ndarray, np.dtype]
    for core in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 / numpy 1 pickles
        allowed += [(reconstruct, f"{core}._reconstruct"), (scalar, f"{core}.scalar")]
    allowed += [type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        unsupported = re.search(r"GLOBAL ([\w.]+)", text)
        if unsupported:
            reason = f"it needs {unsupported.group(1)}, which is not a plain tensor, number or array type"
        else:
            reason = "truncated, corrupt or not a torch.save file"
        raise CheckpointError(f"{p}: refused: {reason} (cmn never runs code from a checkpoint)") from None

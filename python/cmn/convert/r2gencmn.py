"""Import the released R2GenCMN checkpoints (``model_iu_xray.pth``, ``model_mimic_cxr.pth``).

The reference trainer saves ``{'epoch', 'state_dict', 'optimizer', 'monitor_best'}`` with
``torch.save``; a bare state dict is accepted too. Conversion:

1. reads the file with :func:`cmn.checkpoint.load_plain_pickle` (``weights_only=True``,
   numpy scalars allowed for ``monitor_best``): nothing in it can run code;
2. infers the architecture from tensor shapes (backbone, d_model, d_ff, layers, memory
   size, vocabulary size); what shapes cannot say (heads, top-K, max length, views) comes
   from the dataset preset or flags, and contradictions are errors;
3. rebuilds the vocabulary the reference never stored, from the annotation's train split
   exactly as the reference does, and checks it against the embedding and logit sizes;
4. renames every tensor to cmn's layout (the reference's ``linears[0..3]`` are q/k/v/out,
   ``sublayer[i].norm`` is ``norm{i+1}``, ``a_2``/``b_2`` are weight/bias), checks that the
   memory module registered twice by the reference (``encoder_decoder.cmn`` and
   ``encoder_decoder.model.cmn``) holds one set of weights, and that the stored positional
   encodings are the sinusoids cmn computes;
5. optionally carries the Adam state over, re-indexed to cmn's parameter order.

The result is a :class:`Converted` ready for :func:`cmn.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from cmn.config import VISUAL_EXTRACTORS, ModelConfig
from cmn.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from cmn.model.cmn import CMN

ED = "encoder_decoder."
VE = "visual_extractor.model."
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
# torchvision ResNets: block type and blocks per stage -> name (cmn supports those listed in
# VISUAL_EXTRACTORS; the others are named in the error).
_RESNETS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


@dataclass
class ReferenceCheckpoint:
    """What a reference ``.pth`` holds, its state dict with any ``module.`` prefix removed."""

    state: dict[str, torch.Tensor]
    epoch: Optional[int] = None
    monitor_best: Optional[float] = None
    optimizer: Optional[Mapping[str, Any]] = None
    order: list[str] = field(default_factory=list)  # state-dict keys in saved order


@dataclass
class Converted:
    config: ModelConfig
    state: dict[str, torch.Tensor]  # cmn names
    tokenizer: Any
    data_info: dict[str, Any]
    meta: dict[str, Any]
    optimizer: Optional[dict[str, Any]] = None  # Adam state in cmn's parameter order


def read_reference_checkpoint(path: Path) -> ReferenceCheckpoint:
    """Load a reference checkpoint without unpickling code; bad files are CheckpointErrors."""
    from cmn.checkpoint import load_plain_pickle

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    obj = load_plain_pickle(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a dict)")
    if "state_dict" in obj:
        missing = [k for k in ("epoch", "state_dict", "optimizer", "monitor_best") if k not in obj]
        if missing and not isinstance(obj.get("state_dict"), Mapping):
            raise CheckpointError(f"{path}: not a reference checkpoint (missing {', '.join(missing)})")
        raw = obj["state_dict"]
        epoch, best, opt = obj.get("epoch"), obj.get("monitor_best"), obj.get("optimizer")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw, epoch, best, opt = obj, None, None, None  # a bare state dict
    else:
        keys = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
        raise CheckpointError(
            f"{path}: not a reference checkpoint: expected 'epoch', 'state_dict', 'optimizer', 'monitor_best' "
            f"(or a bare state dict), found {keys}"
        )
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of tensors")
    state: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        state[k[len("module.") :] if k.startswith("module.") else k] = v
    return ReferenceCheckpoint(
        state=state,
        epoch=int(epoch) if epoch is not None else None,
        monitor_best=float(best) if best is not None else None,
        optimizer=opt if isinstance(opt, Mapping) else None,
        order=list(state),
    )


# ---- architecture ---------------------------------------------------------------------------
def _identify(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Refuse checkpoints of other models with a message saying what they look like."""
    keys = list(state)
    if any(".rm." in k or "mlp_gamma" in k for k in keys):
        raise CheckpointError(
            f"{origin}: this is an R2Gen checkpoint (relational memory, zhjohnchan/R2Gen), not R2GenCMN; "
            "cmn converts R2GenCMN checkpoints only"
        )
    needed = [
        ED + "memory_matrix",
        ED + "cmn.linears.0.weight",
        ED + "logit.weight",
        ED + "model.tgt_embed.0.lut.weight",
        ED + "att_embed.0.weight",
    ]
    missing = [k for k in needed if k not in state]
    if missing:
        example = ", ".join(keys[:3]) or "no tensors"
        raise CheckpointError(
            f"{origin}: not an R2GenCMN checkpoint: missing {', '.join(missing)} (it holds e.g. {example})"
        )
    if any(k.startswith(ED + "att_embed.") and k.endswith(_BUFFER_SUFFIXES) for k in keys):
        raise CheckpointError(f"{origin}: trained with --use_bn (BatchNorm in att_embed), which cmn does not support")


def infer_backbone(state: Mapping[str, torch.Tensor], origin: str) -> str:
    """The torchvision ResNet whose trunk the ``visual_extractor.model.*`` tensors fit."""
    if f"{VE}0.weight" not in state:
        raise CheckpointError(f"{origin}: no visual extractor weights ({VE}* tensors missing)")
    blocks = []
    for stage in range(4, 8):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(VE)}{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    kind = "bottleneck" if f"{VE}4.0.conv3.weight" in state else "basic"
    name = _RESNETS.get((kind, tuple(blocks)))
    if name is None:
        raise CheckpointError(f"{origin}: visual extractor is not a torchvision ResNet ({kind} blocks {blocks})")
    if name not in VISUAL_EXTRACTORS:
        raise CheckpointError(
            f"{origin}: visual extractor {name} is not supported by cmn (supported: {', '.join(VISUAL_EXTRACTORS)})"
        )
    return name


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_config(
    state: Mapping[str, torch.Tensor],
    origin: str,
    *,
    num_heads: int,
    topk: int,
    max_seq_length: int,
    num_views: int,
) -> ModelConfig:
    """The cmn model config these weights fit; shapes that contradict each other are errors."""
    _identify(state, origin)
    backbone = infer_backbone(state, origin)
    memory = state[ED + "memory_matrix"]
    n_mem, d_model = memory.shape
    vocab, d_lut = state[ED + "model.tgt_embed.0.lut.weight"].shape
    logit = state[ED + "logit.weight"]
    att = state[ED + "att_embed.0.weight"]
    n_enc, n_dec = _count(state, ED + "model.encoder.layers."), _count(state, ED + "model.decoder.layers.")
    checks = [
        (d_lut == d_model, f"token embedding width {d_lut} vs memory width {d_model}"),
        (tuple(logit.shape) == (vocab, d_model), f"logit {tuple(logit.shape)} vs embedding ({vocab}, {d_model})"),
        (att.shape[0] == d_model, f"att_embed output {att.shape[0]} vs d_model {d_model}"),
        (
            att.shape[1] == VISUAL_EXTRACTORS[backbone],
            f"att_embed input {att.shape[1]} vs {backbone}'s {VISUAL_EXTRACTORS[backbone]} channels",
        ),
        (n_enc == n_dec and n_enc > 0, f"{n_enc} encoder vs {n_dec} decoder layers"),
    ]
    for ok, what in checks:
        if not ok:
            raise CheckpointError(f"{origin}: inconsistent shapes: {what}")
    d_ff = state[ED + "model.encoder.layers.0.feed_forward.w_1.weight"].shape[0]
    if d_model % num_heads:
        raise CheckpointError(f"{origin}: --num-heads {num_heads} does not divide d_model {d_model}")
    if not 1 <= topk <= n_mem:
        raise CheckpointError(f"{origin}: --topk {topk} must be between 1 and the memory size {n_mem}")
    return ModelConfig(
        vocab_size=int(vocab),
        variant="cmn",
        visual_extractor=backbone,
        num_views=num_views,
        d_model=int(d_model),
        d_ff=int(d_ff),
        num_heads=num_heads,
        num_layers=n_enc,
        dropout=0.1,
        drop_prob_lm=0.5,
        memory_size=int(n_mem),
        topk=topk,
        max_seq_length=max_seq_length,
    )


# ---- names ----------------------------------------------------------------------------------
def _attn(src: str, dst: str) -> dict[str, str]:
    return {
        f"{src}.linears.{i}.{p}": f"{dst}.{name}.{p}" for i, name in enumerate(_LINEARS) for p in ("weight", "bias")
    }


def _norm(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.a_2": f"{dst}.weight", f"{src}.b_2": f"{dst}.bias"}


def _ff(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.{w}.{p}": f"{dst}.{w}.{p}" for w in ("w_1", "w_2") for p in ("weight", "bias")}


def name_map(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, str]:
    """Reference name -> cmn name for every tensor cmn keeps."""
    m = ED + "model."
    names: dict[str, str] = {
        ED + "att_embed.0.weight": "att_embed.0.weight",
        ED + "att_embed.0.bias": "att_embed.0.bias",
        m + "tgt_embed.0.lut.weight": "tgt_embed.weight",
        ED + "logit.weight": "logit.weight",
        ED + "logit.bias": "logit.bias",
        ED + "memory_matrix": "memory.weight",
        **_norm(m + "encoder.norm", "encoder.norm"),
        **_norm(m + "decoder.norm", "decoder.norm"),
        **_attn(ED + "cmn", "memory_query"),
    }
    for i in range(num_layers):
        e, d = f"{m}encoder.layers.{i}", f"{m}decoder.layers.{i}"
        names.update(_attn(f"{e}.self_attn", f"encoder.layers.{i}.self_attn"))
        names.update(_ff(f"{e}.feed_forward", f"encoder.layers.{i}.ff"))
        names.update(_attn(f"{d}.self_attn", f"decoder.layers.{i}.self_attn"))
        names.update(_attn(f"{d}.src_attn", f"decoder.layers.{i}.src_attn"))
        names.update(_ff(f"{d}.feed_forward", f"decoder.layers.{i}.ff"))
        for j in range(2):
            names.update(_norm(f"{e}.sublayer.{j}.norm", f"encoder.layers.{i}.norm{j + 1}"))
        for j in range(3):
            names.update(_norm(f"{d}.sublayer.{j}.norm", f"decoder.layers.{i}.norm{j + 1}"))
    for k in state:
        if k.startswith(VE):
            names[k] = "visual.trunk." + k[len(VE) :]
    return names


def _known_extra(key: str) -> bool:
    """Reference tensors cmn does not keep (checked separately)."""
    return key.startswith(ED + "model.cmn.") or key.endswith(("src_embed.0.pe", "tgt_embed.1.pe"))


def map_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, origin: str) -> dict[str, torch.Tensor]:
    """Rename to cmn; checks the shared memory module and positional encodings."""
    from cmn.model.transformer import PositionalEncoding

    names = name_map(state, cfg.num_layers)
    unknown = [k for k in state if k not in names and not _known_extra(k)]
    if unknown:
        raise CheckpointError(
            f"{origin}: {len(unknown)} tensor(s) that an R2GenCMN model of this shape does not have "
            f"(e.g. {unknown[0]}); is it another model?"
        )
    missing = [k for k in names if k not in state]
    if missing:
        raise CheckpointError(f"{origin}: missing {len(missing)} tensor(s) (e.g. {missing[0]})")
    for k, v in state.items():
        if k.startswith(ED + "model.cmn."):
            twin = ED + "cmn." + k[len(ED + "model.cmn.") :]
            if twin not in state or not torch.equal(state[twin], v):
                raise CheckpointError(f"{origin}: {k} differs from {twin}; the reference shares one memory module")
        elif k.endswith(".pe"):
            pe = PositionalEncoding(v.shape[-1], 0.0, max_len=v.shape[-2]).pe
            if v.reshape(pe.shape).shape != pe.shape or not torch.allclose(v.reshape(pe.shape).float(), pe, atol=1e-5):
                raise CheckpointError(f"{origin}: {k} is not the sinusoidal positional encoding cmn computes")
    out = {}
    for k, v in state.items():
        if k in names:
            if not v.is_floating_point() and not k.endswith("num_batches_tracked"):
                raise CheckpointError(f"{origin}: {k} is not a float tensor ({v.dtype})")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{origin}: {k} holds NaN or infinite values")
            out[names[k]] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
    return out


# ---- vocabulary -------------------------------------------------------------------------------
def build_vocabulary(reports: Sequence[str], threshold: int, rule: str, vocab_size: int, origin: str, ann: str):
    """The reference's vocabulary of the train ``reports``; must have ``vocab_size`` ids."""
    from cmn.text import Tokenizer, clean_reports

    tok = Tokenizer.build(list(reports), threshold, rule)
    if len(tok) == vocab_size:
        return tok
    counts = Counter(t for r in clean_reports(list(reports), rule) for t in r.split())
    fits = [t for t in range(1, 101) if sum(1 for n in counts.values() if n >= t) + 2 == vocab_size]
    shown = ", ".join(map(str, fits[:8])) + (", ..." if len(fits) > 8 else "")
    hint = (
        f"--threshold {shown} would fit"
        if fits
        else "no threshold from 1 to 100 fits: it was trained with another annotation file"
    )
    raise DataError(
        f"{ann}: its train split with threshold {threshold} gives a vocabulary of {len(tok)} ids, but {origin} "
        f"was trained with {vocab_size}; {hint}"
    )


# ---- optimizer ------------------------------------------------------------------------------
def _is_buffer(key: str) -> bool:
    return key.endswith(_BUFFER_SUFFIXES) or key.endswith(".pe")


def remap_optimizer(ref: ReferenceCheckpoint, names: Mapping[str, str], model: CMN, origin: str) -> dict[str, Any]:
    """The reference's Adam state re-indexed to cmn's parameter order.

    The reference's groups are (visual extractor parameters, every other parameter), each in
    registration order, which is the saved state-dict order with buffers and the second
    registration of the shared memory module left out; cmn's groups are the same two sets in
    its own order (see :func:`cmn.train`'s optimizer).
    """
    opt = ref.optimizer
    if not opt or "state" not in opt or "param_groups" not in opt:
        raise CheckpointError(f"{origin}: holds no optimizer state to keep")
    params = [k for k in ref.order if not _is_buffer(k) and not k.startswith(ED + "model.cmn.")]
    ref_ve = [k for k in params if k.startswith(VE)]
    ref_order = ref_ve + [k for k in params if not k.startswith(VE)]
    groups = opt["param_groups"]
    total = sum(len(g.get("params", [])) for g in groups)
    if len(groups) != 2 or total != len(ref_order):
        raise CheckpointError(
            f"{origin}: optimizer has {len(groups)} group(s) over {total} parameters; expected the reference's 2 "
            f"groups over {len(ref_order)}"
        )
    ref_index: dict[int, str] = {}
    for g in groups:
        for i in g["params"]:
            ref_index[int(i)] = ref_order[len(ref_index)]
    own = dict(model.named_parameters())
    ve_ids = {id(p) for p in model.visual.parameters()}
    cmn_order = [n for n, p in own.items() if id(p) in ve_ids] + [n for n, p in own.items() if id(p) not in ve_ids]
    cmn_index = {n: i for i, n in enumerate(cmn_order)}
    state = {}
    for i, s in opt["state"].items():
        name = names[ref_index[int(i)]]
        shape = tuple(own[name].shape)
        for key, value in s.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{origin}: optimizer state {key} of {ref_index[int(i)]} has shape "
                    f"{tuple(value.shape)}, the parameter {shape}"
                )
        state[cmn_index[name]] = dict(s)
    n_ve = len(ref_ve)
    new_groups = [dict(groups[0], params=list(range(n_ve))), dict(groups[1], params=list(range(n_ve, len(cmn_order))))]
    return {"state": state, "param_groups": new_groups}


# ---- all together ---------------------------------------------------------------------------
def convert(
    ref: ReferenceCheckpoint,
    train_reports: Sequence[str],
    *,
    origin: str,
    ann: str,
    dataset: str,
    clean_rule: str,
    threshold: int,
    num_heads: int,
    topk: int,
    max_seq_length: int,
    num_views: int,
    image_size: int,
    keep_optimizer: bool = False,
) -> Converted:
    """A reference checkpoint + the train reports of its annotation -> a cmn model bundle's parts."""
    from cmn.model import build_model

    cfg = infer_config(
        ref.state, origin, num_heads=num_heads, topk=topk, max_seq_length=max_seq_length, num_views=num_views
    )
    tokenizer = build_vocabulary(train_reports, threshold, clean_rule, cfg.vocab_size, origin, ann)
    state = map_state(ref.state, cfg, origin)
    model = build_model(cfg)
    own = model.state_dict()
    wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        got = tuple(state[k].shape) if k in state else "missing"
        raise CheckpointError(
            f"{origin}: {len(wrong)} tensor(s) do not fit the inferred model (e.g. {k}: {got} vs {tuple(own[k].shape)})"
        )
    optimizer = None
    if keep_optimizer:
        optimizer = remap_optimizer(ref, name_map(ref.state, cfg.num_layers), model, origin)
    data_info = {
        "dataset": dataset,
        "clean_rule": clean_rule,
        "image_size": image_size,
        "num_views": num_views,
        "max_seq_length": max_seq_length,
        "threshold": threshold,
    }
    best = ref.monitor_best
    meta = {
        "converted_from": {
            "format": "r2gencmn",
            "file": origin,
            "epoch": ref.epoch,
            "monitor_best": best if best is None or math.isfinite(best) else None,
        },
        "epoch": ref.epoch,
    }
    return Converted(cfg, state, tokenizer, data_info, meta, optimizer)

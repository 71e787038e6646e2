"""One epoch of training and one pass of evaluation, with explicit arguments (DETR-style)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.distributed as dist

from cmn.data.dataset import check_batch
from cmn.errors import CMNError

if TYPE_CHECKING:
    from cmn.model.cmn import CMN


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for (fp32 stays the default for score reproducibility)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_train_mode(model: torch.nn.Module, freeze_bn: bool = False) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def masked_nll(
    logprobs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, token_total: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The reference's language-model loss.

    logprobs (B, T-1, V) for targets[:, 1:]; targets (B, T) int64; masks (B, T).
    Mean negative log-likelihood over unmasked target tokens; ``token_total`` replaces the
    local token count (distributed training divides by the global count, so the summed
    gradient equals a single process's on the same global batch).
    """
    tgt = targets[:, 1:]  # (B, T-1)
    m = masks[:, 1:].to(logprobs.dtype)  # (B, T-1)
    nll = -logprobs.gather(2, tgt.unsqueeze(2)).squeeze(2) * m  # (B, T-1)
    denom = m.sum() if token_total is None else token_total
    return nll.sum() / denom


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    precision: str = "fp32",
    world_size: int = 1,
    progress: Optional[Any] = None,
    max_batches: Optional[int] = None,
    freeze_bn: bool = False,
) -> dict[str, float]:
    """Teacher-forced training over ``loader``; returns mean loss, tokens and throughput.

    With ``world_size > 1`` the model is DDP-wrapped: each rank's loss is divided by the
    global token count times 1/world_size, undoing DDP's gradient averaging so gradients
    match a single process on the same global batch. ``freeze_bn`` keeps BatchNorm layers on
    their running statistics (per-rank batch statistics otherwise differ from one process's).
    """
    set_train_mode(model, freeze_bn)
    total_loss, total_tokens, n_batches = 0.0, 0.0, 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = check_batch(batch)["images"].to(device, non_blocking=True)  # (B, V, 3, S, S)
        targets = batch["targets"].to(device, non_blocking=True)  # (B, T)
        masks = batch["masks"].to(device, non_blocking=True)  # (B, T)
        tokens = masks[:, 1:].sum()
        token_total = None
        if world_size > 1:
            token_total = tokens.detach().clone()
            dist.all_reduce(token_total)
            token_total = token_total / world_size
        with autocast(device, precision):
            logprobs = model(images, targets)  # (B, T-1, V)
        loss = masked_nll(logprobs, targets, masks, token_total)
        if not torch.isfinite(loss):
            raise CMNError(f"training loss became {loss.item()} at batch {i}; lower the learning rate or use fp32")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n_tok = float(tokens)
        total_loss += float(loss.detach()) * (float(token_total) if token_total is not None else n_tok)  # NLL sum
        total_tokens += n_tok
        n_batches += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total_loss / max(total_tokens, 1):.3f}")
    seconds = time.perf_counter() - start
    if world_size > 1:  # report the global per-token mean, as one process would
        sums = torch.tensor([total_loss, total_tokens, float(n_batches)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total_loss, total_tokens = float(sums[0]), float(sums[1])
    return {
        "train_loss": total_loss / max(total_tokens, 1.0),
        "train_tokens": total_tokens,
        "train_batches": n_batches,
        "train_seconds": seconds,
        "train_tokens_per_s": total_tokens / max(seconds, 1e-9),
    }


@torch.no_grad()
def generate_split(
    model: torch.nn.Module,
    loader: Iterable[dict],
    tokenizer,
    device: torch.device,
    *,
    beam_size: int = 3,
    block_ngram: int = 0,
    precision: str = "fp32",
    max_batches: Optional[int] = None,
    progress: Optional[Any] = None,
    decode: str = "cmn",
) -> tuple[dict[str, str], dict[str, str]]:
    """Beam-search every study of ``loader``; returns (references, predictions) by study id.

    Both sides are decoded from token ids, as the reference code scores them: references
    are the cleaned, vocabulary-mapped, truncated targets.
    """
    model = cast("CMN", getattr(model, "module", model))  # unwrap DistributedDataParallel
    model.eval()
    references: dict[str, str] = {}
    predictions: dict[str, str] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = check_batch(batch)["images"].to(device)
        with autocast(device, precision):
            seqs = model.generate(images, beam_size=beam_size, block_ngram=block_ngram, decode=decode)
        for sid, seq, tgt in zip(batch["ids"], seqs, batch["targets"]):
            predictions[sid] = tokenizer.decode(list(seq))
            references[sid] = tokenizer.decode(tgt[1:].tolist())  # skip BOS; decoding stops at EOS/pad
        if progress is not None:
            progress.update(1)
    return references, predictions


def score(
    references: dict[str, str], predictions: dict[str, str], *, clinical: bool = False, scorer=None
) -> dict[str, float]:
    """NLG scores (and CE when ``clinical``) through :mod:`cmn.metrics`; pass a
    :class:`cmn.metrics.NLGScorer` to keep one METEOR process across calls."""
    from cmn.metrics import evaluate_reports

    out = evaluate_reports(references, predictions, clinical=clinical, scorer=scorer)
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}

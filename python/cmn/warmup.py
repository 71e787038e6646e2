"""Visual warm-up: the CNN first learns the CheXpert labels of the training reports.

The reference starts its CNN from ImageNet weights. Where none are at hand (the built-in demo
trains from random init, as no weights can be downloaded), report training alone barely teaches
the CNN: the language model predicts most tokens from the text before it, so little of the loss
depends on the image, and the random-init features it starts from wash out before the
encoder-decoder has learned to read them (README, "Demo results"). The warm-up gives the CNN a
direct signal first: the 14 CheXpert observations read from each training report by
:func:`cmn.metrics.clinical.label_reports` (what a real dataset's reports say, not any hidden
truth), learned as a multi-label classification from the patch features. The classification
head is thrown away afterwards; report training then starts from the warmed-up CNN.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmn.data.dataset import check_batch
from cmn.engine import autocast
from cmn.errors import CMNError
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS

#: Warm-up targets: each observation, then stated on the left, then on the right.
N_TARGETS = 3 * len(CHEXPERT_OBSERVATIONS)

# Warm-up epochs draw their data order and augmentations as epochs WARMUP_EPOCH_KEY + k, apart
# from the report-training epochs 1, 2, ...
WARMUP_EPOCH_KEY = 1_000_000


_SIDES = ("left", "right")  # target column blocks 1 and 2
_BOTH_SIDES = {"bilateral", "both"}


def _stated_sides(sentence: str) -> set[str]:
    """Sides ("left", "right") a lowercased sentence names; "bilateral" names both."""
    words = set(re.findall(r"[a-z]+", sentence))
    return set(_SIDES) if words & _BOTH_SIDES else words & set(_SIDES)


def report_targets(reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CheXpert targets of ``reports``: (targets, weights), each float32 (n, 3 * 14).

    Columns 0-13: the 14 observations; a positive mention is 1, a negative mention or none 0;
    an uncertain mention has weight 0 (neither taught as present nor as absent).
    Columns 14-27 and 28-41: the same observation stated positive on the patient's left, and on
    the right ("bilateral" is both), read from the sentence of each positive mention. A
    positive observation whose side no sentence states has weight 0 there. The paper's
    encoder sees the patches without their positions, so where a finding is has to be in the
    CNN's features themselves; these columns ask for it.
    """
    from cmn.metrics.clinical import UNCERTAIN, find_mentions, label_reports

    n_obs = len(CHEXPERT_OBSERVATIONS)
    index = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}
    labels = label_reports(list(reports))  # (n, 14): nan (no mention), 1, 0, -1 (uncertain)
    present, uncertain = labels == 1.0, labels == UNCERTAIN
    targets = np.zeros((len(reports), 3 * n_obs), np.float32)
    weights = np.tile(~uncertain, 3).astype(np.float32)  # absent: on neither side
    targets[:, :n_obs] = present
    for i in np.flatnonzero(present.any(1)).tolist():
        sides: dict[int, set[str]] = {}
        for m in find_mentions(reports[i]):
            if m.label == 1.0:
                sides.setdefault(index[m.observation], set()).update(_stated_sides(m.sentence))
        for obs in np.flatnonzero(present[i]):
            stated = sides.get(int(obs), set())
            for block, side in enumerate(_SIDES, 1):
                targets[i, block * n_obs + obs] = side in stated
                weights[i, block * n_obs + obs] = bool(stated)  # no side stated: not taught
    return torch.from_numpy(targets), torch.from_numpy(weights)


class LabelProbe(nn.Module):
    """The CNN plus a linear head on each view's mean- and max-pooled patches.

    images (B, V, 3, S, S) -> logits (B, n_labels). Max pooling keeps a small lesion that
    covers one patch from being averaged away.
    """

    def __init__(self, visual: nn.Module, num_views: int, channels: int, n_labels: int):
        super().__init__()
        self.visual = visual
        self.num_views = num_views
        self.head = nn.Linear(num_views * 2 * channels, n_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.visual(images)  # (B, V*P, C)
        B, VP, C = patches.shape
        per_view = patches.view(B, self.num_views, VP // self.num_views, C)  # (B, V, P, C)
        pooled = torch.cat([per_view.mean(2), per_view.amax(2)], -1)  # (B, V, 2C)
        return self.head(pooled.flatten(1))  # (B, n_labels)


def warm_up_visual(
    probe: nn.Module,
    loader: Iterable[dict],
    sampler: Any,
    targets_by_id: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    precision: str = "fp32",
    log=print,
    progress=None,
) -> list[dict[str, float]]:
    """Train ``probe`` (a :class:`LabelProbe`, DDP-wrapped under torchrun) for ``epochs`` on
    the weighted multi-label BCE; Adam with a cosine decay from ``lr`` to 0 over all steps.
    Returns one record per epoch (loss, seconds)."""
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(loader)  # type: ignore[arg-type]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    probe.train()
    records = []
    for k in range(1, epochs + 1):
        sampler.set_epoch(WARMUP_EPOCH_KEY + k)
        start, total, count = time.perf_counter(), 0.0, 0
        bar = progress(len(loader), f"visual warm-up {k}/{epochs}") if progress is not None else None  # type: ignore[arg-type]
        for batch in loader:
            images = check_batch(batch)["images"].to(device, non_blocking=True)  # (B, V, 3, S, S)
            y, w = (torch.stack(t).to(device) for t in zip(*(targets_by_id[i] for i in batch["ids"])))  # (B, L) each
            with autocast(device, precision):
                logits = probe(images)  # (B, L)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y, weight=w)
            if not torch.isfinite(loss):
                raise CMNError(f"visual warm-up loss became {loss.item()}; lower --visual-warmup-lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + float(loss.detach()), count + 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        rec = {"warmup_epoch": k, "warmup_loss": total / max(count, 1), "warmup_seconds": time.perf_counter() - start}
        log(f"visual warm-up {k}/{epochs}: loss {rec['warmup_loss']:.3f}, {rec['warmup_seconds']:.0f} s")
        records.append(rec)
    return records


def targets_for(studies: Sequence[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{study id: (targets (N_TARGETS,), weights (N_TARGETS,))}`` for studies with ``id`` and ``report``."""
    targets, weights = report_targets([s.report for s in studies])
    return {s.id: (targets[i], weights[i]) for i, s in enumerate(studies)}


def positives(targets_by_id: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """Count of training reports stating each observation (for the log)."""
    if not targets_by_id:
        return {}
    sums = torch.stack([t[: len(CHEXPERT_OBSERVATIONS)] for t, _ in targets_by_id.values()]).sum(0)
    return {name: int(n) for name, n in zip(CHEXPERT_OBSERVATIONS, sums.tolist()) if n}

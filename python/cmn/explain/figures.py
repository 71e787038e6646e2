"""Explanations as PNG figure files (``cmn-explain --format png``), drawn with matplotlib.

Per study, a folder named after it with
- ``overview.png``: the views, the report and the labeler's findings;
- ``words/NNN_<word>.png``: one figure per generated word: rows are the decoder layers, their
  mean and (for a shared memory) the memory overlap; columns are the views;
- ``entities/NN_<observation>.png``: the same, averaged over the words of a finding phrase.
Heatmaps are scaled from their min to their max and drawn bilinearly over the image, as the
reference's plot does (it blends OpenCV's JET map 50/50 with the image).
"""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmn.explain.core import Explanation
from cmn.explain.html import label_name
from cmn.fsutil import write_atomic
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS


def _safe(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:limit] or "x"


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    """Draw ``image`` with the (h, w) ``heat`` map stretched over it."""
    rows, cols = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    lo, hi = float(heat.min()), float(heat.max())
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    ax.imshow(
        scaled,
        cmap="jet",
        alpha=0.45,
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
        interpolation="bilinear",
        vmin=0,
        vmax=1,
    )
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _map_figure(plt, e: Explanation, words: Sequence[int], heading: str, path: Path) -> None:
    rows = [(f"layer {y + 1}", e.attention(words, layer=y)) for y in range(e.cross_attention.shape[0])]
    rows.append(("mean of layers", e.attention(words)))
    if e.shared_memory and e.word_slots is not None:
        rows.append(("memory overlap", e.overlap(words)))
    V = len(e.images)
    fig, axes = plt.subplots(len(rows), V, figsize=(2.3 * V, 2.3 * len(rows) + 0.4), squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for v in range(V):
            rng = f"{maps[v].min():.3f}-{maps[v].max():.3f}"
            _overlay(axes[r][v], e.images[v], maps[v], f"{name}, view {v + 1} ({rng})")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    _save(plt, fig, path)


def _overview(plt, e: Explanation, path: Path) -> None:
    V = len(e.images)
    fig = plt.figure(figsize=(3 * V + 5, 4))
    for v, image in enumerate(e.images):
        ax = fig.add_axes((0.01 + v * 0.95 * 3 / (3 * V + 5), 0.08, 0.95 * 3 / (3 * V + 5), 0.84))
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(f"view {v + 1}", fontsize=9)
        ax.axis("off")
    found = [
        f"{name}: {label_name(v)[0]}"
        for name, v in zip(CHEXPERT_OBSERVATIONS, e.labels.tolist())
        if label_name(v)[1] != "muted"
    ]
    text = "\n".join(textwrap.wrap(e.report or "(empty report)", 60)) + "\n\nLabeler:\n" + "\n".join(found or ["-"])
    fig.text(3 * V / (3 * V + 5) + 0.01, 0.92, text, va="top", fontsize=8, family="monospace")
    fig.suptitle(e.study_id, fontsize=10)
    _save(plt, fig, path)


def write_figures(folder: Path, explanations: Sequence[Explanation]) -> None:
    """Write every study's figures into ``folder`` (which exists and is empty)."""
    from cmn.viz.plot import require_matplotlib

    plt = require_matplotlib()
    used: set[str] = set()
    for n, e in enumerate(explanations):
        name = _safe(e.study_id)
        if name in used:
            name = f"{name}_{n}"
        used.add(name)
        study = folder / name
        (study / "words").mkdir(parents=True)
        (study / "entities").mkdir()
        _overview(plt, e, study / "overview.png")
        for i, word in enumerate(e.words):
            _map_figure(
                plt,
                e,
                [i],
                f"{e.study_id}: word {i + 1} \u201c{word}\u201d",
                study / "words" / f"{i:03d}_{_safe(word)}.png",
            )
        for k, en in enumerate(e.entities):
            _map_figure(
                plt,
                e,
                list(en.words),
                f"{e.study_id}: \u201c{en.text}\u201d ({en.observation}, {label_name(en.label)[0]})",
                study / "entities" / f"{k:02d}_{_safe(en.observation)}.png",
            )

"""``cmn-eval --html``: one page with a row per study, prediction and reference side by side.

Words of the findings on which the labeler disagrees between prediction and reference (what
clinical efficacy counts as an error, under the same ``--uncertain`` policy) are highlighted
in both texts; rows sort by per-study BLEU-4 (pycocoevalcap's per-image score), by id or by
the number of disagreements. Self-contained, like the ``cmn-explain`` page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np

from cmn.fsutil import write_atomic
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS, binarize, find_mentions, label_reports
from cmn.viz.page import asset, esc, page


def per_study_bleu4(references: Mapping[str, str], predictions: Mapping[str, str]) -> dict[str, float]:
    """BLEU-4 of each study alone, as pycocoevalcap's ``Bleu(4)`` reports it per image."""
    from pycocoevalcap.bleu.bleu import Bleu

    from cmn.metrics.nlg import _as_coco

    gts, res = _as_coco(references, predictions)
    _, per_image = Bleu(4).compute_score(gts, res, verbose=0)
    return {k: float(v) for k, v in zip(gts, per_image[3])}


def disagreements(ref_labels: np.ndarray, pred_labels: np.ndarray, uncertain: str) -> np.ndarray:
    """(n, 14) bool: the observations where the binarised labels differ (both valid), i.e. a
    false positive or false negative of the CE scores."""
    ref_pos, ref_valid = binarize(ref_labels, uncertain)
    pred_pos, pred_valid = binarize(pred_labels, uncertain)
    return (ref_pos != pred_pos) & ref_valid & pred_valid


def _label_word(value: float) -> str:
    return "not mentioned" if math.isnan(value) else {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}[value]


def marked_text(text: str, flagged: Mapping[str, str]) -> str:
    """``text`` as HTML with the labeler's mentions of the ``flagged`` observations wrapped in
    ``<mark>`` (title: the explanation in ``flagged``)."""
    lower = text.lower()
    source = text if len(lower) == len(text) else lower  # offsets index the lowercased text
    out, pos = [], 0
    for m in find_mentions(text):
        if m.observation not in flagged or m.start < pos:
            continue
        out.append(esc(source[pos : m.start]))
        out.append(f'<mark title="{esc(flagged[m.observation])}">{esc(source[m.start : m.end])}</mark>')
        pos = m.end
    out.append(esc(source[pos:]))
    return "".join(out)


def _fmt(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def render_eval_page(
    references: Mapping[str, str],
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    *,
    uncertain: str = "negative",
    title: str = "cmn-eval",
) -> str:
    """The page as a string; ``scores`` are the overall scores printed by ``cmn-eval``."""
    keys = sorted(predictions)
    bleu = per_study_bleu4(references, predictions)
    ref_labels = label_reports([references[k] for k in keys])  # (n, 14)
    pred_labels = label_reports([predictions[k] for k in keys])  # (n, 14)
    differ = disagreements(ref_labels, pred_labels, uncertain)  # (n, 14)
    rows = []
    for n, key in enumerate(keys):
        flagged = {
            CHEXPERT_OBSERVATIONS[j]: f"{CHEXPERT_OBSERVATIONS[j]}: prediction {_label_word(pred_labels[n, j])}, "
            f"reference {_label_word(ref_labels[n, j])}"
            for j in np.flatnonzero(differ[n])
        }
        names = ", ".join(flagged) or "-"
        rows.append(
            f'<tr data-id="{esc(key)}" data-bleu="{bleu[key]:.6f}" data-disagree="{len(flagged)}">'
            f'<td>{esc(key)}</td><td class="num">{bleu[key]:.4f}</td>'
            f"<td>{marked_text(predictions[key], flagged)}</td><td>{marked_text(references[key], flagged)}</td>"
            f"<td>{esc(names)}</td></tr>"
        )
    summary = (
        "<tr>"
        + "".join(f"<th>{esc(k)}</th>" for k in scores)
        + "</tr><tr>"
        + "".join(f'<td class="num">{_fmt(v)}</td>' for v in scores.values())
        + "</tr>"
    )
    n_differ = int(differ.any(axis=1).sum())
    body = (
        f"<h1>{esc(title)}</h1>\n"
        f'<p class="muted">{len(keys)} studies; {n_differ} with a finding the labeler reads differently in '
        f"prediction and reference (<mark>highlighted</mark>; uncertain counts as {esc(uncertain)}, as in the CE "
        "scores). Click a column heading to sort.</p>\n"
        f'<div class="scroll"><table class="summary">{summary}</table></div>\n'
        '<table class="studies"><thead><tr>'
        '<th><button type="button" data-sort="id">id</button></th>'
        '<th><button type="button" data-sort="bleu">BLEU-4</button></th>'
        "<th>prediction</th><th>reference</th>"
        '<th><button type="button" data-sort="disagree">labeler disagrees on</button></th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return page(title, body, css=asset("eval.css"), script=asset("eval.js"))


def write_eval_page(
    path: Path,
    references: Mapping[str, str],
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    *,
    uncertain: str = "negative",
    title: Optional[str] = None,
) -> None:
    """Write :func:`render_eval_page` to ``path`` atomically."""
    write_atomic(
        path,
        render_eval_page(references, predictions, scores, uncertain=uncertain, title=title or f"cmn-eval: {path.stem}"),
    )

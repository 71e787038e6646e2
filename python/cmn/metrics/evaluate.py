"""One flat dict of NLG and clinical-efficacy scores, used by training and ``cmn-eval``."""

from __future__ import annotations

from collections.abc import Mapping

from cmn.metrics.clinical import ce_scores, label_reports
from cmn.metrics.nlg import NLGScorer, _as_coco


def evaluate_reports(
    references: Mapping[str, str],
    predictions: Mapping[str, str],
    clinical: bool,
    scorer: NLGScorer | None = None,
    uncertain: str = "negative",
) -> dict:
    """Score id-keyed predicted reports against references.

    Args:
        references, predictions: id -> report text, same ids (cleaned text, as in training).
        clinical: also compute clinical efficacy (for MIMIC-style chest X-ray reports).
        scorer: an open :class:`NLGScorer` to reuse (keeps one METEOR process across
            epochs); when ``None`` one is opened and closed here.
        uncertain: CE policy for uncertain labels, see :func:`cmn.metrics.clinical.binarize`.

    Returns:
        ``BLEU_1``..``BLEU_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` and, when ``clinical``,
        ``CE_precision``, ``CE_recall``, ``CE_F1`` (macro, the paper's CE) and
        ``CE_precision_micro``, ``CE_recall_micro``, ``CE_F1_micro``.
    """
    _as_coco(references, predictions)  # id checks before the slow parts
    if scorer is None:
        with NLGScorer() as own:
            out = own(references, predictions)
    else:
        out = scorer(references, predictions)
    if clinical:
        out.update(ce_flat(clinical_scores(references, predictions, uncertain)))
    return out


def clinical_scores(references: Mapping[str, str], predictions: Mapping[str, str], uncertain: str = "negative") -> dict:
    """:func:`ce_scores` of the labels of ``predictions`` against those of ``references``."""
    keys = sorted(predictions)
    ref = label_reports([references[k] for k in keys])  # (n, 14)
    pred = label_reports([predictions[k] for k in keys])  # (n, 14)
    return ce_scores(ref, pred, uncertain=uncertain)


def ce_flat(ce: dict) -> dict:
    """The summary numbers of a :func:`ce_scores` result under training's key names."""
    return {
        "CE_precision": ce["precision_macro"],
        "CE_recall": ce["recall_macro"],
        "CE_F1": ce["f1_macro"],
        "CE_precision_micro": ce["precision_micro"],
        "CE_recall_micro": ce["recall_micro"],
        "CE_F1_micro": ce["f1_micro"],
    }

"""Report-generation metrics: NLG scores as the paper computes them and clinical efficacy.

* :func:`nlg_scores` / :class:`NLGScorer`: BLEU-1..4, METEOR, ROUGE-L (+ CIDEr) through
  pycocoevalcap, on the same cleaned text the reference code scores.
* :func:`label_reports`: an offline rule-based labeler for the 14 CheXpert observations.
* :func:`ce_scores`: clinical-efficacy precision / recall / F1 (macro, micro, per observation).
* :func:`evaluate_reports`: both at once, as one flat dict (what training logs).
"""

from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS, UNCERTAIN_POLICIES, ce_scores, label_reports
from cmn.metrics.evaluate import evaluate_reports
from cmn.metrics.nlg import NLG_KEYS, MeteorUnavailableWarning, NLGScorer, nlg_scores

__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "NLG_KEYS",
    "UNCERTAIN_POLICIES",
    "MeteorUnavailableWarning",
    "NLGScorer",
    "ce_scores",
    "evaluate_reports",
    "label_reports",
    "nlg_scores",
]

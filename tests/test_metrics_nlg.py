"""NLG metrics equal direct pycocoevalcap calls; METEOR's process and its failure modes."""

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from cmn.errors import DataError
from cmn.metrics import NLG_KEYS, MeteorUnavailableWarning, NLGScorer, evaluate_reports, nlg_scores

REFS = {
    "a": "the heart size is normal . there is no pleural effusion or pneumothorax .",
    "b": "moderate cardiomegaly . small bilateral pleural effusions .",
    "c": "the lungs are clear . no acute cardiopulmonary process .",
    "d": "endotracheal tube terminates 4 cm above the carina .",
}
PREDS = {
    "a": "the heart size is normal . no pleural effusion or pneumothorax .",
    "b": "the heart is enlarged . there are small pleural effusions .",
    "c": "the lungs are clear .",
    "d": "the endotracheal tube is in standard position .",
}


@pytest.fixture(scope="module")
def scorer():
    with NLGScorer() as s:  # one METEOR process for the module
        yield s


def _close_meteor(m):
    """pycocoevalcap's Meteor leaves its pipes open; close them (no ResourceWarning)."""
    for pipe in (m.meteor_p.stdin, m.meteor_p.stdout, m.meteor_p.stderr):
        pipe.close()
    m.meteor_p.kill()
    m.meteor_p.wait()


@pytest.mark.slow
def test_scores_equal_direct_pycocoevalcap(scorer):
    gts = {k: [REFS[k]] for k in REFS}
    res = {k: [PREDS[k]] for k in REFS}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        _close_meteor(meteor)
    expected = {f"BLEU_{i + 1}": b for i, b in enumerate(bleu)}
    expected["METEOR"] = meteor_score
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = scorer(REFS, PREDS)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_scorer_reusable_and_insensitive_to_key_order(scorer):
    first = scorer(REFS, PREDS)
    reordered = scorer(dict(reversed(list(REFS.items()))), dict(reversed(list(PREDS.items()))))
    assert first == reordered


def test_empty_prediction_and_odd_text_do_not_hang(scorer):
    preds = dict(PREDS, a="", b="line one\nline two ||| three")
    scores = scorer(REFS, preds)
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["BLEU_1"] < scorer(REFS, PREDS)["BLEU_1"]


def test_identical_reports_score_one(scorer):
    scores = scorer(REFS, dict(REFS))
    for key in ("BLEU_1", "BLEU_4", "ROUGE_L", "METEOR"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6), key


def test_missing_java_reports_meteor_as_nan(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    with pytest.warns(MeteorUnavailableWarning, match="java"):
        scores = nlg_scores(REFS, PREDS)
    assert math.isnan(scores["METEOR"])
    gts = {k: [REFS[k]] for k in REFS}
    res = {k: [PREDS[k]] for k in REFS}
    assert scores["BLEU_4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert scores["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0])


def test_meteor_off_skips_java():
    scores = nlg_scores(REFS, PREDS, meteor=False)
    assert math.isnan(scores["METEOR"]) and scores["BLEU_1"] > 0


def test_empty_predictions_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        nlg_scores(REFS, {}, meteor=False)


def test_mismatched_ids_is_a_data_error():
    with pytest.raises(DataError, match="same ids.*'zz'"):
        nlg_scores(REFS, dict(PREDS, zz="extra"), meteor=False)
    with pytest.raises(DataError, match="reference id"):
        nlg_scores(REFS, {"a": PREDS["a"]}, meteor=False)


def test_evaluate_reports_flat_dict_with_shared_scorer(scorer):
    out = evaluate_reports(REFS, PREDS, clinical=True, scorer=scorer)
    assert set(NLG_KEYS) <= set(out)
    ce_keys = {"CE_precision", "CE_recall", "CE_F1", "CE_precision_micro", "CE_recall_micro", "CE_F1_micro"}
    assert ce_keys <= set(out)
    assert all(0.0 <= out[k] <= 1.0 for k in ce_keys)
    assert "CE_F1" not in evaluate_reports(REFS, PREDS, clinical=False, scorer=scorer)


def test_close_stops_java_and_is_idempotent(scorer):
    # Runs last in this module; the fixture's own close() afterwards must be harmless.
    scorer({"x": "a b c"}, {"x": "a b d"})
    proc = scorer._meteor._impl.meteor_p
    scorer.close()
    scorer.close()
    assert proc.poll() is not None

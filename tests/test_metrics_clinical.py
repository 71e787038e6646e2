"""Golden cases for the offline CheXpert-style labeler, and CE metric arithmetic."""

import math
import re

import numpy as np
import pytest

from cmn.errors import ConfigError, DataError
from cmn.metrics import CHEXPERT_OBSERVATIONS, ce_scores, label_reports

P, N, U = 1, 0, -1
IDX = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}

# (report, {observation: expected label}); observations not listed are not checked,
# except that "absent" below means NaN.
GOLDEN = [
    # No Finding
    ("No acute cardiopulmonary process.", {"No Finding": P}),
    ("The lungs are clear. No pneumothorax.", {"No Finding": P, "Pneumothorax": N}),
    ("Endotracheal tube in standard position. Lungs are clear.", {"No Finding": P, "Support Devices": P}),
    ("Small left pleural effusion.", {"No Finding": None, "Pleural Effusion": P}),
    ("Possible right lower lobe pneumonia.", {"No Finding": None, "Pneumonia": U}),
    ("Severe emphysema.", {"No Finding": None}),
    ("No emphysema.", {"No Finding": P}),
    # Enlarged Cardiomediastinum
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": P}),
    ("Widening of the superior mediastinum.", {"Enlarged Cardiomediastinum": P}),
    ("The cardiomediastinal silhouette is normal.", {"Enlarged Cardiomediastinum": N}),
    ("Normal cardiomediastinal contours.", {"Enlarged Cardiomediastinum": N}),
    ("The mediastinal and hilar contours are within normal limits.", {"Enlarged Cardiomediastinum": N}),
    ("Stable cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": U}),
    ("The mediastinum may be slightly widened.", {"Enlarged Cardiomediastinum": U}),
    # Cardiomegaly
    ("Moderate cardiomegaly.", {"Cardiomegaly": P}),
    ("Unchanged cardiomegaly.", {"Cardiomegaly": P}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": P}),
    ("Heart size is normal.", {"Cardiomegaly": N}),
    ("Normal heart size.", {"Cardiomegaly": N}),
    ("The cardiac silhouette is within normal limits.", {"Cardiomegaly": N}),
    ("Heart size is top normal.", {"Cardiomegaly": U}),  # upper limit of normal = borderline (issue 13)
    ("The heart is not enlarged.", {"Cardiomegaly": N}),
    ("No cardiomegaly.", {"Cardiomegaly": N}),
    ("Heart size is stable.", {"Cardiomegaly": U}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": U}),
    ("Findings suggest congestive heart failure.", {"Cardiomegaly": U, "Edema": U}),
    ("Retrocardiac opacity projecting over the heart.", {"Cardiomegaly": None, "Lung Opacity": P}),
    # Lung Opacity
    ("Patchy opacity in the right lower lobe.", {"Lung Opacity": P}),
    ("Bibasilar opacities, likely atelectasis.", {"Lung Opacity": P, "Atelectasis": P}),
    ("No focal airspace opacity.", {"Lung Opacity": N}),
    ("Possible opacity at the left base.", {"Lung Opacity": U}),
    ("There is no focal opacity or effusion.", {"Lung Opacity": N, "Pleural Effusion": N}),
    ("Lungs are clear.", {"Lung Opacity": None}),
    # Lung Lesion
    ("A 1.5 cm nodule in the right upper lobe.", {"Lung Lesion": P}),
    ("Left hilar mass is again seen.", {"Lung Lesion": P}),
    ("No suspicious pulmonary nodules.", {"Lung Lesion": N}),
    ("Nodular opacity may represent a nipple shadow.", {"Lung Lesion": P, "Lung Opacity": P}),
    ("A mass cannot be excluded.", {"Lung Lesion": U}),
    # Edema
    ("Moderate pulmonary edema.", {"Edema": P}),
    ("No pulmonary edema.", {"Edema": N}),
    ("Mild pulmonary vascular congestion.", {"Edema": U}),
    ("No vascular congestion or edema.", {"Edema": N}),
    ("Cardiomegaly without pulmonary edema.", {"Cardiomegaly": P, "Edema": N}),
    ("Mild interstitial edema is possible.", {"Edema": U}),
    # Consolidation
    ("Right lower lobe consolidation.", {"Consolidation": P}),
    ("No focal consolidation.", {"Consolidation": N}),
    ("Consolidation is not seen.", {"Consolidation": N}),
    ("No new focal consolidation.", {"Consolidation": U}),
    ("Consolidation concerning for pneumonia.", {"Consolidation": P, "Pneumonia": U}),
    ("Lungs are clear without focal consolidation.", {"Consolidation": N}),
    # Pneumonia
    ("Findings consistent with pneumonia.", {"Pneumonia": P}),
    ("No evidence of pneumonia.", {"Pneumonia": N}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Cannot exclude early pneumonia.", {"Pneumonia": U}),
    ("Opacity could represent atelectasis or pneumonia.", {"Lung Opacity": P, "Atelectasis": U, "Pneumonia": U}),
    # Atelectasis
    ("Bibasilar atelectasis.", {"Atelectasis": P}),
    ("May represent atelectasis.", {"Atelectasis": U}),
    ("Findings may represent atelectasis.", {"Atelectasis": U}),
    ("No atelectasis.", {"Atelectasis": N}),
    ("Minimal left basilar atelectasis has resolved.", {"Atelectasis": N}),
    ("Left lower lobe collapse.", {"Atelectasis": P}),
    # Pneumothorax
    ("Small right apical pneumothorax.", {"Pneumothorax": P}),
    ("No pneumothorax.", {"Pneumothorax": N}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": N}),
    ("Tiny pneumothorax is questionable.", {"Pneumothorax": U}),
    ("Small pneumothorax is unchanged.", {"Pneumothorax": P}),
    ("No change in the small left apical pneumothorax.", {"Pneumothorax": P}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": N}),
    # Pleural Effusion
    ("Small bilateral pleural effusions.", {"Pleural Effusion": P}),
    ("No effusion or pneumothorax.", {"Pleural Effusion": N, "Pneumothorax": N}),
    (
        "No pleural effusion, pneumothorax, or focal consolidation.",
        {"Pleural Effusion": N, "Pneumothorax": N, "Consolidation": N},
    ),
    ("There is no pneumothorax, but there is a small left effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("Small pericardial effusion.", {"Pleural Effusion": None}),
    ("Blunting of the left costophrenic angle.", {"Pleural Effusion": U}),
    ("Possible small right pleural effusion.", {"Pleural Effusion": U}),
    ("Without evidence of pleural effusion.", {"Pleural Effusion": N}),
    ("The lungs are free of effusion.", {"Pleural Effusion": N}),
    ("Effusion has resolved.", {"Pleural Effusion": N}),
    # Pleural Other
    ("Right apical pleural thickening.", {"Pleural Other": P}),
    ("Pleural scarring at the left base.", {"Pleural Other": P, "Lung Opacity": None}),
    ("No pleural thickening.", {"Pleural Other": N}),
    ("Possible pleural thickening.", {"Pleural Other": U}),
    # Fracture
    ("Healed left rib fractures.", {"Fracture": P}),
    ("No displaced rib fracture.", {"Fracture": N}),
    ("Possible nondisplaced rib fracture.", {"Fracture": U}),
    ("No acute osseous abnormality.", {"Fracture": None}),
    # Support Devices
    ("Right internal jugular central venous catheter tip in the SVC.", {"Support Devices": P}),
    ("Endotracheal tube terminates 4 cm above the carina. NG tube in the stomach.", {"Support Devices": P}),
    ("Left chest wall pacemaker with leads in the right atrium and ventricle.", {"Support Devices": P}),
    ("Interval removal of the endotracheal tube.", {"Support Devices": N}),
    ("The chest tube has been removed.", {"Support Devices": N}),
    # Compound and mixed sentences
    (
        "Moderate cardiomegaly with small bilateral effusions and bibasilar atelectasis.",
        {"Cardiomegaly": P, "Pleural Effusion": P, "Atelectasis": P},
    ),
    ("Heart size and mediastinal contours are normal.", {"Cardiomegaly": N, "Enlarged Cardiomediastinum": N}),
    ("Cardiomegaly is seen, lungs are clear.", {"Cardiomegaly": P}),
    ("No pneumothorax. Small left effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("No consolidation; however, atelectasis is present.", {"Consolidation": N, "Atelectasis": P}),
]


def _cleaned(report: str) -> str:
    """The shape of training text: lower case, punctuation dropped, ' . ' between sentences."""
    sentences = [s for s in re.split(r"\.\s+|\.$", report.lower()) if s.strip()]
    return " . ".join(re.sub(r"[,;:()]", "", s).strip() for s in sentences) + " ."


@pytest.mark.parametrize("form", ["raw", "cleaned"])
def test_golden_reports(form):
    reports = [r if form == "raw" else _cleaned(r) for r, _ in GOLDEN]
    labels = label_reports(reports)
    failures = []
    for (_report, expected), text, row in zip(GOLDEN, reports, labels):
        for obs, want in expected.items():
            got = row[IDX[obs]]
            ok = math.isnan(got) if want is None else got == want
            if not ok:
                failures.append(f"{text!r}: {obs} = {got}, expected {want}")
    assert not failures, "\n".join(failures)


def test_every_observation_has_positive_negative_and_uncertain_goldens():
    seen = {name: set() for name in CHEXPERT_OBSERVATIONS[1:]}
    for _, expected in GOLDEN:
        for obs, want in expected.items():
            if obs in seen and want is not None:
                seen[obs].add(want)
    for obs, kinds in seen.items():
        assert {P, N} <= kinds, obs
        if obs not in ("Support Devices",):
            assert U in kinds, obs


def test_output_shape_dtype_and_unmentioned():
    labels = label_reports(["", "Moderate cardiomegaly.", "\n"])
    assert labels.shape == (3, 14) and labels.dtype == np.float64
    assert labels[0, IDX["No Finding"]] == 1 and np.isnan(labels[0, 1:]).all()
    assert labels[1, IDX["No Finding"]] != labels[1, IDX["No Finding"]]  # NaN
    assert label_reports([]).shape == (0, 14)


def test_multiline_report_and_aggregation():
    # positive beats uncertain beats negative across mentions of one observation
    report = "No pleural effusion.\nPossible small left effusion.\nRight effusion is present."
    assert label_reports([report])[0, IDX["Pleural Effusion"]] == P
    assert label_reports(["No effusion. Possible small effusion."])[0, IDX["Pleural Effusion"]] == U


def test_non_text_report_is_a_data_error():
    with pytest.raises(DataError, match="report 1"):
        label_reports(["ok", None])


# ---------------------------------------------------------------- CE metric arithmetic


def _labels(rows):
    out = np.full((len(rows), 14), np.nan)
    for i, row in enumerate(rows):
        for k, v in row.items():
            out[i, k] = v
    return out


# Three reports, observations 2 (Cardiomegaly) and 10 (Pleural Effusion) only.
REF = _labels([{2: 1, 10: 1}, {2: 0, 10: -1}, {2: 1}])
PRED = _labels([{2: 1, 10: 0}, {2: 1, 10: 1}, {2: -1, 10: 1}])


def test_ce_default_policy_hand_computed():
    s = ce_scores(REF, PRED)
    # Cardiomegaly: ref [1,0,1], pred [1,1,0] -> tp 1, fp 1, fn 1 -> P=R=F1=1/2
    # Effusion:     ref [1,0,0], pred [0,1,1] -> tp 0, fp 2, fn 1 -> 0, 0, 0
    # The other 12 have no positives anywhere and score 0 (scikit-learn's zero_division).
    card = s["per_observation"]["Cardiomegaly"]
    assert (card["precision"], card["recall"], card["f1"], card["support"]) == (0.5, 0.5, 0.5, 2)
    assert s["per_observation"]["Pleural Effusion"]["f1"] == 0.0
    assert s["precision_macro"] == pytest.approx(0.5 / 14)
    assert s["recall_macro"] == pytest.approx(0.5 / 14)
    assert s["f1_macro"] == pytest.approx(0.5 / 14)
    # micro: tp 1, fp 3, fn 2
    assert s["precision_micro"] == pytest.approx(1 / 4)
    assert s["recall_micro"] == pytest.approx(1 / 3)
    assert s["f1_micro"] == pytest.approx(2 * 1 / (2 * 1 + 3 + 2))


def test_ce_uncertain_positive_and_ignore_policies():
    pos = ce_scores(REF, PRED, uncertain="positive")
    # Cardiomegaly: ref [1,0,1], pred [1,1,1] -> tp 2 fp 1 fn 0
    # Effusion:     ref [1,1,0], pred [0,1,1] -> tp 1 fp 1 fn 1
    assert pos["per_observation"]["Cardiomegaly"]["precision"] == pytest.approx(2 / 3)
    assert pos["per_observation"]["Cardiomegaly"]["recall"] == 1.0
    assert pos["per_observation"]["Pleural Effusion"]["f1"] == pytest.approx(0.5)
    assert pos["precision_micro"] == pytest.approx(3 / 5)
    ign = ce_scores(REF, PRED, uncertain="ignore")
    # Cardiomegaly: report 3 dropped (pred -1) -> ref [1,0], pred [1,1] -> tp 1 fp 1 fn 0
    # Effusion: report 2 dropped (ref -1) -> ref [1,0], pred [0,1] -> tp 0 fp 1 fn 1
    assert ign["per_observation"]["Cardiomegaly"]["precision"] == 0.5
    assert ign["per_observation"]["Cardiomegaly"]["recall"] == 1.0
    assert ign["recall_micro"] == pytest.approx(1 / 2)


def test_ce_matches_sklearn_style_reference_computation():
    rng = np.random.default_rng(0)
    ref = rng.choice([1.0, 0.0, -1.0, np.nan], size=(50, 14))
    pred = rng.choice([1.0, 0.0, -1.0, np.nan], size=(50, 14))
    s = ce_scores(ref, pred)
    r, p = ref == 1, pred == 1
    f1s = []
    for k in range(14):
        tp, fp, fn = (r[:, k] & p[:, k]).sum(), (~r[:, k] & p[:, k]).sum(), (r[:, k] & ~p[:, k]).sum()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert s["f1_macro"] == pytest.approx(np.mean(f1s))


def test_ce_errors():
    with pytest.raises(DataError, match="must both be"):
        ce_scores(REF, PRED[:2])
    with pytest.raises(ConfigError, match="uncertain"):
        ce_scores(REF, PRED, uncertain="maybe")


def test_mention_sentence_is_the_labelers_sentence():
    from cmn.metrics.clinical import find_mentions, mention_sentence

    report = "Heart normal. Small LEFT effusion; right pneumothorax. No consolidation"
    got = {m.observation: mention_sentence(report, m).strip() for m in find_mentions(report)}
    assert got == {
        "Pleural Effusion": "small left effusion",  # lowercased, cut at the ";"
        "Pneumothorax": "right pneumothorax",
        "Consolidation": "no consolidation",
    }

"""Demo reports: written from the drawn findings, and read back from generated text."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np

from cmn.data.demo.findings import Findings

_WEIGHTS = {2: [0.7, 0.3], 3: [0.55, 0.3, 0.15]}

_PHRASES = {
    "heart_normal": [
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiac silhouette is normal in size.",
    ],
    "heart_mild": [
        "The heart is mildly enlarged.",
        "There is mild cardiomegaly.",
        "Mild enlargement of the cardiac silhouette.",
    ],
    "heart_moderate": [
        "The cardiac silhouette is moderately enlarged.",
        "There is moderate cardiomegaly.",
        "The heart is moderately enlarged.",
    ],
    "mediastinum": ["The mediastinal contours are normal.", "The mediastinum is unremarkable."],
    "lungs_clear": [
        "The lungs are clear.",
        "The lungs are clear without focal consolidation or nodule.",
        "No focal airspace disease or pulmonary nodule.",
    ],
    "consolidation": [
        "There is focal consolidation in the {side} lower lobe.",
        "Airspace opacity in the {side} lower lobe, concerning for pneumonia.",
        "{Side} lower lobe consolidation is present.",
    ],
    "no_consolidation": [
        "No focal consolidation.",
        "There is no focal airspace consolidation.",
        "No focal airspace disease.",
    ],
    "nodule": [
        "A {cm} cm nodule is seen in the {lobe} lobe.",
        "There is a {cm} cm nodular opacity in the {lobe} lobe.",
        "{Lobe} lobe nodule measuring {cm} cm.",
    ],
    "no_nodule": ["No pulmonary nodules.", "No suspicious pulmonary nodule is seen.", "There is no pulmonary nodule."],
    "pleura_clear": [
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pneumothorax or pleural effusion is seen.",
    ],
    "effusion": [
        "There is a {size} {side} pleural effusion.",
        "{Size} {side} pleural effusion with blunting of the costophrenic angle.",
        "A {size} {side} pleural effusion is present.",
    ],
    "effusion_bilateral": [
        "There are {size} bilateral pleural effusions.",
        "{Size} bilateral pleural effusions with blunting of the costophrenic angles.",
        "Bilateral {size} pleural effusions are present.",
    ],
    "no_effusion": ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."],
    "pneumothorax": [
        "There is a {side} apical pneumothorax.",
        "A {side} apical pneumothorax is present.",
        "{Side} apical pneumothorax with a visible pleural line.",
    ],
    "no_pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    "catheter": [
        "A right internal jugular central venous catheter terminates in the superior vena cava.",
        "Right internal jugular central line with the tip in the superior vena cava.",
        "The right internal jugular catheter tip projects over the superior vena cava.",
    ],
    "pacemaker": [
        "A left chest wall pacemaker is present with leads in the right atrium and right ventricle.",
        "Left chest pacemaker with leads terminating in the right atrium and right ventricle.",
        "A pacing device overlies the left chest wall with two transvenous leads.",
    ],
    "no_device": ["No support devices are seen.", "There are no lines or tubes."],
    "bones": ["No acute osseous abnormality.", "The osseous structures are intact."],
}


def write_report(f: Findings, rng: np.random.Generator) -> str:
    """A findings-section report for ``f``, sentences in a fixed order, phrasing at random."""

    def say(key: str, **fields: str) -> str:
        options = _PHRASES[key]
        text = options[rng.choice(len(options), p=_WEIGHTS[len(options)])]
        fields.update({k.capitalize(): v.capitalize() for k, v in fields.items()})
        return text.format(**fields)

    sentences = [say(f"heart_{f.cardiomegaly or 'normal'}"), say("mediastinum")]
    if not f.consolidation_side and not f.nodule_lobe:
        sentences.append(say("lungs_clear"))
    else:
        sentences.append(
            say("consolidation", side=f.consolidation_side) if f.consolidation_side else say("no_consolidation")
        )
        sentences.append(say("nodule", lobe=f.nodule_lobe, cm=str(f.nodule_cm)) if f.nodule_lobe else say("no_nodule"))
    if not f.effusion_side and not f.pneumothorax_side:
        sentences.append(say("pleura_clear"))
    else:
        if f.effusion_side == "bilateral":
            sentences.append(say("effusion_bilateral", size=f.effusion_size))
        elif f.effusion_side:
            sentences.append(say("effusion", size=f.effusion_size, side=f.effusion_side))
        else:
            sentences.append(say("no_effusion"))
        sentences.append(
            say("pneumothorax", side=f.pneumothorax_side) if f.pneumothorax_side else say("no_pneumothorax")
        )
    sentences.append(say(f.device) if f.device else say("no_device"))
    sentences.append(say("bones"))
    return " ".join(sentences)


# --------------------------------------------------------------------------- reading reports back
# A generated report is read with the phrase templates above: each cleaned sentence is matched
# against every template (placeholders become the values they can take), so a report that
# states a finding in any of its phrasings is read as stating it, and a garbled sentence as
# stating nothing.
_SLOTS = {
    "side": "left|right",
    "lobe": "right upper|left upper|right lower|left lower",
    "cm": "1|2",
    "size": "small|moderate",
}
_SIDED = {
    "effusion": "effusion_side",
    "pneumothorax": "pneumothorax_side",
    "nodule": "nodule_lobe",
    "consolidation": "consolidation_side",
}


@functools.lru_cache(maxsize=1)
def _templates() -> list[tuple[str, re.Pattern]]:
    from cmn.text import clean_report

    out = []
    for key, options in _PHRASES.items():
        for text in options:
            marked = re.sub(r"\{(\w+)\}", lambda m: f" zz{m.group(1).lower()}zz ", text)
            cleaned = clean_report(marked, "iu_xray").rstrip(" .")
            pattern = re.escape(re.sub(r"\s+", " ", cleaned))
            for slot, values in _SLOTS.items():
                pattern = pattern.replace(f"zz{slot}zz", f"(?P<{slot}>{values})", 1)
                pattern = pattern.replace(f"zz{slot}zz", f"(?P={slot})")
            out.append((key, re.compile(pattern)))
    return out


def read_report(text: str) -> Findings:
    """The findings a (cleaned, generated) demo report states; what it does not state is absent."""
    found: dict[str, str] = {}
    for sentence in re.split(r"\s*\.\s*", text.lower()):
        sentence = re.sub(r"[^a-z0-9 ]", " ", sentence)
        sentence = re.sub(r"\s+", " ", sentence).strip()
        for key, pattern in _templates():
            m = pattern.fullmatch(sentence)
            if m is None:
                continue
            slots = m.groupdict()
            if key in ("heart_mild", "heart_moderate"):
                found["cardiomegaly"] = key.split("_")[1]
            elif key == "effusion":
                found["effusion_side"], found["effusion_size"] = slots["side"], slots["size"]
            elif key == "effusion_bilateral":
                found["effusion_side"], found["effusion_size"] = "bilateral", slots["size"]
            elif key in ("pneumothorax", "consolidation"):
                found[_SIDED[key]] = slots["side"]
            elif key == "nodule":
                found["nodule_lobe"], found["nodule_cm"] = slots["lobe"], slots["cm"]
            elif key in ("catheter", "pacemaker"):
                found["device"] = key
            break
    return Findings(
        cardiomegaly=found.get("cardiomegaly", ""),
        effusion_side=found.get("effusion_side", ""),
        effusion_size=found.get("effusion_size", "small"),
        pneumothorax_side=found.get("pneumothorax_side", ""),
        nodule_lobe=found.get("nodule_lobe", ""),
        nodule_cm=int(found.get("nodule_cm", 1)),
        consolidation_side=found.get("consolidation_side", ""),
        device=found.get("device", ""),
    )


def _side(f: Findings, finding: str) -> str:
    value = getattr(f, _SIDED[finding])
    return value.split()[0] if finding == "nodule" and value else value


def score_findings(truth: Sequence[Findings], reports: Sequence[str]) -> dict[str, dict[str, Optional[float]]]:
    """Per drawn finding, how well generated ``reports`` state what the images show.

    ``precision``/``recall``/``f1`` of presence; ``laterality``: of the studies where the
    finding is present and the report states it with a side (effusion: left/right/bilateral;
    nodule: the lobe's side), the fraction with the right side (``None`` when there are none);
    ``support``: studies showing the finding. ``macro_f1`` averages the six F1.
    """
    from cmn.data.demo.findings import FINDINGS

    if len(truth) != len(reports):
        raise ValueError(f"{len(truth)} truths but {len(reports)} reports")
    read = [read_report(r) for r in reports]
    out: dict[str, dict[str, Optional[float]]] = {}
    f1s: list[float] = []
    for name in FINDINGS:
        t = [f.labels()[name] for f in truth]
        p = [f.labels()[name] for f in read]
        tp = sum(a and b for a, b in zip(t, p))
        prec = tp / sum(p) if sum(p) else 0.0
        rec = tp / sum(t) if sum(t) else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        row: dict[str, Optional[float]] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": float(sum(t)),
            "laterality": None,
        }
        if name in _SIDED:
            pairs = [(_side(a, name), _side(b, name)) for a, b in zip(truth, read) if _side(a, name) and _side(b, name)]
            row["laterality"] = sum(x == y for x, y in pairs) / len(pairs) if pairs else None
            row["lateral_cases"] = float(len(pairs))
        out[name] = row
    out["macro_f1"] = {"f1": sum(f1s) / len(FINDINGS)}
    return out

"""Clinical efficacy (CE): an offline rule-based CheXpert-style labeler and its metrics.

The paper's CE compares CheXpert labels of generated and reference reports over 14
observations. The CheXpert labeler needs NegBio and a constituency parser; we follow its
scheme with regular expressions instead, so labeling runs offline and fast:

1. Split a report into sentences (``. ; : ? !`` and line breaks) and each sentence into
   clauses at scope terminators (``but``, ``however``, ``which``, ``there``...).
2. Find mention phrases (``data/mention/*.txt``); one pass of a combined regex, the
   earliest and then longest phrase wins, and ``unmention.txt`` hides phrases such as
   "pericardial effusion".
3. Classify each mention from the clause text before and after it, in CheXpert's order:
   uncertainty that looks like negation ("cannot be excluded", "no new"), then negation
   ("no", "without", "is normal"; "no" covers a whole list: "no effusion or
   pneumothorax"), then uncertainty ("possible", "may represent", "X or Y").
4. Aggregate per observation like the CheXpert labeler: any positive gives 1, else any
   uncertain gives -1, else 0; no mention gives NaN. "No Finding" is 1 when nothing but
   support devices is positive or uncertain (``no_finding.txt`` lists other findings
   that also rule it out), otherwise NaN.

Rule files live in ``cmn/metrics/data`` and are documented in their headers; a new phrase
is one line. Differences from the CheXpert labeler are listed in the project README.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

import numpy as np

from cmn.errors import ConfigError, DataError

#: The 14 observations, in the column order of the CheXpert dataset CSVs.
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
_OBS_INDEX = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}
_NO_FINDING = _OBS_INDEX["No Finding"]
_SUPPORT = _OBS_INDEX["Support Devices"]
_OTHER = -1  # pseudo-observation: a finding outside the 14 (blocks "No Finding")

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
UNCERTAIN_POLICIES = ("negative", "positive", "ignore")

_SENTENCE_SPLIT = re.compile(r"[.;:?!](?=\s|$)|\n")

# Mention flags (the first character of a line in a mention file).
_PLAIN, _FORCED_UNCERTAIN, _NEUTRAL_SIZE, _LINKED = "", "?", "~", "^"


def _data_text(*parts: str) -> str:
    return resources.files("cmn.metrics").joinpath("data", *parts).read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _load_macros() -> dict[str, str]:
    macros: dict[str, str] = {}
    for line in _lines(_data_text("rules", "macros.txt")):
        name, _, value = line.partition("=")
        macros[name.strip()] = _expand(value.strip(), macros)
    return macros


def _expand(pattern: str, macros: dict[str, str]) -> str:
    for name, value in macros.items():
        pattern = pattern.replace("{" + name + "}", value)
    return pattern


@dataclass(frozen=True)
class _Rule:
    """Cue patterns of one kind: ``before`` is searched in the clause before a mention,
    ``after`` must match at the start of the clause after it."""

    before: re.Pattern | None
    after: re.Pattern | None

    def hits(self, before: str, after: str) -> bool:
        return bool(
            (self.before is not None and self.before.search(before))
            or (self.after is not None and self.after.match(after))
        )


def _load_rule(filename: str, macros: dict[str, str]) -> _Rule:
    parts: dict[str, list[str]] = {"before": [], "after": []}
    for line in _lines(_data_text("rules", filename)):
        where, sep, pattern = line.partition(":")
        if not sep or where.strip() not in parts:
            raise ValueError(f"cmn/metrics/data/rules/{filename}: line must start with 'before:' or 'after:': {line!r}")
        parts[where.strip()].append(_expand(pattern.strip(), macros))

    def join(pats: list[str]) -> re.Pattern | None:
        return re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None

    return _Rule(join(parts["before"]), join(parts["after"]))


@dataclass(frozen=True)
class _Labeler:
    mention: re.Pattern  # finds the next mention; ``lastindex`` - 1 indexes ``targets``
    targets: tuple[tuple[tuple[int, str], ...], ...]  # per phrase: ((observation, flag), ...)
    terminator: re.Pattern  # finds the first scope terminator in a text
    last_terminator: re.Pattern  # matches up to the last scope terminator in a text
    first_uncertain: _Rule
    negation: _Rule
    uncertain: _Rule
    stable_size: _Rule


def _mention_regex(line: str) -> str:
    """A mention line is a regex matched at a word start; ``*`` at its end allows any
    word ending (``atelecta*``), otherwise the match must end at a word end."""
    if line.endswith("*"):
        return "(?:" + line[:-1] + r")[\w-]*"
    return "(?:" + line + r")(?![\w-])"


@lru_cache(maxsize=1)
def _labeler() -> _Labeler:
    phrase_targets: dict[str, list[tuple[int, str]]] = {}
    sources = [(name, i) for i, name in enumerate(CHEXPERT_OBSERVATIONS) if i != _NO_FINDING]
    for name, obs in sources + [("No Finding", _OTHER)]:
        filename = name.lower().replace(" ", "_") + ".txt"
        for line in _lines(_data_text("mention", filename)):
            flag = line[0] if line[0] in "?~^" else _PLAIN
            phrase = line[len(flag):]
            phrase_targets.setdefault(phrase, []).append((obs, flag))
    for line in _lines(_data_text("mention", "unmention.txt")):
        phrase_targets[line] = []  # hides the words it covers
    # Longer phrases first, so "pleural effusion" beats "effusion" at the same position.
    ordered = sorted(phrase_targets, key=len, reverse=True)
    for p in ordered:
        if re.compile(p).groups:
            raise ValueError(f"cmn/metrics/data/mention: use (?:...) instead of (...) in {p!r}")
    # One alternation behind one word-boundary check. Each branch ends in an empty group
    # so ``lastindex`` names the phrase; branches start with their own first character,
    # which the regex engine checks at a glance (a group in front would defeat that).
    mention = re.compile(r"\b(?:" + "|".join(_mention_regex(p) + "()" for p in ordered) + ")")

    macros = _load_macros()
    terms = "|".join(_lines(_data_text("rules", "terminators.txt")))
    return _Labeler(
        mention=mention,
        targets=tuple(tuple(phrase_targets[p]) for p in ordered),
        terminator=re.compile(rf"\b(?:{terms})\b"),
        last_terminator=re.compile(rf"(?s).*\b(?:{terms})\b"),
        first_uncertain=_load_rule("uncertainty_first.txt", macros),
        negation=_load_rule("negation.txt", macros),
        uncertain=_load_rule("uncertainty.txt", macros),
        stable_size=_load_rule("stable_size.txt", macros),
    )


def _classify(lab: _Labeler, before: str, after: str, flag: str) -> float:
    if lab.first_uncertain.hits(before, after):
        return UNCERTAIN
    if lab.negation.hits(before, after):
        return NEGATIVE
    if flag == _FORCED_UNCERTAIN or lab.uncertain.hits(before, after):
        return UNCERTAIN
    if flag == _NEUTRAL_SIZE and lab.stable_size.hits(before, after):
        return UNCERTAIN
    return POSITIVE


# Aggregation rank per CheXpert: positive beats uncertain beats negative.
_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


def _sentences(text: str):
    """(offset, sentence) pairs of ``text``, split like ``_SENTENCE_SPLIT.split``."""
    pos = 0
    for sep in _SENTENCE_SPLIT.finditer(text):
        yield pos, text[pos:sep.start()]
        pos = sep.end()
    yield pos, text[pos:]


def _mentions(lab: _Labeler, text: str):
    """(start, end, observation index or _OTHER, status) of each classified mention in ``text``
    (lowercased), in order; a linked mention that is negated yields nothing."""
    for offset, sentence in _sentences(text):
        for m in lab.mention.finditer(sentence):
            targets = lab.targets[m.lastindex - 1]
            if not targets:
                continue
            before = sentence[: m.start()]
            cut = lab.last_terminator.match(before)
            if cut:
                before = before[cut.end():]
            after = sentence[m.end():]
            cut = lab.terminator.search(after)
            if cut:
                after = after[: cut.start()]
            for obs, flag in targets:
                status = _classify(lab, before, after, flag)
                if flag == _LINKED:
                    if status == NEGATIVE:
                        continue
                    status = UNCERTAIN
                yield offset + m.start(), offset + m.end(), obs, status


def _label_one(lab: _Labeler, report: str) -> list[float]:
    best: dict[int, float] = {}
    for _, _, obs, status in _mentions(lab, report.lower()):
        old = best.get(obs)
        if old is None or _RANK[status] > _RANK[old]:
            best[obs] = status
    row = [float("nan")] * len(CHEXPERT_OBSERVATIONS)
    finding = False
    for obs, status in best.items():
        if obs != _SUPPORT and status != NEGATIVE:
            finding = True
        if obs != _OTHER:
            row[obs] = status
    if not finding:
        row[_NO_FINDING] = POSITIVE
    return row


def label_reports(reports: Sequence[str]) -> np.ndarray:
    """Label each report for the 14 CheXpert observations.

    Works on raw reports and on cleaned ones ("the heart size is normal . no pleural
    effusion or pneumothorax .").

    Returns:
        float64 array (n, 14) in :data:`CHEXPERT_OBSERVATIONS` order: 1 positive,
        0 negative, -1 uncertain, NaN not mentioned.
    """
    lab = _labeler()
    out = np.full((len(reports), len(CHEXPERT_OBSERVATIONS)), np.nan)  # (n, 14)
    for i, report in enumerate(reports):
        if not isinstance(report, str):
            raise DataError(f"report {i} is {type(report).__name__}, not text")
        out[i] = _label_one(lab, report)
    return out


@dataclass(frozen=True)
class Mention:
    """One phrase the labeler read: ``report.lower()[start:end]``, the observation it names
    and how the labeler classified it (1 positive, 0 negative, -1 uncertain)."""

    start: int
    end: int
    observation: str
    label: float


def find_mentions(report: str) -> list[Mention]:
    """The labeler's mentions of the 14 observations in ``report``, in reading order (what
    :func:`label_reports` aggregates). Offsets index ``report.lower()``, which has the same
    length as ``report`` for ASCII text. Mentions of findings outside the 14 are left out."""
    if not isinstance(report, str):
        raise DataError(f"report is {type(report).__name__}, not text")
    return [Mention(start, end, CHEXPERT_OBSERVATIONS[obs], status)
            for start, end, obs, status in _mentions(_labeler(), report.lower()) if obs != _OTHER]


# ---------------------------------------------------------------------------- metrics


def binarize(labels: np.ndarray, uncertain: str = "negative") -> tuple[np.ndarray, np.ndarray]:
    """Turn 1/0/-1/NaN labels into (positive, valid) boolean arrays of the same shape.

    ``uncertain``: ``"negative"`` (the reference code: -1 and NaN count as negative),
    ``"positive"`` (-1 counts as positive), ``"ignore"`` (-1 entries are left out).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    labels = np.asarray(labels, dtype=np.float64)
    positive = labels == 1
    if uncertain == "positive":
        positive |= labels == -1
    valid = labels != -1 if uncertain == "ignore" else np.ones(labels.shape, dtype=bool)
    return positive, valid


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    # 0/0 counts as 0, like scikit-learn's default used by the reference code.
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return p, r, f


def ce_scores(ref_labels: np.ndarray, pred_labels: np.ndarray, uncertain: str = "negative") -> dict:
    """Clinical-efficacy precision, recall and F1 of predicted labels against reference labels.

    Args:
        ref_labels, pred_labels: float arrays (n, 14) of 1/0/-1/NaN, as from :func:`label_reports`.
        uncertain: how -1 labels count; see :func:`binarize`. With ``"ignore"``, a report is
            left out of an observation when either side is -1 there.

    Returns:
        ``{"precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro",
        "f1_micro", "per_observation": {name: {"precision", "recall", "f1", "support"}}}``.
        Macro is the mean over the 14 observations of per-observation scores (the paper's
        CE); an observation with nothing to count scores 0, as in scikit-learn.
    """
    ref = np.asarray(ref_labels, dtype=np.float64)
    pred = np.asarray(pred_labels, dtype=np.float64)
    if ref.shape != pred.shape or ref.ndim != 2:
        raise DataError(f"reference labels {ref.shape} and predicted labels {pred.shape} must both be (n, 14)")
    ref_pos, ref_ok = binarize(ref, uncertain)
    pred_pos, pred_ok = binarize(pred, uncertain)
    valid = ref_ok & pred_ok  # (n, K)
    tp = (ref_pos & pred_pos & valid).sum(0).astype(float)  # (K,)
    fp = (~ref_pos & pred_pos & valid).sum(0).astype(float)
    fn = (ref_pos & ~pred_pos & valid).sum(0).astype(float)
    names = CHEXPERT_OBSERVATIONS if ref.shape[1] == len(CHEXPERT_OBSERVATIONS) else tuple(map(str, range(ref.shape[1])))
    per = {}
    for k, name in enumerate(names):
        p, r, f = _prf(tp[k], fp[k], fn[k])
        per[name] = {"precision": p, "recall": r, "f1": f, "support": int(tp[k] + fn[k])}
    micro = _prf(tp.sum(), fp.sum(), fn.sum())
    return {
        "precision_macro": float(np.mean([v["precision"] for v in per.values()])),
        "recall_macro": float(np.mean([v["recall"] for v in per.values()])),
        "f1_macro": float(np.mean([v["f1"] for v in per.values()])),
        "precision_micro": micro[0],
        "recall_micro": micro[1],
        "f1_micro": micro[2],
        "per_observation": per,
    }

"""Clinical efficacy (CE): an offline rule-based CheXpert-style labeler and its metrics.

The paper's CE compares CheXpert labels of generated and reference reports over 14
observations. The CheXpert labeler needs NegBio and a constituency parser; we follow its
scheme with regular expressions instead, so labeling runs offline and fast:

0. With ``sections="auto"``, a full report with headings is cut to its FINDINGS and
   IMPRESSION (``data/sections.txt``); text without headings is labeled whole.
1. Split a report into sentences (``. ; : ? !`` and line breaks) and each sentence into
   clauses at scope terminators (``but``, ``however``, ``which``, ``there``...).
2. Find mention phrases (``data/mention/*.txt``); one pass of a combined regex, the
   earliest and then longest phrase wins, and ``unmention.txt`` hides phrases such as
   "pericardial effusion".
3. Classify each mention from the clause text before and after it, in CheXpert's order:
   uncertainty that looks like negation ("cannot be excluded", "no new", "upper limits of
   normal"); then mentions that are no assertion and are dropped ("evaluate for", "rule
   out", "? pneumothorax", "evaluation for X is limited"); then negation ("no", "without",
   "is normal"; "no" covers a whole list: "no effusion or pneumothorax"), and for neutral
   anatomy mentions normal statements over a coordinated subject ("heart size and pulmonary
   vascularity within normal limits"); then uncertainty ("possible", "may represent", "X or
   Y"), and "stable" for neutral size mentions.
4. Aggregate per observation like the CheXpert labeler: any positive gives 1, else any
   uncertain gives -1, else 0; no mention gives NaN. "No Finding" is 1 when nothing but
   support devices is positive or uncertain (``no_finding.txt`` lists other findings
   that also rule it out), otherwise NaN.

Rule files live in ``cmn/metrics/data`` and are documented in their headers; a new phrase
is one line. Differences from the CheXpert labeler are listed in docs/labeler.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

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
# With a "?" in the text: a "?" ends a sentence but stays in it ("pneumothorax?" is a
# question, not a finding), and a "?" before a word ("? pneumothorax") does not end one.
_QUESTION_SPLIT = re.compile(r"[.;:!](?=\s|$)|(?<=\S\?)(?=\s|$)|\n")

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
    ``after`` must match at the start of the clause after it; an ``around`` pair needs both."""

    before: re.Pattern | None
    after: re.Pattern | None
    around: tuple[tuple[re.Pattern, re.Pattern], ...] = ()

    def hits(self, before: str, after: str) -> bool:
        """Empty text (``""``: nothing but spaces) matches no cue, and is not searched."""
        if before and self.before is not None and self.before.search(before):
            return True
        if after and self.after is not None and self.after.match(after):
            return True
        if self.around and before and after:
            return any(b.search(before) and a.match(after) for b, a in self.around)
        return False


def _has_top_level_bar(pattern: str) -> bool:
    """Whether a regex has a ``|`` outside any group or character class."""
    depth, escaped, in_class = 0, False, False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            return True
    return False


_AROUND_SPLIT = " MENTION "
_LEAD = re.compile(r"\\b|\{\w+\}")  # a shared start of rule patterns: \b or a macro


def _load_rule(filename: str, macros: dict[str, str]) -> _Rule:
    where_ = f"cmn/metrics/data/rules/{filename}"
    parts: dict[str, list[str]] = {"before": [], "after": [], "around": []}
    for line in _lines(_data_text("rules", filename)):
        where, sep, pattern = line.partition(":")
        if not sep or where.strip() not in parts:
            raise ValueError(f"{where_}: line must start with 'before:', 'after:' or 'around:': {line!r}")
        if where.strip() == "around" and pattern.count(_AROUND_SPLIT) != 1:
            raise ValueError(f"{where_}: an 'around:' line is '<before> MENTION <after>': {line!r}")
        if _has_top_level_bar(pattern):
            raise ValueError(f"{where_}: one pattern per line; wrap alternatives in (?:...): {line!r}")
        parts[where.strip()].append(pattern.strip())

    def join(pats: list[str]) -> re.Pattern | None:
        # Patterns that start alike (a word boundary, or the same macro such as {gap}) share
        # that start, so the regex engine checks it once rather than once per pattern.
        groups: dict[str, list[str]] = {}
        for pat in pats:
            lead = _LEAD.match(pat)
            head = lead.group() if lead else ""
            groups.setdefault(head, []).append(pat[len(head) :])
        alternatives = [
            _expand(head, macros) + "(?:" + "|".join(f"(?:{_expand(rest, macros)})" for rest in rests) + ")"
            for head, rests in groups.items()
        ]
        return re.compile("|".join(alternatives)) if alternatives else None

    around = tuple(
        (re.compile(_expand(b.strip(), macros)), re.compile(_expand(a.strip(), macros)))
        for b, a in (p.split(_AROUND_SPLIT) for p in parts["around"])
    )
    return _Rule(join(parts["before"]), join(parts["after"]), around)


@dataclass(frozen=True)
class _Labeler:
    mention: re.Pattern  # finds the next mention; ``lastindex`` - 1 indexes ``targets``
    targets: tuple[tuple[tuple[int, str], ...], ...]  # per phrase: ((observation, flag), ...)
    terminator: re.Pattern  # finds the first scope terminator in a text
    last_terminator: re.Pattern  # matches up to the last scope terminator in a text
    first_uncertain: _Rule
    not_asserted: _Rule
    negation: _Rule
    normal_anatomy: _Rule
    uncertain: _Rule
    stable_size: _Rule


_LEADING_GROUP = re.compile(r"\(\?:([^()\[\]]*)\)(\?)?(?![*+{])")


def _literal_starts(phrase: str) -> list[str]:
    """The phrase as alternatives that each start with a plain character where it starts
    with a simple group: ``(?:a|b) c`` gives ``a c``, ``b c``; ``(?:a )?b`` gives ``a b``, ``b``.

    The regex engine skips an alternative whose first character cannot match at a glance,
    which keeps one pass of the combined mention regex fast; a group in front defeats that.
    """
    m = _LEADING_GROUP.match(phrase)
    if not m:
        return [phrase]
    rest = phrase[m.end() :]
    heads = m.group(1).split("|") + ([""] if m.group(2) else [])
    return [alt for head in heads for alt in _literal_starts(head + rest)]


def _mention_regex(line: str) -> str:
    """A mention line is a regex matched at a word start; ``*`` at its end allows any
    word ending (``atelecta*``), otherwise the match must end at a word end."""
    if line.endswith("*"):
        return "(?:" + line[:-1] + r")[\w-]*"
    return "(?:" + line + r")(?![\w-])"


def _mention_alternation(branches: list[tuple[str, tuple]]) -> tuple[re.Pattern, list[int]]:
    """One regex for all mention phrases, and the order in which their empty groups appear.

    One alternation behind one word-boundary check. Each branch ends in an empty group so
    ``lastindex`` names the phrase. Branches that start with the same plain character are
    put under that character (``e(?:ffusion()|dema()...)``): at each position the regex
    engine then checks a few dozen first characters at a glance rather than every phrase.
    A branch that does not start with a plain character comes first, in its own right.
    """
    special: list[int] = []
    by_first: dict[str, list[int]] = {}
    for i, (alt, _) in enumerate(branches):
        plain = alt[:1].isalnum() and alt[1:2] not in ("?", "*", "+", "{") and not _has_top_level_bar(alt)
        (by_first.setdefault(alt[0], []) if plain else special).append(i)
    parts, order = [], []
    for i in special:
        parts.append(_mention_regex(branches[i][0]) + "()")
        order.append(i)
    for first, members in by_first.items():
        parts.append(
            re.escape(first) + "(?:" + "|".join(_mention_regex(branches[i][0][1:]) + "()" for i in members) + ")"
        )
        order.extend(members)
    return re.compile(r"\b(?:" + "|".join(parts) + ")"), order


@lru_cache(maxsize=1)
def _labeler() -> _Labeler:
    phrase_targets: dict[str, list[tuple[int, str]]] = {}
    sources = [(name, i) for i, name in enumerate(CHEXPERT_OBSERVATIONS) if i != _NO_FINDING]
    for name, obs in sources + [("No Finding", _OTHER)]:
        filename = name.lower().replace(" ", "_") + ".txt"
        for line in _lines(_data_text("mention", filename)):
            flag = line[0] if line[0] in "?~^" else _PLAIN
            phrase = line[len(flag) :]
            phrase_targets.setdefault(phrase, []).append((obs, flag))
    for line in _lines(_data_text("mention", "unmention.txt")):
        phrase_targets[line] = []  # hides the words it covers
    for p in phrase_targets:
        if re.compile(p).groups:
            raise ValueError(f"cmn/metrics/data/mention: use (?:...) instead of (...) in {p!r}")
    alternatives: dict[str, list[tuple[int, str]]] = {}
    for p, targets in phrase_targets.items():
        for alt in _literal_starts(p):
            # unmention.txt comes last and hides; mentions that meet add their targets
            alternatives[alt] = alternatives.get(alt, []) + targets if targets else []
    branches = [(alt, tuple(targets)) for alt, targets in alternatives.items()]
    # Longer phrases first, so "pleural effusion" beats "effusion" at the same position.
    branches.sort(key=lambda b: len(b[0]), reverse=True)
    mention, order = _mention_alternation(branches)

    macros = _load_macros()
    terms = "|".join(_lines(_data_text("rules", "terminators.txt")))
    return _Labeler(
        mention=mention,
        targets=tuple(branches[i][1] for i in order),
        terminator=re.compile(rf"\b(?:{terms})\b"),
        last_terminator=re.compile(rf"(?s).*\b(?:{terms})\b"),
        first_uncertain=_load_rule("uncertainty_first.txt", macros),
        not_asserted=_load_rule("not_asserted.txt", macros),
        negation=_load_rule("negation.txt", macros),
        normal_anatomy=_load_rule("normal_anatomy.txt", macros),
        uncertain=_load_rule("uncertainty.txt", macros),
        stable_size=_load_rule("stable_size.txt", macros),
    )


def _classify(lab: _Labeler, before: str, after: str, flag: str) -> float | None:
    """The label of one mention from its clause, or None when it is not asserted."""
    if lab.first_uncertain.hits(before, after):
        return UNCERTAIN
    if lab.not_asserted.hits(before, after):
        return None
    if lab.negation.hits(before, after):
        return NEGATIVE
    if flag == _NEUTRAL_SIZE and lab.normal_anatomy.hits(before, after):
        return NEGATIVE
    if flag == _FORCED_UNCERTAIN or lab.uncertain.hits(before, after):
        return UNCERTAIN
    if flag == _NEUTRAL_SIZE and lab.stable_size.hits(before, after):
        return UNCERTAIN
    return POSITIVE


# Aggregation rank per CheXpert: positive beats uncertain beats negative.
_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


def _sentences(text: str):
    """(offset, sentence) pairs of ``text``, split at sentence ends (a "?" stays with its sentence)."""
    pos = 0
    for sep in (_QUESTION_SPLIT if "?" in text else _SENTENCE_SPLIT).finditer(text):
        yield pos, text[pos : sep.start()]
        pos = sep.end()
    yield pos, text[pos:]


def _mentions(lab: _Labeler, text: str):
    """(start, end, observation index or _OTHER, status, sentence) of each classified mention in
    ``text`` (lowercased), in order; a linked mention that is negated yields nothing."""
    for offset, sentence in _sentences(text):
        for m in lab.mention.finditer(sentence):
            targets = lab.targets[m.lastindex - 1]
            if not targets:
                continue
            before = sentence[: m.start()]
            cut = lab.last_terminator.match(before)
            if cut:
                before = before[cut.end() :]
            after = sentence[m.end() :]
            cut = lab.terminator.search(after)
            if cut:
                after = after[: cut.start()]
            before = "" if before.isspace() else before
            after = "" if after.isspace() else after
            for obs, flag in targets:
                status = _classify(lab, before, after, flag)
                if status is None:
                    continue
                if flag == _LINKED:
                    if status == NEGATIVE:
                        continue
                    status = UNCERTAIN
                yield offset + m.start(), offset + m.end(), obs, status, sentence


def _label_one(lab: _Labeler, report: str) -> list[float]:
    best: dict[int, float] = {}
    for _, _, obs, status, _ in _mentions(lab, report.lower()):
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


SECTION_MODES = ("all", "auto")


@lru_cache(maxsize=1)
def _section_heading() -> tuple[re.Pattern, re.Pattern]:
    """Regexes for the heading names of ``data/sections.txt`` before a colon: the whole text
    from a line or sentence start to the colon in any case, or a name in upper case that
    ends at the colon. The name of the group that matched starts with ``k`` (a kept
    section) or ``s`` (a skipped one)."""
    names: dict[str, list[str]] = {"keep": [], "skip": []}
    for line in _lines(_data_text("sections.txt")):
        kind, sep, name = line.partition(":")
        if not sep or kind.strip() not in names:
            raise ValueError(f"cmn/metrics/data/sections.txt: line must start with 'keep:' or 'skip:': {line!r}")
        names[kind.strip()].append(re.sub(r" +", r"[ \t]+", name.strip()))
    keep, skip = ("|".join(f"(?:{n})" for n in names[k]) for k in ("keep", "skip"))
    any_case = re.compile(rf"[ \t]*(?i:(?P<k1>{keep})|(?P<s1>{skip}))[ \t]*")  # fullmatch
    upper = re.compile(rf"\b(?:(?P<k2>{keep})|(?P<s2>{skip}))[ \t]*$")  # search
    return any_case, upper


_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_HEADING_REACH = 60  # characters before a colon that can hold an upper-case heading


def _headings(report: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each heading, kind "k" (kept) or "s" (skipped)."""
    any_case, upper = _section_heading()
    out: list[tuple[int, int, str]] = []
    colon = report.find(":")
    while colon >= 0:
        line_start = max(report.rfind("\n", 0, colon) + 1, out[-1][1] if out else 0)
        sentence_start = max(line_start, *(report.rfind(c, line_start, colon) + 1 for c in ".;!?"))
        m = any_case.fullmatch(report, sentence_start, colon)
        if m is None and (report[colon - 1 : colon].isupper() or report[colon - 1 : colon] == ")"):
            m = upper.search(report, max(line_start, colon - _HEADING_REACH), colon)
        if m is not None:
            assert m.lastgroup is not None  # both patterns match through one named group
            out.append((m.start(), colon + 1, m.lastgroup[0]))
        colon = report.find(":", colon + 1)
    return out


def report_sections(report: str) -> str:
    """The part of a full report that ``sections="auto"`` labels.

    With a FINDINGS / IMPRESSION heading (``keep`` in ``data/sections.txt``): those sections
    only, each up to the next known heading. With only other headings (INDICATION, HISTORY,
    COMPARISON...): everything except those sections, each of which ends at the next heading
    or blank line. With no heading: the whole text.
    """
    marks = _headings(report)
    if not marks:
        return report
    ends = [start for start, _, _ in marks[1:]] + [len(report)]
    bodies = [(kind, report[end_of_heading:end]) for (_, end_of_heading, kind), end in zip(marks, ends)]
    if any(kind == "k" for kind, _ in bodies):
        return "\n".join(body for kind, body in bodies if kind == "k")
    kept = [report[: marks[0][0]]]
    for _, body in bodies:
        blank = _BLANK_LINE.search(body)
        if blank:
            kept.append(body[blank.end() :])
    return "\n".join(kept)


def label_reports(reports: Sequence[str], sections: str = "all") -> np.ndarray:
    """Label each report for the 14 CheXpert observations.

    Works on raw reports and on cleaned ones ("the heart size is normal . no pleural
    effusion or pneumothorax .").

    Args:
        reports: report texts.
        sections: ``"all"`` labels the whole text (generated and reference findings);
            ``"auto"`` labels only FINDINGS and IMPRESSION of full reports that have
            headings (see :func:`report_sections`); text without headings is labeled whole.

    Returns:
        float64 array (n, 14) in :data:`CHEXPERT_OBSERVATIONS` order: 1 positive,
        0 negative, -1 uncertain, NaN not mentioned.
    """
    if sections not in SECTION_MODES:
        raise ConfigError(f"--sections must be one of {', '.join(SECTION_MODES)}, got {sections!r}")
    lab = _labeler()
    out = np.full((len(reports), len(CHEXPERT_OBSERVATIONS)), np.nan)  # (n, 14)
    for i, report in enumerate(reports):
        if not isinstance(report, str):
            raise DataError(f"report {i} is {type(report).__name__}, not text")
        out[i] = _label_one(lab, report_sections(report) if sections == "auto" else report)
    return out


@dataclass(frozen=True)
class Mention:
    """One phrase the labeler read: ``report.lower()[start:end]``, the observation it names
    and how the labeler classified it (1 positive, 0 negative, -1 uncertain), with the sentence
    of ``report.lower()`` it was read in, split as the labeler splits it."""

    start: int
    end: int
    observation: str
    label: float
    sentence: str = ""


def find_mentions(report: str) -> list[Mention]:
    """The labeler's mentions of the 14 observations in ``report``, in reading order (what
    :func:`label_reports` aggregates). Offsets index ``report.lower()``, which has the same
    length as ``report`` for ASCII text. Mentions of findings outside the 14 are left out."""
    if not isinstance(report, str):
        raise DataError(f"report is {type(report).__name__}, not text")
    return [
        Mention(start, end, CHEXPERT_OBSERVATIONS[obs], status, sentence)
        for start, end, obs, status, sentence in _mentions(_labeler(), report.lower())
        if obs != _OTHER
    ]


def mention_sentence(report: str, mention: Mention) -> str:
    """The sentence of ``report.lower()`` that ``mention`` (from :func:`find_mentions` on
    ``report``) was read in: ``mention.sentence``."""
    return mention.sentence


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
    names = (
        CHEXPERT_OBSERVATIONS if ref.shape[1] == len(CHEXPERT_OBSERVATIONS) else tuple(map(str, range(ref.shape[1])))
    )
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

"""Pure-Python specification of the text core, used only by tests and benches.

It restates, in plain Python, what the reference code (R2GenCMN's report cleaning and
vocabulary) does, and what a straightforward beam search returns. The fast paths in
:mod:`cmn.text` (Rust) must agree with it exactly; nothing else in cmn imports it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Callable, NamedTuple

import numpy as np

# The reference's class `[.,?;*!%^&_+():-\[\]{}]` contains the range ':'..'[', i.e.
# ": ; < = > ? @ A-Z [" -- spelled out here; '-' itself is NOT removed.
_PUNCT = re.compile(r"[.,?;*!%^&_+(){}\]\[:<=>@A-Z]")

# Numbered-list markers, applied after the dataset-specific substitutions.
_LIST_MARKERS = [("1. ", "")] + [(f". {n}. ", ". ") for n in "2345"] + [(f" {n}. ", ". ") for n in "2345"]
_SUBSTITUTIONS = {
    "iu_xray": [("..", ".")] * 3 + _LIST_MARKERS,
    "mimic_cxr": [("\n", " ")] + [("__", "_")] * 7 + [("  ", " ")] * 6 + [("..", ".")] * 8 + _LIST_MARKERS,
}


def _clean_sentence(sentence: str) -> str:
    for quote in "\"/\\'":
        sentence = sentence.replace(quote, "")
    return _PUNCT.sub("", sentence.strip().lower())


def clean_report(text: str, dataset: str) -> str:
    """The reference cleaning of one report (``dataset`` "iu_xray" or "mimic_cxr")."""
    for old, new in _SUBSTITUTIONS[dataset]:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    # The reference filters sentences with `!= []`, which is always true: empty ones stay.
    return " . ".join(_clean_sentence(s) for s in sentences) + " ."


class RefTokenizer:
    """The reference vocabulary: tokens with count >= threshold plus '<unk>', sorted, ids from 1."""

    def __init__(self, reports: Sequence[str], threshold: int, dataset: str):
        self.dataset = dataset
        counts = Counter(tok for r in reports for tok in clean_report(r, dataset).split())
        vocab = sorted([t for t, n in counts.items() if n >= threshold] + ["<unk>"])
        self.token2idx = {t: i + 1 for i, t in enumerate(vocab)}
        self.idx2token = {i: t for t, i in self.token2idx.items()}

    def __len__(self) -> int:
        return len(self.token2idx) + 1

    def encode(self, report: str) -> list[int]:
        unk = self.token2idx["<unk>"]
        return [0] + [self.token2idx.get(t, unk) for t in clean_report(report, self.dataset).split()] + [0]

    def encode_batch(self, reports: Sequence[str], max_len: int) -> np.ndarray:
        out = np.zeros((len(reports), max_len), dtype=np.int64)
        for i, r in enumerate(reports):
            ids = self.encode(r)[:max_len]
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if ids[:1] == [0]:
            ids = ids[1:]
        words = []
        for i in ids:
            if i == 0:
                break
            words.append(self.idx2token[i])
        return " ".join(words)


class RefHypothesis(NamedTuple):
    tokens: list[int]
    score: float


def banned_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``tokens``."""
    if n == 0 or len(tokens) + 1 < n:
        return set()
    prefix = tuple(tokens[len(tokens) + 1 - n :])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


def beam_search_ref(
    logp_fn: Callable[[int, tuple], np.ndarray],
    batch_size: int,
    beam_size: int,
    max_len: int,
    *,
    eos_id: int = 0,
    length_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    n_best: int = 1,
) -> list[list[RefHypothesis]]:
    """Plain beam search over ``logp_fn(item, prefix) -> float32 (V,)`` log-probabilities.

    Per step and item: every (beam, token) candidate scored in float32 as
    cum + logp, sorted by score then flat index; an EOS among the first ``beam_size``
    ends its hypothesis, other EOS are skipped; the first ``beam_size`` other candidates
    are the new beams. Items stop with ``beam_size`` ended hypotheses or at ``max_len``
    tokens (then every beam ends). Ended scores are sum / length**length_penalty, the
    length counting the EOS.
    """

    def final(score: np.float32, length: int) -> float:
        return float(score) if length_penalty == 0.0 else float(score) / (max(length, 1) ** length_penalty)

    results = []
    for item in range(batch_size):
        beams = [((), np.float32(0.0))] + [((), np.float32(-np.inf))] * (beam_size - 1)
        ended: list[RefHypothesis] = []
        for t in range(max_len):
            candidates = []
            for j, (prefix, cum) in enumerate(beams):
                logp = np.array(logp_fn(item, prefix), dtype=np.float32)
                for tok in banned_tokens(prefix, no_repeat_ngram_size):
                    logp[tok] = -np.inf
                vocab = logp.shape[0]
                scores = cum + logp  # float32, like the device
                candidates += [(float(s), j * vocab + v) for v, s in enumerate(scores)]
            candidates.sort(key=lambda c: (-c[0], c[1]))
            new = []
            for rank, (score, flat) in enumerate(candidates):
                j, tok = divmod(flat, vocab)
                prefix = beams[j][0]
                if tok == eos_id:
                    if rank < beam_size and score > -math.inf:
                        ended.append(RefHypothesis(list(prefix), final(np.float32(score), len(prefix) + 1)))
                    continue
                new.append((prefix + (tok,), np.float32(score)))
                if len(new) == beam_size:
                    break
            if t == max_len - 1:
                ended += [RefHypothesis(list(p), final(s, len(p))) for p, s in new if s > -np.inf]
                break
            beams = new
            if len(ended) >= beam_size:
                break
        ended.sort(key=lambda h: -h.score)
        results.append(ended[:n_best])
    return results

"""Natural-language generation metrics, computed the way the paper's code computes them.

The reference code (zhjohnchan/R2GenCMN, ``modules/metrics.py``) scores cleaned reports
with pycocoevalcap: ``gts = {id: [reference]}``, ``res = {id: [prediction]}`` and the
scorers ``Bleu(4)``, ``Meteor()`` and ``Rouge()``. We call the same scorers on the same
dictionaries, so the numbers are pycocoevalcap's numbers, and add ``Cider()`` as an extra.

Differences from the reference, all about robustness, none about the numbers:

* METEOR runs a Java subprocess that takes seconds to start. :class:`NLGScorer` starts it
  once and reuses it for every call (validation every epoch), and stops it in
  :meth:`NLGScorer.close` instead of leaving that to garbage collection.
* When ``java`` is missing, METEOR is reported as NaN with a warning naming ``java``;
  the other metrics are still computed.
* METEOR's line protocol breaks on newlines and on its ``|||`` field separator, and
  pycocoevalcap's tokenizers split on single spaces. Texts are reduced to single-spaced
  lines with :func:`sanitize` first; cleaned reports are unchanged by it.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
import warnings
from collections.abc import Mapping

from cmn.errors import DataError

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

_SPACES = re.compile(r"\s+")


class MeteorUnavailableWarning(UserWarning):
    """METEOR could not be computed (no ``java``, or the METEOR process failed)."""


def sanitize(text: str) -> str:
    """Return ``text`` on one line, single-spaced, without METEOR's ``|||`` separator."""
    return _SPACES.sub(" ", text.replace("|||", " ")).strip()


class _Meteor:
    """One METEOR Java process (pycocoevalcap's jar and protocol) with an explicit close.

    pycocoevalcap's ``Meteor`` only stops its process in ``__del__`` and leaves the pipes
    open; we wrap it so that closing is deterministic and idempotent.
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self._impl = Meteor()
        self._closed = False
        self._lock = threading.Lock()

    def compute_score(self, gts, res) -> float:
        with self._lock:
            if self._closed:
                raise RuntimeError("METEOR scorer used after close()")
            if self._impl.meteor_p.poll() is not None:
                raise RuntimeError(f"METEOR process exited with code {self._impl.meteor_p.returncode}")
            score, _ = self._impl.compute_score(gts, res)
            return float(score)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            proc = self._impl.meteor_p
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
            proc.kill()
            proc.wait()


class NLGScorer:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr over id-keyed reports, reusable across calls.

    Use as a context manager (or call :meth:`close`) so the METEOR process is stopped::

        with NLGScorer() as scorer:
            for epoch in ...:
                scores = scorer(references, predictions)

    Args:
        meteor: compute METEOR (starts one Java process on first use). When ``False``,
            or when ``java`` is not on ``PATH``, ``METEOR`` is NaN.
    """

    def __init__(self, meteor: bool = True) -> None:
        self._want_meteor = meteor
        self._meteor: _Meteor | None = None
        self.meteor_error: str | None = None if meteor else "METEOR disabled"

    def _meteor_scorer(self) -> _Meteor | None:
        if self._meteor is None and self.meteor_error is None:
            if shutil.which("java") is None:
                self.meteor_error = "METEOR needs `java` on PATH (Java 8 or newer); it was not found"
            else:
                try:
                    self._meteor = _Meteor()
                except OSError as exc:  # java present but not runnable
                    self.meteor_error = f"could not start METEOR's Java process: {exc}"
        return self._meteor

    def __call__(self, references: Mapping[str, str], predictions: Mapping[str, str]) -> dict:
        """Score ``predictions`` against ``references`` (same keys, one text each).

        Returns a dict with keys ``BLEU_1``..``BLEU_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``
        (floats; ``METEOR`` is NaN when unavailable, with a :class:`MeteorUnavailableWarning`).
        """
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = _as_coco(references, predictions)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["METEOR"] = self._score_meteor(gts, res)
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return scores

    def _score_meteor(self, gts, res) -> float:
        meteor = self._meteor_scorer() if self._want_meteor else None
        if meteor is not None:
            try:
                return meteor.compute_score(gts, res)
            except (OSError, ValueError, RuntimeError) as exc:
                self.meteor_error = f"METEOR failed: {exc}"
                meteor.close()
                self._meteor = None
        if self._want_meteor:
            warnings.warn(f"METEOR not computed: {self.meteor_error}", MeteorUnavailableWarning, stacklevel=3)
        return math.nan

    def close(self) -> None:
        """Stop the METEOR process, if one was started. Safe to call twice."""
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> NLGScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _as_coco(references: Mapping[str, str], predictions: Mapping[str, str]):
    """Check the two mappings and build pycocoevalcap's ``{id: [text]}`` dictionaries."""
    if not predictions:
        raise DataError("no predictions to score (the predictions are empty)")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} prediction id(s) without a reference (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} reference id(s) without a prediction (e.g. {extra[0]!r})")
        raise DataError("predictions and references do not have the same ids: " + "; ".join(parts))
    keys = sorted(predictions)
    gts = {k: [sanitize(references[k])] for k in keys}
    res = {k: [sanitize(predictions[k])] for k in keys}
    return gts, res


def nlg_scores(references: Mapping[str, str], predictions: Mapping[str, str], *, meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr of ``predictions`` against ``references``.

    Both map an id to one (cleaned) report. Starts and stops one METEOR process; for
    repeated scoring keep an :class:`NLGScorer` open instead.
    """
    with NLGScorer(meteor=meteor) as scorer:
        return scorer(references, predictions)

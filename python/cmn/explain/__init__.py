"""Explanations of generated reports: word-by-word image maps and the shared memory.

``explain_study(model, images) -> Explanation`` gives the arrays; :mod:`cmn.explain.html`
writes them as one self-contained page, :mod:`cmn.explain.figures` as PNG files, and
``cmn-explain`` (:mod:`cmn.explain.cli`) does both from the command line.
"""

from cmn.explain.core import Entity, Explanation, entities_of, explain_batch, explain_study, memory_overlap

__all__ = ["Entity", "Explanation", "entities_of", "explain_batch", "explain_study", "memory_overlap"]

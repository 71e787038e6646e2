"""Type stub of the Rust extension ``cmn._native`` (use it through :mod:`cmn.text`).

Every size and count is checked before anything is allocated; one out of range (also a
negative one, or one beyond int64) is a ``ValueError`` naming the argument and its
limits, never a panic or an abort: ``Tokenizer.encode_batch`` ``max_len`` 0 to 2**20;
``BeamSearch`` ``batch_size`` and ``beam_size`` 1 to 2**20 with their product at most
2**20 rows, ``n_best`` 1 to ``beam_size``, ``max_len`` 1 and ``no_repeat_ngram_size`` 0 to
2**63-1, ``eos_id`` 0 to 2**63-1 (and below ``vocab_size`` at each step); ``step``'s
``vocab_size`` 1 to (2**63-1) // ``beam_size``. Batch calls refuse a single ``str`` or
``bytes`` (``TypeError``); arrays of another dtype or rank are a ``TypeError`` too.
"""

from collections.abc import Sequence
from typing import Optional, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BeamSearch",
    "TextInputError",
    "Tokenizer",
    "_py_lower",
    "clean_report",
    "clean_reports",
    "memory_query_backward",
    "memory_query_forward",
    "version",
]

_Text = Union[str, bytes]

class TextInputError(ValueError):
    """Input the text core cannot use (bad argument, undecodable text, malformed tokenizer.json)."""

def version() -> str: ...
def clean_report(text: _Text, dataset: str) -> str: ...
def clean_reports(texts: Sequence[_Text], dataset: str) -> list[str]: ...
def _py_lower(text: str) -> str: ...

# Fused CPU memory query (used by cmn.ops._cpu). Arrays are C-contiguous, float32 or
# float64 (one type per call), idx int64; q (G, R, d), k, v (G, N, d), mask, idx, probs,
# d_weights (G, R, K). Outputs are written in place; the GIL is released while they run
# on ``threads`` threads. Bad shapes or indices raise ValueError.
def memory_query_forward(
    q: npt.NDArray[np.floating],
    k: npt.NDArray[np.floating],
    v: npt.NDArray[np.floating],
    mask: Optional[npt.NDArray[np.floating]],
    out: npt.NDArray[np.floating],
    idx: npt.NDArray[np.int64],
    probs: npt.NDArray[np.floating],
    threads: int,
) -> None: ...
def memory_query_backward(
    q: npt.NDArray[np.floating],
    k: npt.NDArray[np.floating],
    v: npt.NDArray[np.floating],
    mask: Optional[npt.NDArray[np.floating]],
    idx: npt.NDArray[np.int64],
    probs: npt.NDArray[np.floating],
    d_out: npt.NDArray[np.floating],
    d_weights: Optional[npt.NDArray[np.floating]],
    dq: npt.NDArray[np.floating],
    dk: npt.NDArray[np.floating],
    dv: npt.NDArray[np.floating],
    threads: int,
) -> None: ...

@final
class Tokenizer:
    @staticmethod
    def build(reports: Sequence[_Text], threshold: int, dataset: str) -> Tokenizer: ...
    @staticmethod
    def from_str(text: str, dataset: Optional[str] = None) -> Tokenizer: ...
    def to_str(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def unk_id(self) -> int: ...
    def __len__(self) -> int: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]:
        """``None`` for any int that is not an id, however large."""
    def encode(self, report: _Text) -> list[int]: ...
    def encode_batch(self, reports: Sequence[_Text], max_len: int) -> npt.NDArray[np.int64]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_batch(self, ids: npt.NDArray[np.int64]) -> list[str]: ...

@final
class BeamSearch:
    """Beam-search bookkeeping, one object per search; rows are item-major, ``beam_size``
    per unfinished item. Per step the caller masks :meth:`banned` pairs in its (R, V)
    log-probs, adds :meth:`cum_scores` row-wise, views it as ``(R // beam_size,
    beam_size * V)``, takes the top ``k >= 2 * beam_size`` and passes scores (float32)
    and flat indices (int64) to :meth:`step`, which returns ``(tokens, reorder,
    cum_scores)`` for the surviving rows (finished items are dropped). When :attr:`done`,
    :meth:`finalize` gives per item the ``n_best`` ``(tokens, score)`` best first.
    Log-probabilities must be <= 0 (early stopping relies on it)."""

    # Defaults: eos_id=0, no_repeat_ngram_size=0, n_best=1. They are written ``...`` here
    # because the runtime signature shows them so (PyO3 cannot render them), and stubtest
    # compares the two.
    def __new__(
        cls,
        batch_size: int,
        beam_size: int,
        max_len: int,
        *,
        eos_id: int = ...,
        length_penalty: float = 0.0,
        no_repeat_ngram_size: int = ...,
        n_best: int = ...,
    ) -> BeamSearch: ...
    @property
    def done(self) -> bool: ...
    @property
    def num_rows(self) -> int: ...
    def cum_scores(self) -> npt.NDArray[np.float32]: ...
    def banned(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def step(
        self, scores: npt.NDArray[np.float32], indices: npt.NDArray[np.int64], vocab_size: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def finalize(self) -> list[list[tuple[list[int], float]]]: ...

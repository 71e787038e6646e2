"""Report cleaning, vocabulary and tokenization (Rust-backed, ``cmn._native``).

Cleaning reproduces the reference code's ``clean_report_iu_xray`` /
``clean_report_mimic_cxr`` byte for byte, quirks included, so scores stay comparable
with published numbers; :mod:`cmn.text_ref` is the plain-Python specification the
tests hold it to. Ids follow the reference: sorted tokens numbered from 1, ``<unk>``
a real id, 0 = BOS = EOS = padding.

Input text is ``str`` or UTF-8 ``bytes``. Text that is not valid Unicode (a ``str``
holding a lone surrogate such as ``"\\udcff"``, or bytes that are not UTF-8) raises
:class:`cmn.errors.DataError` naming the problem; nothing is replaced silently. A batch
call given one ``str``/``bytes`` instead of a list of reports, a float where an int
belongs, or an id array of another dtype is a ``TypeError``, never a silent reading;
a size out of range is a ``ValueError`` naming the argument and its limit (the native
layer checks every size before it allocates, see ``_native.pyi``).

Unicode. Lowercasing follows the Unicode tables of the RUNNING interpreter, as the
reference does when run on it (Python 3.9/3.10: Unicode 13.0, 3.11: 14.0, 3.12: 15.0,
3.13: 15.1): the first time text that is not ASCII is cleaned, the native layer asks
this interpreter's ``str.lower`` for every character's lowercase and for its part in
the final-sigma rule (cased, case-ignorable or neither), a fraction of a second once
per process, and uses Rust's tables only where they agree. ``str.isspace`` is checked the
same way. So ``clean_report(t, ds) == cmn.text_ref.clean_report(t, ds)`` on every
supported Python, for all characters, instead of the answer of one pinned version.
ASCII text never needs the table.

Batch calls (:func:`clean_reports`, :meth:`Tokenizer.build`,
:meth:`Tokenizer.encode_batch`) release the GIL and use every core.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import numpy as np

from cmn import _native
from cmn.errors import DataError
from cmn.fsutil import write_atomic

#: Beam-search bookkeeping driven by :func:`cmn.decode.beam_search`; see ``_native.pyi``.
BeamSearch = _native.BeamSearch

Text = Union[str, bytes]
DATASETS = ("iu_xray", "mimic_cxr")


def _data_errors(fn):
    """Re-raise the native layer's input errors as DataError with the same message."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _native.TextInputError as e:
            raise DataError(str(e)) from None

    wrapped.__name__, wrapped.__doc__, wrapped.__qualname__ = fn.__name__, fn.__doc__, fn.__qualname__
    return wrapped


def _as_list(items: Iterable[Text], name: str) -> list:
    # One report is iterable too (by character or byte): refuse it rather than clean
    # each character as a report.
    if isinstance(items, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a list of reports, not a single {type(items).__name__}: wrap it in a list")
    # The native side holds its own references to the items, so a list is passed as is.
    return items if type(items) is list else list(items)


@_data_errors
def clean_report(text: Text, dataset: str) -> str:
    """One report cleaned with the rules of ``dataset`` ("iu_xray" or "mimic_cxr")."""
    return _native.clean_report(text, dataset)


@_data_errors
def clean_reports(texts: Iterable[Text], dataset: str) -> list[str]:
    """:func:`clean_report` of each text, in parallel and without the GIL."""
    return _native.clean_reports(_as_list(texts, "texts"), dataset)


def _as_ids(ids) -> list[int]:
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError(f"ids must be a sequence of ints, not {type(ids).__name__}")
    if hasattr(ids, "detach"):  # torch tensor, any device
        ids = ids.detach().cpu()
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    # operator.index, not int(): a float id is an error, not truncated.
    return [operator.index(i) for i in ids]


class Tokenizer:
    """Word-level tokenizer with the reference's vocabulary and ids.

    ``len(tok)`` counts every id including 0, i.e. it is the model's output size.
    ``tok.dataset`` names the cleaning rule applied to raw reports by every encode call.
    The file form is a ``tokenizer.json`` of the Hugging Face ``tokenizers`` library:
    ``tokenizers.Tokenizer.from_file(p).encode(clean_report(r, ds)).ids == tok.encode(r)``
    (WordLevel model, id 0 = special token ``<pad>`` added at both ends, whitespace split
    like ``str.split()``; the rule is stored as ``model.cmn_dataset``).
    """

    __slots__ = ("_core",)

    def __init__(self, core: _native.Tokenizer):
        self._core = core

    @classmethod
    @_data_errors
    def build(cls, reports: Iterable[Text], threshold: int, dataset: str) -> Tokenizer:
        """Vocabulary of the RAW training ``reports`` (cleaned here): tokens seen at least
        ``threshold`` times, plus ``<unk>``."""
        return cls(_native.Tokenizer.build(_as_list(reports, "reports"), threshold, dataset))

    @classmethod
    @_data_errors
    def from_str(cls, text: str, dataset: Optional[str] = None) -> Tokenizer:
        """Parse a ``tokenizer.json`` document; ``dataset`` supplies or overrides the rule."""
        return cls(_native.Tokenizer.from_str(text, dataset))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], dataset: Optional[str] = None) -> Tokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{os.fspath(path)}: cannot read tokenizer ({e})") from None
        try:
            return cls.from_str(text, dataset)
        except DataError as e:
            raise DataError(f"{os.fspath(path)}: {e}") from None

    def to_str(self) -> str:
        """The ``tokenizer.json`` document as a string."""
        return self._core.to_str()

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``tokenizer.json`` to ``path`` (atomically)."""
        write_atomic(path, self.to_str())

    @property
    def dataset(self) -> str:
        return self._core.dataset

    @property
    def unk_id(self) -> int:
        return self._core.unk_id

    def __len__(self) -> int:
        return len(self._core)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._core.token_to_id(token)

    def id_to_token(self, id: int) -> Optional[str]:
        return self._core.id_to_token(operator.index(id))

    @_data_errors
    def encode(self, report: Text) -> list[int]:
        """Clean and encode: ``[0] + ids + [0]``, not truncated (like the reference)."""
        return self._core.encode(report)

    @_data_errors
    def encode_batch(self, reports: Iterable[Text], max_len: int) -> np.ndarray:
        """int64 ``(n, max_len)``: row i is ``encode(reports[i])[:max_len]`` then 0-padded.
        ``max_len`` from 0 to 2**20 (ValueError otherwise)."""
        return self._core.encode_batch(_as_list(reports, "reports"), max_len)

    @_data_errors
    def decode(self, ids) -> str:
        """Tokens joined by spaces; a leading 0 (BOS) is skipped and the next 0 ends the text.
        ``ids``: list, numpy array or tensor of ints. An unknown id raises DataError."""
        return self._core.decode(_as_ids(ids))

    @_data_errors
    def decode_batch(self, ids: Union[np.ndarray, Sequence[Sequence[int]]]) -> list[str]:
        """:meth:`decode` of each row of an ``(n, L)`` array / tensor, or of each list."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.ndim != 2:
                raise ValueError(f"decode_batch expects a 2-D array, got shape {ids.shape}")
            if ids.dtype.kind not in "iu":
                raise TypeError(f"decode_batch expects integer ids, got dtype {ids.dtype}")
            return self._core.decode_batch(np.ascontiguousarray(ids, dtype=np.int64))
        if isinstance(ids, (str, bytes, bytearray)):
            raise TypeError(f"ids must be rows of ints, not {type(ids).__name__}")
        return [self._core.decode(_as_ids(row)) for row in ids]

    def __getstate__(self) -> str:
        return self.to_str()

    @_data_errors
    def __setstate__(self, state: str) -> None:
        self._core = _native.Tokenizer.from_str(state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tokenizer(dataset={self.dataset!r}, size={len(self)})"


__all__ = ["DATASETS", "BeamSearch", "Tokenizer", "clean_report", "clean_reports"]

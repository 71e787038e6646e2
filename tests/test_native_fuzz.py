"""Fuzz tests of every entry point of the Rust text core (``cmn._native``), from Python.

Each call gets random, adversarial or extreme input (random Unicode, random bytes,
random JSON, sizes from 0 to beyond int64, arrays of any dtype and shape) and must
either give the reference's answer or raise an ordinary exception of the documented
kind (``DataError``/``TextInputError`` for bad data, ``ValueError`` naming the argument
for a size out of range, ``TypeError`` for the wrong kind of argument). A panic
(pyo3's ``PanicException``, a ``BaseException``) or an abort fails the run.

CI runs a modest number of examples per target. A longer local campaign (the number is
per target)::

    CMN_FUZZ_EXAMPLES=20000 PYTHONPATH=python python -m pytest tests/test_native_fuzz.py -q -p no:cacheprovider
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmn import _native
from cmn.errors import DataError
from cmn.text import Tokenizer, clean_report, clean_reports
from cmn.text_ref import RefTokenizer
from cmn.text_ref import clean_report as ref_clean

EXAMPLES = int(os.environ.get("CMN_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

DATASETS = ("iu_xray", "mimic_cxr")
# Sizes at and past every limit: 0, 1, the int32/uint32 edges, 2**40, the int64 edges,
# beyond int64, negative.
EXTREMES = [
    0,
    1,
    2,
    3,
    2**20,
    2**20 + 1,
    2**31 - 1,
    2**31,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    2**100,
    -1,
    -2,
    -(2**31),
    -(2**63),
    -(2**63) - 1,
    -(2**64),
]
sizes = st.one_of(st.integers(-3, 12), st.sampled_from(EXTREMES), st.integers())

any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)
surrogate_text = st.text(st.characters(), max_size=40)  # may hold lone surrogates
word = st.sampled_from(["the", "lungs", "are", "clear", "no", "effusion", "ΣΟΦΟΣ", "é", "1.", ".", "___", "\x1c", "\n"])
report = st.one_of(any_text, st.lists(word, max_size=30).map(" ".join), st.binary(max_size=60))


def clean_or_error(text, dataset):
    """What the reference says about ``text``: its cleaning, or the DataError it must raise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return DataError
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return DataError
    return ref_clean(text, dataset)


# -- extreme sizes: every size argument of every entry point ----------------------------

# (call with {v}, the argument it sizes, lowest and highest accepted value); None where
# every int is accepted (an id that is not in the vocabulary, a threshold).
SIZE_PROBES = [
    ("N.BeamSearch({v}, 1, 1)", "batch_size", 1, 2**20),
    ("N.BeamSearch(1, {v}, 1)", "beam_size", 1, 2**20),
    ("N.BeamSearch({v}, {v}, 1)", "batch_size", 1, 2**10),
    ("N.BeamSearch(1, 1, {v})", "max_len", 1, 2**63 - 1),
    ("N.BeamSearch(1, 1, 1, eos_id={v})", "eos_id", 0, 2**63 - 1),
    ("N.BeamSearch(1, 1, 1, no_repeat_ngram_size={v})", "no_repeat_ngram_size", 0, 2**63 - 1),
    ("N.BeamSearch(1, 2**20, 1, n_best={v})", "n_best", 1, 2**20),
    ("stepped({v})", "vocab_size", 1, (2**63 - 1) // 2),
    ("tok.encode_batch(['a b c'], {v})", "max_len", 0, 2**20),
    ("tok.encode_batch(['a'] * 3, {v})", "max_len", 0, 2**20),
    ("N.Tokenizer.build(['a b'], {v}, 'iu_xray')", None, None, None),
    ("tok.id_to_token({v})", None, None, None),
    ("tok.decode([0, {v}])", "token id", 0, 5),
    ("tok.decode_batch(np.array([[{v}]]))", "id", 0, 5),
    ("N.Tokenizer.from_str(vocab_json({v}))", "id", 2, 2),
]

_PROBE_RUNNER = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    # A size that slipped through must fail fast here, not eat the machine.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    from cmn import _native as N
    tok = N.Tokenizer.build(["a b c", "a b"], 1, "iu_xray")
    def stepped(vocab):
        return N.BeamSearch(1, 2, 5).step(np.zeros((1, 4), np.float32), np.arange(4)[None], vocab)
    def vocab_json(i):
        vocab = {"<pad>": 0, "<unk>": 1, "x": i}
        return json.dumps({"model": {"type": "WordLevel", "unk_token": "<unk>", "cmn_dataset": "iu_xray", "vocab": vocab}})
    for call in json.loads(sys.argv[1]):
        try:
            eval(call)
            outcome = ["ok", ""]
        except BaseException as e:
            outcome = [type(e).__name__, str(e)]
        print(json.dumps([call] + outcome), flush=True)
""")


def test_extreme_sizes_are_errors_naming_the_argument_never_panics_or_aborts():
    calls = [(template.format(v=v), name, lo, hi, v) for template, name, lo, hi in SIZE_PROBES for v in EXTREMES]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_RUNNER, json.dumps([c[0] for c in calls])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    last = results[-1][0] if results else "the first probe"
    assert proc.returncode == 0, f"probe process died (rc {proc.returncode}) after {last}: {proc.stderr[-2000:]}"
    assert len(results) == len(calls)
    problems = []
    for (call, name, lo, hi, v), (_, outcome, message) in zip(calls, results):
        if outcome not in ("ok", "ValueError", "TextInputError", "TypeError"):
            problems.append((call, outcome, message))  # a panic, an anonymous OverflowError, ...
        elif name is not None and not lo <= v <= hi:
            # out of range: an error that names the argument
            if outcome == "ok" or name not in message:
                problems.append((call, outcome, message))
    assert not problems, "\n".join(map(str, problems))


# -- cleaning --------------------------------------------------------------------------


@fuzz
@given(text=st.one_of(report, surrogate_text), dataset=st.sampled_from(DATASETS))
def test_fuzz_clean_report(text, dataset):
    want = clean_or_error(text, dataset)
    if want is DataError:
        with pytest.raises(DataError):
            clean_report(text, dataset)
    else:
        assert clean_report(text, dataset) == want


@fuzz
@given(
    texts=st.lists(st.one_of(report, surrogate_text, st.integers(), st.none()), max_size=8),
    dataset=st.sampled_from(DATASETS),
)
def test_fuzz_clean_reports(texts, dataset):
    wants = [DataError if not isinstance(t, (str, bytes)) else clean_or_error(t, dataset) for t in texts]
    if DataError in wants:
        with pytest.raises(DataError, match=f"report {wants.index(DataError)} "):
            clean_reports(texts, dataset)
    else:
        assert clean_reports(texts, dataset) == wants


@fuzz
@given(text=any_text, dataset=any_text)
def test_fuzz_dataset_names(text, dataset):
    if dataset in DATASETS:
        assert clean_report(text, dataset) == ref_clean(text, dataset)
    else:
        with pytest.raises(DataError, match="unknown dataset"):
            clean_report(text, dataset)


@fuzz
@given(text=any_text)
def test_fuzz_py_lower(text):
    assert _native._py_lower(text) == text.lower()


# -- tokenizer -------------------------------------------------------------------------

_CORPUS = ["The lungs are clear.", "No effusion. ΣΟΦΟΣ é", "1. Heart normal. 2. Lungs clear.", "a\x1cb ___ c"] * 3


@fuzz
@given(
    reports=st.lists(report, max_size=12),
    threshold=sizes,
    dataset=st.sampled_from(DATASETS),
    max_len=sizes,
    probes=st.lists(report, max_size=6),
)
def test_fuzz_build_encode_encode_batch(reports, threshold, dataset, max_len, probes):
    reports = [r for r in reports if clean_or_error(r, dataset) is not DataError] + _CORPUS
    tok = Tokenizer.build(reports, threshold, dataset)
    ref = RefTokenizer([r.decode() if isinstance(r, bytes) else r for r in reports], threshold, dataset)
    assert len(tok) == len(ref)
    assert {tok.id_to_token(i): i for i in range(1, len(tok))} == ref.token2idx
    probes = [p for p in probes if clean_or_error(p, dataset) is not DataError]
    texts = [p.decode() if isinstance(p, bytes) else p for p in probes]
    for p, t in zip(probes, texts):
        assert tok.encode(p) == ref.encode(t)
    if 0 <= max_len <= 2**20:
        got = tok.encode_batch(probes, max_len)
        assert got.shape == (len(probes), max_len) and got.dtype == np.int64
        np.testing.assert_array_equal(got, ref.encode_batch(texts, max_len))
    else:
        with pytest.raises(ValueError, match="max_len must be an integer from 0 to 1048576"):
            tok.encode_batch(probes, max_len)


_TOK = Tokenizer.build(_CORPUS, 1, "iu_xray")
_REF = RefTokenizer(_CORPUS, 1, "iu_xray")
ids = st.one_of(st.integers(0, len(_TOK) + 2), st.sampled_from(EXTREMES), st.integers())


@fuzz
@given(seq=st.lists(ids, max_size=12))
def test_fuzz_decode(seq):
    body = seq[1:] if seq[:1] == [0] else seq
    body = body[: body.index(0)] if 0 in body else body
    if all(0 < i < len(_TOK) for i in body):
        assert _TOK.decode(seq) == _REF.decode(seq)
    else:
        with pytest.raises(DataError, match="is outside the vocabulary"):
            _TOK.decode(seq)


@fuzz
@given(
    rows=st.integers(0, 5),
    cols=st.integers(0, 6),
    dtype=st.sampled_from(["int64", "int32", "uint8", "int8"]),
    data=st.data(),
)
def test_fuzz_decode_batch(rows, cols, dtype, data):
    info = np.iinfo(dtype)
    values = data.draw(
        st.lists(
            st.integers(max(info.min, -(2**63)), min(info.max, 2**63 - 1)), min_size=rows * cols, max_size=rows * cols
        )
    )
    array = np.array(values, dtype=dtype).reshape(rows, cols)
    try:
        want = [_TOK.decode(list(row)) for row in array]
    except DataError:
        with pytest.raises(DataError, match="is outside the vocabulary"):
            _TOK.decode_batch(array)
    else:
        assert _TOK.decode_batch(array) == want
        # rows that are not contiguous, straight to the native call
        assert _TOK._core.decode_batch(np.asfortranarray(array.astype(np.int64))) == want


@fuzz
@given(
    arg=st.one_of(st.floats(), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)),
    shape=st.sampled_from([(3,), (1, 1, 1), (2, 2)]),
    dtype=st.sampled_from(["float32", "float64", "bool", "object"]),
)
def test_fuzz_wrong_kinds_of_ids(arg, shape, dtype):
    with pytest.raises(TypeError):
        _TOK._core.decode_batch(np.zeros(shape, dtype=dtype))
    if not isinstance(arg, list):
        with pytest.raises(TypeError):
            _TOK._core.id_to_token(arg)
        with pytest.raises(TypeError):
            _TOK._core.decode([arg])


@fuzz
@given(token=surrogate_text, id_=ids)
def test_fuzz_token_lookups(token, id_):
    found = _TOK.token_to_id(token)
    assert found is None or _TOK.id_to_token(found) == token
    name = _TOK.id_to_token(id_)
    assert (name is not None) == (0 <= id_ < len(_TOK))
    if name is not None and id_ > 0:
        assert _TOK.token_to_id(name) == id_


tokens = st.one_of(st.sampled_from(["<pad>", "<unk>", "", "a", "a b", "x\x1c"]), st.text(max_size=6))
vocab_docs = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {
                "type": st.sampled_from(["WordLevel", "BPE"]),
                "unk_token": st.sampled_from(["<unk>", "<UNK>"]),
                "cmn_dataset": st.sampled_from([*DATASETS, "chexpert"]),
                "vocab": st.dictionaries(
                    tokens, st.one_of(st.integers(-2, 8), st.sampled_from(EXTREMES), st.floats()), max_size=8
                ),
            }
        )
    }
).map(json.dumps)


@fuzz
@given(
    doc=st.one_of(vocab_docs, surrogate_text, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
    dataset=st.sampled_from([None, *DATASETS]),
)
def test_fuzz_from_str(doc, dataset):
    try:
        tok = Tokenizer.from_str(doc, dataset)
    except DataError:
        return
    # accepted: id 0 is <pad>, ids are dense, and the file it writes reads back the same
    assert tok.id_to_token(0) == "<pad>" and tok.token_to_id("<unk>") == tok.unk_id
    names = [tok.id_to_token(i) for i in range(len(tok))]
    assert len(set(names)) == len(names) and all(names)
    assert Tokenizer.from_str(tok.to_str()) == tok


# -- beam search -----------------------------------------------------------------------

arrays = st.tuples(st.sampled_from(["float32", "float64", "int64", "int32"]), st.integers(0, 3), st.integers(0, 9))


@fuzz
@given(
    batch=sizes,
    beam=st.one_of(st.integers(1, 4), sizes),
    max_len=sizes,
    eos=sizes,
    ngram=sizes,
    n_best=sizes,
    penalty=st.one_of(st.just(0.0), st.floats()),
    data=st.data(),
)
def test_fuzz_beam_search(batch, beam, max_len, eos, ngram, n_best, penalty, data):
    try:
        bs = _native.BeamSearch(
            batch, beam, max_len, eos_id=eos, length_penalty=penalty, no_repeat_ngram_size=ngram, n_best=n_best
        )
    except ValueError as e:
        assert "must be" in str(e)
        return
    assert 1 <= batch * beam <= 2**20 and 1 <= n_best <= beam and max_len >= 1 and eos >= 0
    if batch * beam > 64:
        return  # constructed and checked; driving it is for small searches
    vocab = data.draw(st.integers(1, 12), label="vocab")
    for _ in range(data.draw(st.integers(0, 12), label="steps")):
        if bs.done:
            break
        rows = bs.num_rows
        assert bs.cum_scores().shape == (rows,)
        banned_rows, banned_tokens = bs.banned()
        assert banned_rows.shape == banned_tokens.shape and (banned_rows < rows).all()
        if data.draw(st.booleans(), label="malformed"):
            dtype, n, k = data.draw(arrays, label="array")
            scores = np.full((n, k), data.draw(st.sampled_from([0, -1, 1, 2**40]))).astype(dtype)
            indices = np.full((n, k), data.draw(st.sampled_from([0, 1, -1, 2**40, 2**63 - 1])), "int64")
            try:
                out = bs.step(scores, indices, data.draw(sizes, label="vocab_size"))
            except (ValueError, TypeError):
                continue
            assert all(a.shape == (bs.num_rows,) for a in out)
            continue
        logp = np.log(
            np.array(
                data.draw(st.lists(st.floats(0.01, 1.0), min_size=vocab, max_size=vocab), label="probs"), np.float32
            )
            / vocab
        )
        total = (logp[None, :] + bs.cum_scores()[:, None]).reshape(rows // beam, beam * vocab)
        k = min(2 * beam, beam * vocab)
        order = np.argsort(-total, axis=1, kind="stable")[:, :k]
        try:
            tokens, reorder, cum = bs.step(np.take_along_axis(total, order, 1), order.astype(np.int64), vocab)
        except ValueError as e:
            assert "eos_id" in str(e) or "non-EOS candidates" in str(e)
            return
        assert tokens.shape == reorder.shape == cum.shape == (bs.num_rows,)
        assert ((tokens >= 0) & (tokens < vocab)).all() and ((reorder >= 0) & (reorder < rows)).all()
    if bs.done:
        result = bs.finalize()
        assert len(result) == batch and all(len(item) <= n_best for item in result)
    else:
        with pytest.raises(ValueError, match="still searching"):
            bs.finalize()

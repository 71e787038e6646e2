"""Vocabulary and tokenization: reference ids, truncation, decoding, tokenizer.json."""

import json
import pickle

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmn.errors import DataError
from cmn.text import Tokenizer, clean_report
from cmn.text_ref import RefTokenizer

SENTENCES = [
    "The lungs are clear.",
    "No pleural effusion or pneumothorax.",
    "Heart size is normal.",
    "1. Mild cardiomegaly. 2. No focal consolidation.",
    "Dr. ___ was notified at ___.",
    "Opacité in the left base; ? atelectasis.",
    "Stable (unchanged) since __/__/____.",
    "Pacemaker leads terminate in the right atrium and ventricle.",
    "ΟΔΟΣ\x1cnormal",
]


def corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(SENTENCES, size=rng.integers(1, 6))) for _ in range(n)]


@pytest.mark.parametrize("dataset", ["iu_xray", "mimic_cxr"])
@pytest.mark.parametrize("threshold", [0, 1, 3, 10_000])
def test_ids_match_reference(dataset, threshold):
    reports = corpus(200)
    tok, ref = Tokenizer.build(reports, threshold, dataset), RefTokenizer(reports, threshold, dataset)
    assert len(tok) == len(ref)
    assert {tok.id_to_token(i): i for i in range(1, len(tok))} == ref.token2idx
    assert tok.id_to_token(0) == "<pad>" and tok.token_to_id("<unk>") == ref.token2idx["<unk>"]
    assert tok.dataset == dataset
    for r in corpus(50, seed=1) + ["", "unseen words here", "\n"]:
        assert tok.encode(r) == ref.encode(r)


def test_encode_batch_truncates_then_pads_like_the_reference():
    reports = corpus(64)
    tok, ref = Tokenizer.build(reports, 2, "mimic_cxr"), RefTokenizer(reports, 2, "mimic_cxr")
    for max_len in (0, 1, 2, 7, 60, 200):
        got = tok.encode_batch(reports, max_len)
        assert got.dtype == np.int64 and got.shape == (64, max_len)
        np.testing.assert_array_equal(got, ref.encode_batch(reports, max_len))
    assert tok.encode_batch([], 5).shape == (0, 5)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(reports, -1)


def test_decode_skips_bos_and_stops_at_first_zero():
    reports = corpus(50)
    tok, ref = Tokenizer.build(reports, 1, "iu_xray"), RefTokenizer(reports, 1, "iu_xray")
    ids = tok.encode(reports[0])
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids) == " ".join(clean_report(reports[0], "iu_xray").split())
    assert tok.decode(ids[1:] + [5, 6]) == tok.decode(ids)
    assert tok.decode([0, 0, 5]) == ""
    batch = tok.encode_batch(reports, 40)
    assert tok.decode_batch(batch) == [ref.decode(row) for row in batch]
    assert tok.decode_batch([list(row) for row in batch[:3]]) == tok.decode_batch(batch[:3])
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode_batch(torch.from_numpy(batch)) == tok.decode_batch(batch)


def test_decode_of_unknown_id_is_a_data_error():
    tok = Tokenizer.build(corpus(10), 1, "iu_xray")
    with pytest.raises(DataError, match=f"token id {len(tok)} is outside the vocabulary"):
        tok.decode([3, len(tok)])
    with pytest.raises(DataError, match="-1"):
        tok.decode_batch(np.array([[-1, 0]]))


def test_tokenizers_library_reads_our_file_and_gives_the_same_ids(tmp_path):
    reports = corpus(300)
    tok = Tokenizer.build(reports, 2, "mimic_cxr")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.get_vocab_size() == len(tok)
    for r in corpus(100, seed=2) + ["", "zzz unknown", "a\x1cb\x1fc"]:
        assert hf.encode(clean_report(r, "mimic_cxr")).ids == tok.encode(r)
    loaded = Tokenizer.from_file(path)
    assert loaded == tok and loaded.dataset == "mimic_cxr"


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=80))
def test_tokenizers_round_trip_on_random_text(text):
    tok = _ROUND_TRIP_TOK
    assert _ROUND_TRIP_HF.encode(clean_report(text, "iu_xray")).ids == tok.encode(text)


_ROUND_TRIP_TOK = Tokenizer.build(corpus(100) + ["a b c é ß ﬁ x\x1dy"], 1, "iu_xray")
_ROUND_TRIP_HF = tokenizers.Tokenizer.from_str(_ROUND_TRIP_TOK.to_str())


def test_string_form_and_pickle_round_trip():
    tok = Tokenizer.build(corpus(30), 1, "iu_xray")
    assert Tokenizer.from_str(tok.to_str()) == tok
    assert pickle.loads(pickle.dumps(tok)) == tok
    assert repr(tok) == f"Tokenizer(dataset='iu_xray', size={len(tok)})"


def test_file_resaved_by_tokenizers_needs_the_dataset(tmp_path):
    tok = Tokenizer.build(corpus(30), 1, "iu_xray")
    path = tmp_path / "resaved.json"
    tokenizers.Tokenizer.from_str(tok.to_str()).save(str(path))
    with pytest.raises(DataError, match="resaved.json: model.cmn_dataset is missing"):
        Tokenizer.from_file(path)
    again = Tokenizer.from_file(path, dataset="iu_xray")
    assert [again.id_to_token(i) for i in range(len(again))] == [tok.id_to_token(i) for i in range(len(tok))]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ("{}", 'no "model" entry'),
        (json.dumps({"model": {"type": "BPE"}}), "WordLevel"),
        (
            json.dumps(
                {
                    "model": {
                        "type": "WordLevel",
                        "unk_token": "<unk>",
                        "cmn_dataset": "iu_xray",
                        "vocab": {"<pad>": 0, "a": 1},
                    }
                }
            ),
            "no <unk> token",
        ),
        (
            json.dumps(
                {
                    "model": {
                        "type": "WordLevel",
                        "unk_token": "<unk>",
                        "cmn_dataset": "iu_xray",
                        "vocab": {"<pad>": 0, "<unk>": 3},
                    }
                }
            ),
            "gap",
        ),
    ],
)
def test_malformed_file_is_a_data_error_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"bad.json: .*{message}"):
        Tokenizer.from_file(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.json: cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_bytes_reports_and_bad_reports():
    tok = Tokenizer.build([b"clear lungs", "clear"], 1, "iu_xray")
    assert tok.encode(b"clear") == tok.encode("clear")
    with pytest.raises(DataError, match="report 1 is not valid Unicode"):
        tok.encode_batch(["ok", "bad \ud800"], 4)
    with pytest.raises(DataError, match="report 0 is not valid UTF-8"):
        Tokenizer.build([b"\xc3("], 1, "iu_xray")


def _vocab_file(vocab):
    return json.dumps({"model": {"type": "WordLevel", "unk_token": "<unk>", "cmn_dataset": "iu_xray", "vocab": vocab}})


@pytest.mark.parametrize(
    "vocab, message",
    [
        ({"x": 0, "<unk>": 1, "<pad>": 2}, '"<pad>" \\(BOS/EOS/padding\\) must have id 0, found 2'),
        ({"<pad>": 0, "<unk>": 1, "x": 0}, 'id 0 is reserved for "<pad>", but "x" has it too'),
        ({"<unk>": 1, "x": 0}, 'no "<pad>" token with id 0'),
        ({"<pad>": 0, "<unk>": 1, "a b": 2}, "holds whitespace"),
        ({"<pad>": 0, "<unk>": 1, "": 2}, "is empty"),
    ],
)
def test_file_that_would_not_read_back_is_refused(tmp_path, vocab, message):
    # `<pad>` at another id used to load, then save a file with "<pad>" twice that the
    # next load rejected or read differently.
    with pytest.raises(DataError, match=message):
        Tokenizer.from_str(_vocab_file(vocab))
    path = tmp_path / "tokenizer.json"
    path.write_text(_vocab_file(vocab))
    with pytest.raises(DataError, match=f"tokenizer.json: .*{message}"):
        Tokenizer.from_file(path)


def test_every_accepted_file_reads_back_the_same(tmp_path):
    tok = Tokenizer.from_str(_vocab_file({"<pad>": 0, "<unk>": 2, "b": 1, "é": 3}))
    tok.save(tmp_path / "t.json")
    assert Tokenizer.from_file(tmp_path / "t.json") == tok
    assert [tok.id_to_token(i) for i in range(len(tok))] == ["<pad>", "b", "<unk>", "é"]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda tok: tok.encode_batch("the lungs", 4),
            TypeError,
            "reports must be a list of reports, not a single str",
        ),
        (lambda tok: tok.encode_batch(b"the lungs", 4), TypeError, "not a single bytes"),
        (lambda tok: Tokenizer.build("the lungs", 1, "iu_xray"), TypeError, "reports must be a list of reports"),
        (lambda tok: tok.decode("12"), TypeError, "ids must be a sequence of ints, not str"),
        (lambda tok: tok.decode([1.5]), TypeError, "float"),
        (lambda tok: tok.decode_batch(np.array([[1.7, 0.0]])), TypeError, "integer ids, got dtype float64"),
        (lambda tok: tok.decode_batch("12"), TypeError, "rows of ints, not str"),
        (lambda tok: tok.id_to_token(1.5), TypeError, "float"),
        (lambda tok: tok.encode_batch(["a"], 2.5), TypeError, "max_len"),
        (
            lambda tok: tok.encode_batch(["a"], 2**40),
            ValueError,
            "max_len must be an integer from 0 to 1048576, got 1099511627776",
        ),
        (lambda tok: tok.encode_batch(["a"], -(2**70)), ValueError, "max_len must be an integer from 0 to 1048576"),
        (lambda tok: Tokenizer.build(["a"], 2.5, "iu_xray"), TypeError, "threshold"),
        (lambda tok: Tokenizer.from_str("{\ud800}"), DataError, "lone surrogate"),
    ],
)
def test_wrong_kind_of_argument_is_an_error_not_a_silent_reading(call, error, message):
    tok = Tokenizer.build(corpus(10), 1, "iu_xray")
    with pytest.raises(error, match=message):
        call(tok)


def test_ids_and_thresholds_beyond_int64():
    tok = Tokenizer.build(corpus(10), 1, "iu_xray")
    assert tok.id_to_token(2**64) is None and tok.id_to_token(-(2**64)) is None
    assert tok.token_to_id("\ud800") is None
    with pytest.raises(DataError, match=f"token id {2**64} is outside the vocabulary"):
        tok.decode([3, 2**64])
    assert len(Tokenizer.build(corpus(10), 2**70, "iu_xray")) == 2  # nothing reaches it: <pad>, <unk>
    assert len(Tokenizer.build(corpus(10), -(2**70), "iu_xray")) == len(tok)

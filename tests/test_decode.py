"""Beam and greedy search: the native bookkeeping driven by torch must return what the
plain Python beam search of :mod:`cmn.text_ref` returns, block n-grams for any beam
size, and drop finished items from the decoder."""

import hashlib
import itertools

import numpy as np
import pytest
import torch

from cmn.decode import Hypothesis, beam_search, greedy_search
from cmn.text import BeamSearch
from cmn.text_ref import beam_search_ref


class TableModel:
    """Log-probabilities that depend on (item, prefix) through a seeded hash."""

    def __init__(self, vocab, seed=0, sharpness=3.0, eos_bias=0.0):
        self.vocab, self.seed, self.sharpness, self.eos_bias = vocab, seed, sharpness, eos_bias
        self.cache = {}

    def __call__(self, item, prefix):
        key = (item, tuple(prefix))
        if key not in self.cache:
            digest = hashlib.sha256(repr((self.seed, key)).encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            logits = rng.standard_normal(self.vocab) * self.sharpness
            logits[0] += self.eos_bias
            logp = torch.log_softmax(torch.from_numpy(logits).float(), dim=0)
            self.cache[key] = logp.numpy()
        return self.cache[key]


class FakeDecoder:
    """IncrementalDecoder over a TableModel; records the rows it is asked to run."""

    def __init__(self, model, batch_size, rows_per_item):
        self.model = model
        self.items = [b for b in range(batch_size) for _ in range(rows_per_item)]
        self.prefixes = [() for _ in self.items]
        self.started = False
        self.rows_per_step = []

    def step(self, tokens):
        assert tokens.dtype == torch.long and tokens.shape == (len(self.items),)
        if self.started:
            self.prefixes = [p + (int(t),) for p, t in zip(self.prefixes, tokens)]
        else:
            assert (tokens == 0).all()
        self.started = True
        self.rows_per_step.append(len(self.items))
        return torch.from_numpy(np.stack([self.model(b, p) for b, p in zip(self.items, self.prefixes)]))

    def reorder(self, index):
        index = index.tolist()
        self.items = [self.items[i] for i in index]
        self.prefixes = [self.prefixes[i] for i in index]


def run(model, batch, beam, max_len, **kw):
    decoder = FakeDecoder(model, batch, beam)
    got = beam_search(decoder, batch, beam, max_len, **kw)
    want = beam_search_ref(model, batch, beam, max_len, **kw)
    return got, want, decoder


@pytest.mark.parametrize(
    "batch, beam, max_len, vocab, n_best, eos_bias",
    [
        (1, 1, 6, 7, 1, 0.0),
        (3, 2, 8, 11, 2, 1.0),
        (4, 3, 12, 20, 1, 2.0),
        (2, 5, 10, 30, 3, 3.0),
        (16, 3, 15, 50, 3, 2.5),
    ],
)
def test_equals_reference_on_random_score_tables(batch, beam, max_len, vocab, n_best, eos_bias):
    for seed in range(4):
        got, want, _ = run(TableModel(vocab, seed, eos_bias=eos_bias), batch, beam, max_len, n_best=n_best)
        assert [[(h.tokens, h.score) for h in item] for item in got] == [[tuple(h) for h in item] for item in want]
        assert all(isinstance(h, Hypothesis) and len(item) <= n_best for item in got for h in item)


@pytest.mark.parametrize("ngram, length_penalty", [(1, 0.0), (2, 0.0), (3, 1.0), (2, 0.6)])
def test_equals_reference_with_blocking_and_length_penalty(ngram, length_penalty):
    for seed in range(3):
        got, want, _ = run(
            TableModel(12, seed, sharpness=1.0, eos_bias=-2.0),
            3,
            3,
            14,
            no_repeat_ngram_size=ngram,
            length_penalty=length_penalty,
            n_best=3,
        )
        assert [[(h.tokens, h.score) for h in item] for item in got] == [[tuple(h) for h in item] for item in want]


def repeats(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


class LoopModel:
    """Strongly prefers continuing the cycle 1 2 3 1 2 3 ... and never ends early."""

    def __call__(self, item, prefix):
        logp = np.full(8, -8.0, dtype=np.float32)
        logp[(prefix[-1] % 3) + 1 if prefix else 1] = -0.01
        logp[0] = -20.0
        return logp


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
def test_blocking_really_blocks_for_any_beam_size(beam):
    plain = beam_search(FakeDecoder(LoopModel(), 2, beam), 2, beam, 12, n_best=beam)
    assert all(repeats(h.tokens, 3) for item in plain for h in item)
    blocked = beam_search(FakeDecoder(LoopModel(), 2, beam), 2, beam, 12, no_repeat_ngram_size=3, n_best=beam)
    for item in blocked:
        for h in item:
            assert len(h.tokens) == 12 and not repeats(h.tokens, 3), h.tokens


def test_finished_items_are_dropped_and_search_stops_early():
    model = TableModel(9, seed=5, eos_bias=0.0)
    # item 1 ends at once (EOS almost certain for every prefix), item 0 runs long.
    model.cache[(1, ())] = np.log(np.array([0.999] + [0.001 / 8] * 8, dtype=np.float32))
    got, want, decoder = run(model, 2, 1, 30)
    assert got[1][0].tokens == []
    assert decoder.rows_per_step[0] == 2 and decoder.rows_per_step[1] == 1
    assert got == [[Hypothesis(*h) for h in item] for item in want]
    long = len(got[0][0].tokens)
    assert len(decoder.rows_per_step) == (long + 1 if long < 30 else 30)


def test_search_ends_when_every_item_is_done():
    model = TableModel(6, seed=1, eos_bias=50.0)  # EOS first everywhere
    decoder = FakeDecoder(model, 4, 3)
    result = beam_search(decoder, 4, 3, 50)
    assert decoder.rows_per_step == [12]
    assert all(item[0].tokens == [] for item in result)


def test_greedy_is_argmax_until_eos():
    model = TableModel(10, seed=3, eos_bias=1.5)
    decoder = FakeDecoder(model, 5, 1)
    got = greedy_search(decoder, 5, 20)
    for b, tokens in enumerate(got):
        prefix = []
        for _ in range(20):
            t = int(np.argmax(model(b, tuple(prefix))))
            if t == 0:
                break
            prefix.append(t)
        assert tokens == prefix


def test_bookkeeping_rejects_bad_input():
    with pytest.raises(ValueError, match="n_best"):
        BeamSearch(1, 2, 5, n_best=3)
    bs = BeamSearch(2, 2, 5)
    assert bs.num_rows == 4 and not bs.done
    np.testing.assert_array_equal(bs.cum_scores(), [0, -np.inf, 0, -np.inf])
    with pytest.raises(ValueError, match="expected"):
        bs.step(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.int64), 10)
    with pytest.raises(ValueError, match="outside"):
        bs.step(np.zeros((2, 4), np.float32), np.full((2, 4), 20, np.int64), 10)
    with pytest.raises(ValueError, match="still searching"):
        bs.finalize()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(batch_size=1, beam_size=2**31, max_len=1),
            "beam_size must be an integer from 1 to 1048576, got 2147483648",
        ),
        (dict(batch_size=2**40, beam_size=1, max_len=1), "batch_size must be an integer from 1 to 1048576"),
        (
            dict(batch_size=2**10, beam_size=2**10 + 1, max_len=1),
            "batch_size \\* beam_size must be at most 1048576 rows",
        ),
        (dict(batch_size=-1, beam_size=1, max_len=1), "batch_size must be an integer from 1 to 1048576, got -1"),
        (dict(batch_size=1, beam_size=1, max_len=2**64), "max_len must be an integer from 1 to 9223372036854775807"),
        (dict(batch_size=1, beam_size=1, max_len=1, eos_id=-1), "eos_id must be an integer from 0"),
        (dict(batch_size=1, beam_size=1, max_len=1, no_repeat_ngram_size=-1), "no_repeat_ngram_size must be"),
        (dict(batch_size=1, beam_size=2, max_len=1, n_best=3), "n_best must be an integer from 1 to beam_size \\(2\\)"),
        (dict(batch_size=1, beam_size=1, max_len=1, length_penalty=float("nan")), "length_penalty must be finite"),
    ],
)
def test_extreme_sizes_are_value_errors_naming_the_argument(kwargs, message):
    # beam_size 2**31 used to abort the interpreter (failed allocation)
    with pytest.raises(ValueError, match=message):
        BeamSearch(**kwargs)


def test_step_arguments_are_checked():
    bs = BeamSearch(1, 2, 5, eos_id=9)
    scores, indices = np.zeros((1, 4), np.float32), np.arange(4, dtype=np.int64)[None]
    with pytest.raises(ValueError, match="eos_id 9 is outside the vocabulary 0..5"):
        bs.step(scores, indices, 5)
    bs = BeamSearch(1, 2, 5)
    for vocab in (0, -1, 2**63, 2**62):
        with pytest.raises(ValueError, match="vocab_size must be an integer from 1 to"):
            bs.step(scores, indices, vocab)
    with pytest.raises(TypeError, match="scores must be a 2-D float32 array, got a 2-D float64 array"):
        bs.step(scores.astype(np.float64), indices, 5)
    with pytest.raises(TypeError, match="indices must be a 2-D int64 array, got a 1-D int64 array"):
        bs.step(scores, indices[0], 5)
    with pytest.raises(TypeError, match="scores must be a 2-D float32 array, got list"):
        bs.step([[0.0] * 4], indices, 5)
    assert bs.num_rows == 2 and not bs.done


def test_a_failed_step_leaves_the_search_as_it_was():
    # item 1 offers only EOS candidates: the error comes after item 0 was looked at
    bs, fresh = BeamSearch(2, 2, 5), BeamSearch(2, 2, 5)
    scores = np.array([[-0.1, -0.2, -0.3, -0.4]] * 2, np.float32)
    with pytest.raises(ValueError, match="non-EOS candidates"):
        bs.step(scores, np.array([[1, 2, 3, 0], [0, 3, 0, 3]]), 3)
    good = np.array([[1, 2, 3, 0], [1, 2, 3, 4]])
    for a, b in zip(bs.step(scores, good, 3), fresh.step(scores, good, 3)):
        np.testing.assert_array_equal(a, b)
    logp = np.array([[-0.01, -5, -5]] * 4, np.float32)  # EOS next: both end now
    top = (logp + bs.cum_scores()[:, None]).reshape(2, 6)
    order = np.argsort(-top, axis=1, kind="stable")[:, :4]
    step = (np.take_along_axis(top, order, 1), order.astype(np.int64), 3)
    bs.step(*step), fresh.step(*step)
    assert bs.done and bs.finalize() == fresh.finalize()


def test_start_on_explicit_device_and_bos():
    model = TableModel(7, seed=2)

    class Bos(FakeDecoder):
        def step(self, tokens):
            if not self.started:
                assert (tokens == 5).all() and tokens.device.type == "cpu"
                tokens = torch.zeros_like(tokens)
            return super().step(tokens)

    got = beam_search(Bos(model, 2, 2), 2, 2, 6, bos_id=5, device="cpu")
    want = beam_search_ref(model, 2, 2, 6)
    assert [[(h.tokens, h.score) for h in item] for item in got] == [[tuple(h) for h in item] for item in want]


def test_all_index_combinations_of_small_case():
    # exhaustive small grid: every (beam, max_len) combination agrees with the reference
    for beam, max_len in itertools.product([1, 2, 3], [1, 2, 3]):
        got, want, _ = run(TableModel(5, seed=beam * 10 + max_len), 2, beam, max_len, n_best=beam)
        assert [[(h.tokens, h.score) for h in item] for item in got] == [[tuple(h) for h in item] for item in want]

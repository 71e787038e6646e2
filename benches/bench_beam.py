"""Beam-search bookkeeping per decoding step at batch 16, beam 3, vocabulary 5,000.

Run: ``python -m pytest benches/bench_beam.py --benchmark-enable --benchmark-group-by=group``.
Compared in one group, each timed per decoding step:
* ``native``: everything :func:`cmn.decode.beam_search` does besides the model: n-gram
  ban masking (trigram blocking on), adding cumulative scores, top-k on the device
  (CPU here), the copy of (16, 6) candidates to the CPU, the native ``step``, and the
  reorder/next-token tensors; the "model" returns a fixed (48, 5000) log-prob table.
* ``python_reference``: the same step done by the plain Python beam search
  (:func:`cmn.text_ref.beam_search_ref`), which ranks every candidate in Python.
* ``model_step``: a stand-in for the model's own step: Linear 512 -> 5000 over 48
  rows plus log_softmax (the real decoder also runs its Transformer layers first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmn.decode import beam_search
from cmn.text_ref import beam_search_ref
from timing import mean_seconds

BATCH, BEAM, VOCAB, D_MODEL = 16, 3, 5000, 512
STEPS = 60  # one report's worth of steps per round (hypotheses grow like in real use)
GROUP = "beam: one decoding step, batch 16 x beam 3, vocab 5000"


def _table(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH * BEAM, VOCAB, generator=g) * 3
    logits[:, 0] = -30.0  # no EOS: every step keeps all 48 rows
    return torch.log_softmax(logits, dim=-1)  # (48, 5000)


class FixedDecoder:
    def __init__(self, logp):
        self.logp, self.rows = logp, logp.shape[0]

    def step(self, tokens):
        return self.logp[: tokens.shape[0]]

    def reorder(self, index):
        self.rows = index.shape[0]


@pytest.mark.benchmark(group=GROUP)
def test_native_bookkeeping_per_step(benchmark):
    logp = _table()

    def search():
        return beam_search(FixedDecoder(logp), BATCH, BEAM, STEPS, no_repeat_ngram_size=3)

    benchmark.pedantic(search, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["steps_per_round"] = STEPS
    if mean_seconds(benchmark) is not None:
        benchmark.extra_info["ms_per_step"] = mean_seconds(benchmark) / STEPS * 1e3


@pytest.mark.benchmark(group=GROUP)
def test_python_reference_bookkeeping_per_step(benchmark):
    table = _table().numpy()
    steps = 3  # the reference sorts all 15,000 candidates per item in Python: keep it short

    def search():
        return beam_search_ref(lambda item, prefix: table[item * BEAM], BATCH, BEAM, steps, no_repeat_ngram_size=3)

    benchmark.pedantic(search, rounds=2, iterations=1)
    benchmark.extra_info["steps_per_round"] = steps
    if mean_seconds(benchmark) is not None:
        benchmark.extra_info["ms_per_step"] = mean_seconds(benchmark) / steps * 1e3


@pytest.mark.benchmark(group=GROUP)
def test_model_step_stand_in(benchmark):
    torch.manual_seed(0)
    head = torch.nn.Linear(D_MODEL, VOCAB)
    h = torch.randn(BATCH * BEAM, D_MODEL)

    @torch.no_grad()
    def step():
        for _ in range(STEPS):
            torch.log_softmax(head(h), dim=-1)  # (48, 5000)

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["steps_per_round"] = STEPS
    if mean_seconds(benchmark) is not None:
        benchmark.extra_info["ms_per_step"] = mean_seconds(benchmark) / STEPS * 1e3


def test_bench_search_keeps_every_row():
    result = beam_search(FixedDecoder(_table()), BATCH, BEAM, 8, no_repeat_ngram_size=3)
    assert all(len(item[0].tokens) == 8 for item in result)
    assert np.isfinite([item[0].score for item in result]).all()

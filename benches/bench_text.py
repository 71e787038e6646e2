"""Cleaning + vocabulary + encoding of a MIMIC-scale corpus: native vs pure Python.

Run: ``python -m pytest benches/bench_text.py --benchmark-enable --benchmark-group-by=group``.
The corpus (200,000 raw reports, MIMIC-style: capitalised sentences, numbered lists,
``___`` de-identification, newlines, double spaces) is generated here, seeded.
Each round does what training does before the first epoch: clean every report, build
the vocabulary (threshold 3) and encode every report to a padded (n, 100) array.
"""

from __future__ import annotations

import random

import pytest

from cmn.text import Tokenizer
from cmn.text_ref import RefTokenizer
from timing import mean_seconds

N_REPORTS = 200_000
MAX_LEN = 100
SENTENCES = (
    "The heart size is normal.",
    "Moderate cardiomegaly is unchanged.",
    "The mediastinal and hilar contours are within normal limits.",
    "There is no pleural effusion or pneumothorax.",
    "No focal consolidation, pleural effusion, or pneumothorax is seen.",
    "Small bilateral pleural effusions with adjacent atelectasis.",
    "Mild pulmonary vascular congestion without frank edema.",
    "Opacity at the right lung base may represent atelectasis or pneumonia.",
    "An endotracheal tube terminates 4 cm above the carina.",
    "A right IJ central venous catheter ends in the mid SVC.",
    "Dr. ___ was notified of the findings by Dr. ___ at ___ on ___.",
    "Comparison is made to the prior study from ___.",
    "Healed left rib fractures are again noted.",
    "No acute osseous abnormality.",
    "The lungs are clear.",
    "No acute cardiopulmonary process.",
    "Pleural thickening at the left apex is unchanged (stable).",
    "A 1.5 cm nodule is seen in the right upper lobe; recommend CT.",
    "Median sternotomy wires are intact.",
    "Interval increase in the left retrocardiac opacity since __/__/____.",
)


def make_reports(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    reports = []
    for _ in range(n):
        picked = rng.sample(SENTENCES, rng.randint(3, 9))
        if rng.random() < 0.3:  # numbered impression list
            picked = [f"{i}. {s}" for i, s in enumerate(picked, 1)]
        sep = rng.choice([" ", "  ", "\n", " \n "])
        reports.append("FINDINGS: " + sep.join(picked) + rng.choice(["", " ..", "\n IMPRESSION: ___."]))
    return reports


@pytest.fixture(scope="module")
def reports(bench_enabled) -> list[str]:
    return make_reports(N_REPORTS if bench_enabled else 5_000)


def native_pipeline(reports):
    tok = Tokenizer.build(reports, 3, "mimic_cxr")
    return tok.encode_batch(reports, MAX_LEN)


def python_pipeline(reports):
    tok = RefTokenizer(reports, 3, "mimic_cxr")
    return tok.encode_batch(reports, MAX_LEN)


def _record(benchmark, reports):
    benchmark.extra_info["reports"] = len(reports)
    mean = mean_seconds(benchmark)
    if mean is not None:
        benchmark.extra_info["reports_per_s"] = len(reports) / mean


@pytest.mark.benchmark(group="text: clean+vocab+encode 200k MIMIC reports")
def test_native_clean_vocab_encode(benchmark, reports):
    ids = benchmark.pedantic(native_pipeline, args=(reports,), rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, reports)
    assert ids.shape == (len(reports), MAX_LEN)


@pytest.mark.benchmark(group="text: clean+vocab+encode 200k MIMIC reports")
def test_python_reference_clean_vocab_encode(benchmark, reports):
    ids = benchmark.pedantic(python_pipeline, args=(reports,), rounds=1, iterations=1)
    _record(benchmark, reports)
    assert ids.shape == (len(reports), MAX_LEN)


def test_native_equals_reference_on_bench_corpus(reports):
    import numpy as np

    sample = reports[:5000]
    np.testing.assert_array_equal(native_pipeline(sample), python_pipeline(sample))

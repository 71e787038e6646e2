"""Labeling speed of the offline CheXpert-style labeler on generated MIMIC-style reports.

Run: ``python -m pytest benches/bench_labeler.py --benchmark-enable`` (the full 200,000
report timing) or ``python benches/bench_labeler.py [N]`` for a one-off measurement.
"""
from __future__ import annotations

import random
import sys
import time

import pytest

from cmn.metrics import label_reports

SENTENCES = (
    "the heart size is normal .",
    "moderate cardiomegaly is unchanged .",
    "the mediastinal and hilar contours are within normal limits .",
    "there is no pleural effusion or pneumothorax .",
    "no focal consolidation , pleural effusion , or pneumothorax is seen .",
    "small bilateral pleural effusions with adjacent atelectasis .",
    "mild pulmonary vascular congestion without frank edema .",
    "opacity at the right lung base may represent atelectasis or pneumonia .",
    "pneumonia cannot be excluded in the appropriate clinical setting .",
    "an endotracheal tube terminates 4 cm above the carina .",
    "a right internal jugular central venous catheter ends in the mid svc .",
    "the previously seen right pneumothorax has resolved .",
    "there is a small left apical pneumothorax .",
    "healed left rib fractures are again noted .",
    "no acute osseous abnormality .",
    "the lungs are clear .",
    "no acute cardiopulmonary process .",
    "pleural thickening at the left apex is unchanged .",
    "a 1 cm nodule is seen in the right upper lobe .",
    "median sternotomy wires and mediastinal clips are intact .",
)


def make_reports(n: int, seed: int = 0) -> list[str]:
    """``n`` reports of 4 to 8 sentences drawn from a fixed MIMIC-style pool."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(SENTENCES, k=rng.randint(4, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def reports_200k(bench_enabled):
    return make_reports(200_000 if bench_enabled else 5_000)  # smoke run: small input


def test_label_200k_reports(benchmark, reports_200k):
    labels = benchmark.pedantic(label_reports, args=(reports_200k,), rounds=1, iterations=1)
    assert labels.shape == (len(reports_200k), 14)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    reports = make_reports(n)
    label_reports(reports[:10])  # compile the rules outside the timing
    start = time.perf_counter()
    label_reports(reports)
    took = time.perf_counter() - start
    print(f"labeled {n} reports in {took:.2f} s ({n / took:,.0f} reports/s)")

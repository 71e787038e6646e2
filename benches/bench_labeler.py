"""Labeling speed of the offline CheXpert-style labeler on generated MIMIC-style reports.

Run: ``python -m pytest benches/bench_labeler.py --benchmark-enable`` (the full 200,000
report timing) or ``python benches/bench_labeler.py [N] [--full]`` for a one-off measurement
in reports per CPU-second (process time, which other programs on a shared machine disturb
far less than wall time). ``--full`` wraps each report in MIMIC-CXR headings (INDICATION,
COMPARISON, FINDINGS, IMPRESSION) and labels with ``sections="auto"``.
"""

from __future__ import annotations

import argparse
import random
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


def with_headings(reports: list[str]) -> list[str]:
    """Full MIMIC-style reports: the generated text becomes FINDINGS, its last sentence the
    IMPRESSION, after an INDICATION that names findings of its own."""
    return [
        "                                 FINAL REPORT\n INDICATION:  ___ with cough, eval for pneumonia or effusion.\n\n"
        f" COMPARISON:  ___\n\n FINDINGS:\n\n {r}\n\n IMPRESSION:\n\n {r.rsplit(' . ', 1)[-1]}\n"
        for r in reports
    ]


def test_label_200k_reports(benchmark, reports_200k):
    labels = benchmark.pedantic(label_reports, args=(reports_200k,), rounds=1, iterations=1)
    assert labels.shape == (len(reports_200k), 14)


def test_label_200k_full_reports_auto_sections(benchmark, reports_200k):
    full = with_headings(reports_200k)
    labels = benchmark.pedantic(label_reports, args=(full,), kwargs={"sections": "auto"}, rounds=1, iterations=1)
    assert labels.shape == (len(full), 14)


def main() -> None:
    p = argparse.ArgumentParser(description="labeling speed in reports per CPU-second")
    p.add_argument("n", nargs="?", type=int, default=200_000, help="number of reports (default 200000)")
    p.add_argument("--full", action="store_true", help="full reports with headings, sections='auto'")
    args = p.parse_args()
    reports = make_reports(args.n)
    kwargs = {}
    if args.full:
        reports, kwargs = with_headings(reports), {"sections": "auto"}
    label_reports(reports[:10], **kwargs)  # compile the rules outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    label_reports(reports, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"labeled {args.n} {'full ' if args.full else ''}reports: {cpu:.2f} s CPU ({args.n / cpu:,.0f} reports "
        f"per CPU-second), {wall:.2f} s wall"
    )


if __name__ == "__main__":
    main()

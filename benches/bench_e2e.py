"""End to end: a training iteration (whole model; encoder-decoder alone) and beam-3 generation,
the reference's cost model (``naive``) against the default path.

Each scenario is one pytest-benchmark group; cases and configurations are described in
benches/e2e_cases.py. Peak memory (CPU: RSS high-water mark of the case run again in a fresh
process; CUDA: max allocated) goes to ``extra_info`` when benchmarks are enabled, with the
decoding steps taken for generation.

    python -m pytest benches/bench_e2e.py --benchmark-disable      # smoke: tiny sizes, once each
    CMN_BENCH_FULL=1 python -m pytest benches/bench_e2e.py --benchmark-enable \\
        --benchmark-group-by=group                                # the reference's IU X-Ray sizes
    python benches/run_e2e.py --output benches/RESULTS-e2e.md       # side by side, as a table

Full sizes: ResNet-101, two 224x224 views, batch 16, d_model 512, 8 heads, 3 layers, N 2048,
K 32, vocabulary 761, 60 tokens, beam 3 over 16 studies.
"""

import os

import pytest
import torch

import e2e_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES_NAME = "full" if os.environ.get("CMN_BENCH_FULL") == "1" else "smoke"
SIZES = e2e_cases.SIZES[SIZES_NAME]
ROUNDS = 3 if SIZES_NAME == "full" else 1
CASES = [
    ("train_full", "naive", "fp32"),
    ("train_full", "default", "fp32"),
    ("train_full", "default", "bf16"),
    ("train_full", "checkpointed", "fp32"),
    ("train_encdec", "naive", "fp32"),
    ("train_encdec", "default", "fp32"),
    ("train_encdec", "default", "bf16"),
    ("generate", "naive", "fp32"),
    ("generate", "default", "fp32"),
]


@pytest.mark.parametrize("scenario,config,precision", CASES, ids=["-".join(c) for c in CASES])
def test_e2e(benchmark, scenario, config, precision):
    benchmark.group = f"e2e {scenario} ({SIZES_NAME} sizes, {DEVICE.type})"
    if benchmark.enabled:  # a fresh process per case on CPU: too slow for the smoke run
        r = e2e_cases.measure_in_subprocess(scenario, config, SIZES_NAME, DEVICE.type, precision, reps=1)
        benchmark.extra_info["peak_MB"] = round(r["peak_bytes"] / 2**20, 1)
    step, units, result = e2e_cases.make_case(scenario, config, SIZES, DEVICE, precision)
    benchmark.extra_info["units_per_call"] = units  # target tokens (training) or studies (generation)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1 if benchmark.enabled else 0)
    if scenario == "generate":
        benchmark.extra_info["decoding_steps"] = result["steps"]
        assert result["steps"] == SIZES.seq_len  # EOS is banned: every search runs max_len steps

"""memory_query: naive (the reference ops) vs the torch path vs the fused kernels (cpu or triton).

Each shape and mode is one pytest-benchmark group holding every implementation. Peak memory
(CPU: RSS growth in a fresh process; CUDA: max allocated) goes to ``extra_info`` when
benchmarks are enabled.

    python -m pytest benches/bench_memory_query.py --benchmark-disable   # smoke: tiny shapes, once each
    CMN_BENCH_FULL=1 python -m pytest benches/bench_memory_query.py --benchmark-enable \\
        --benchmark-group-by=group                                     # the full grid
    python benches/run_gpu_suite.py --output benches/RESULTS-gpu.md     # the grid as a table
    CMN_BENCH_FULL=1 python -m pytest benches/bench_memory_query.py --benchmark-enable \\
        --benchmark-group-by=group -k "16 and 98 and 2048 and 32" \\
        --benchmark-columns=min,median,rounds    # the paper's sizes only (B=16 L=98 N=2048 K=32)
    python benches/mq_cases.py compare 5              # paper sizes, interleaved, with the limit

The full grid is B in {1, 16}, L in {60, 98}, N in {512, 2048, 8192, 65536}, K in
{8, 32, 128}, H = 8, d = 64, fp32. Naive cases that cannot fit are skipped with the reason.
"""

import os

import pytest
import torch

import mq_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["naive", "torch"] + (["triton"] if DEVICE.type == "cuda" else ["cpu"])
CASES = mq_cases.grid(full=os.environ.get("CMN_BENCH_FULL") == "1")


@pytest.mark.parametrize("mode", mq_cases.MODES)
@pytest.mark.parametrize("case", CASES, ids=mq_cases.shape_name)
@pytest.mark.parametrize("impl", IMPLS)
def test_memory_query(benchmark, impl, case, mode):
    if impl == "naive":
        reason = mq_cases.naive_skip_reason(case, mode, DEVICE)
        if reason:
            print(f"skip naive {mq_cases.shape_name(case)} {mode}: {reason}")
            pytest.skip(reason)
    benchmark.group = f"memory_query {mq_cases.shape_name(case)} {mode}"
    if benchmark.enabled:  # a fresh process per case on CPU: too slow for the smoke run
        benchmark.extra_info["peak_MB"] = round(mq_cases.peak_bytes(impl, mode, case, DEVICE) / 2**20, 1)
    step = mq_cases.make_step(impl, mode, mq_cases.make_inputs(case, DEVICE), case["K"])
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)

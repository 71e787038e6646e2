"""Shapes, inputs and measurements shared by the memory_query benchmarks.

Used by benches/bench_memory_query.py (pytest-benchmark) and benches/run_gpu_suite.py (one
command, markdown table). Also a script:

* ``python benches/mq_cases.py IMPL MODE B L N K`` runs one case once in this fresh process
  and prints its peak-RSS growth in bytes, which is how CPU peak memory is measured (RSS
  only grows, so each case needs its own process);
* ``python benches/mq_cases.py compare [ROUNDS [THREADS]]`` times naive, torch and cpu side by side
  at the paper's sizes on CPU, interleaved (one call of each per round, so a change of
  machine load hits all alike), and prints the best and median per implementation and
  mode and the speed-ups over naive, plus this machine's GEMM rate and memory bandwidth
  and the time limit they imply (see ``machine_limit``).
"""

import gc
import itertools
import os
import subprocess
import sys
import time

import torch

from cmn.ops import memory_query

HEADS, HEAD_DIM = 8, 64  # the paper's model: d_model 512 in 8 heads
FULL_GRID = dict(B=(1, 16), L=(60, 98), N=(512, 2048, 8192, 65536), K=(8, 32, 128))
SMOKE_GRID = dict(B=(2,), L=(6,), N=(200,), K=(8,))  # N not a multiple of any tile
PAPER = dict(B=16, L=98, N=2048, K=32)  # IU X-Ray sizes of the paper, fp32
MODES = ("fwd", "fwd+bwd")


def grid(full):
    g = FULL_GRID if full else SMOKE_GRID
    return [dict(B=b, L=seq, N=n, K=k) for b, seq, n, k in itertools.product(g["B"], g["L"], g["N"], g["K"])]


def shape_name(case):
    return f"B={case['B']} L={case['L']} N={case['N']} K={case['K']}"


def make_inputs(case, device, dtype=torch.float32, heads=HEADS, head_dim=HEAD_DIM, seed=0):
    """q (B, H, L, d) and the shared memory k, v (H, N, d), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    B, L, N = case["B"], case["L"], case["N"]
    q = torch.randn(B, heads, L, head_dim, generator=g)
    k = torch.randn(heads, N, head_dim, generator=g)
    v = torch.randn(heads, N, head_dim, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def make_step(impl, mode, inputs, topk):
    """A no-argument callable running one forward (and backward) pass."""
    q, k, v = inputs
    grad = torch.ones_like(q)

    def step():
        out = memory_query(q, k, v, topk, impl=impl)
        if mode == "fwd+bwd":
            out.backward(grad)
            for t in inputs:
                t.grad = None
        if q.is_cuda:
            torch.cuda.synchronize()

    if mode == "fwd+bwd":
        return step

    def forward_only():
        with torch.no_grad():  # "fwd" is inference: no autograd bookkeeping
            step()

    return forward_only


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def naive_skip_reason(case, mode, device, dtype=torch.float32):
    """Why the naive op cannot run this case here, or None: it needs the (B, H, L, N) scores,
    and in backward the (B, H, L, N, d) gather gradient, which does not fit."""
    B, L, N = case["B"], case["L"], case["N"]
    item = torch.finfo(dtype).bits // 8
    need = 2 * B * HEADS * L * N * item
    if mode == "fwd+bwd":
        need += B * HEADS * L * N * HEAD_DIM * item
    free = available_bytes(device)
    if need > 0.8 * free:
        return f"naive needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {device.type}"
    return None


def time_step(step, min_total=0.3, max_reps=10):
    """Median seconds per call after one warm-up call (which also compiles triton kernels)."""
    step()
    times = []
    while len(times) < max_reps and sum(times) < min_total:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_bytes(impl, mode, case, device):
    """Peak memory growth of one call: CUDA max allocated, or CPU RSS in a fresh process."""
    if device.type == "cuda":
        inputs = make_inputs(case, device)
        step = make_step(impl, mode, inputs, case["K"])
        step()  # warm-up: compile, allocate autotune caches
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - base
    cmd = [sys.executable, os.path.abspath(__file__), impl, mode, *(str(case[x]) for x in ("B", "L", "N", "K"))]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def interleaved_times(steps, rounds, clock=time.perf_counter):
    """{name: sorted seconds} of ``rounds`` calls of each step, one of each per round, after a warm-up.

    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU seconds of all
    this process's threads: less sensitive to other jobs on the machine than wall time).
    """
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return {name: sorted(t) for name, t in times.items()}


def machine_limit(case=PAPER, reps=5):
    """Measured GEMM rate and memory bandwidth, and the lower bound on forward time they imply.

    GEMM: best of ``reps`` fp32 (2048 x 2048) @ (2048 x 2048) products into a preallocated
    output. Bandwidth: best of ``reps`` sums over a 512 MiB tensor (read only). Bound: the
    scores GEMM (2 B H L N d flops) at the GEMM rate, plus one read of the (B, H, L, N) fp32
    scores at that bandwidth (what a selection over scores kept in memory must read; a
    selection fused with the GEMM reads them from cache instead).
    """
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    gemm = min(interleaved_times({"gemm": lambda: torch.mm(a, b, out=c)}, reps)["gemm"])
    big = torch.ones(128 * 2**20)  # 512 MiB
    read = min(interleaved_times({"read": lambda: big.sum()}, reps)["read"])
    gflops = 2 * 2048**3 / gemm / 1e9
    gbs = big.numel() * 4 / read / 1e9
    flops = 2 * case["B"] * HEADS * case["L"] * case["N"] * HEAD_DIM
    score_bytes = case["B"] * HEADS * case["L"] * case["N"] * 4
    return dict(
        gflops=gflops,
        gbs=gbs,
        gemm_s=flops / gflops / 1e9,
        select_s=score_bytes / gbs / 1e9,
        flops=flops,
        score_bytes=score_bytes,
    )


def _compare_main(argv):
    rounds = int(argv[0]) if argv else 5
    if len(argv) > 1:
        torch.set_num_threads(int(argv[1]))  # also sizes the cpu kernels' pool
    cpu = torch.device("cpu")
    inputs = make_inputs(PAPER, cpu)
    print(
        f"paper sizes {shape_name(PAPER)} H={HEADS} d={HEAD_DIM} fp32, {torch.get_num_threads()} threads, "
        f"{rounds} interleaved rounds, load average before {os.getloadavg()[0]:.2f}"
    )
    best = {}
    for mode in MODES:
        steps = {impl: make_step(impl, mode, inputs, PAPER["K"]) for impl in ("naive", "torch", "cpu")}
        for clock_name, clock in (("wall", time.perf_counter), ("CPU", time.process_time)):
            times = interleaved_times(steps, rounds, clock)
            for impl, t in times.items():
                best[mode, impl, clock_name] = t[0]
                print(
                    f"{mode:8s} {impl:6s} {clock_name:4s} best {t[0] * 1e3:8.1f} ms  median "
                    f"{t[len(t) // 2] * 1e3:8.1f} ms  naive/{impl} (best) "
                    f"{best[mode, 'naive', clock_name] / t[0]:6.1f}x"
                )
    lim = machine_limit()
    print(
        f"GEMM {lim['gflops']:.0f} GFLOP/s, read bandwidth {lim['gbs']:.1f} GB/s: scores GEMM "
        f"{lim['flops'] / 1e9:.2f} GFLOP -> {lim['gemm_s'] * 1e3:.1f} ms, one read of the "
        f"{lim['score_bytes'] / 2**20:.0f} MiB of scores -> {lim['select_s'] * 1e3:.1f} ms; "
        f"cpu fwd (best wall) = {best['fwd', 'cpu', 'wall'] / lim['gemm_s']:.2f}x the GEMM time; "
        f"load average after {os.getloadavg()[0]:.2f}"
    )


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_rss_main(argv):
    impl, mode, B, L, N, K = argv
    case = dict(B=int(B), L=int(L), N=int(N), K=int(K))
    inputs = make_inputs(case, torch.device("cpu"))
    step = make_step(impl, mode, inputs, case["K"])
    # Reset the peak-RSS mark (VmHWM) first: ru_maxrss is carried over from the parent
    # across fork + exec, so a benchmark parent that ran the naive op would hide ours.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    step()
    print(_status_bytes("VmHWM") - base)


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        _compare_main(sys.argv[2:])
    else:
        _peak_rss_main(sys.argv[1:])

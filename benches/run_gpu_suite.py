"""The whole memory_query grid in one command, written as a markdown table.

    python benches/run_gpu_suite.py --output benches/RESULTS-gpu.md   # on a GPU: full grid
    python benches/run_gpu_suite.py --smoke --output /tmp/smoke.md     # tiny grid, any device

For every shape (B, L, N, K; H = 8, d = 64, fp32) and mode (fwd under no_grad, fwd+bwd) it
times each implementation (median after a warm-up call that also compiles the triton
kernels) and measures its peak memory (CUDA: max allocated; CPU: RSS growth in a fresh
process). Naive cases that cannot fit are skipped with the reason printed and written in
the table; a case that still runs out of memory is recorded as OOM.
"""

import argparse
import datetime
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mq_cases


def run_case(impl, mode, case, device):
    """(seconds, peak bytes) or a string saying why there are none."""
    if impl == "naive":
        reason = mq_cases.naive_skip_reason(case, mode, device)
        if reason:
            return f"skipped: {reason}"
    try:
        step = mq_cases.make_step(impl, mode, mq_cases.make_inputs(case, device), case["K"])
        seconds = mq_cases.time_step(step)
        del step
        return seconds, mq_cases.peak_bytes(impl, mode, case, device)
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benches/RESULTS-gpu.md", help="markdown file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny grid (any device) to test this script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    impls = ["naive", "torch"] + (["triton"] if device.type == "cuda" else [])

    header = ["B", "L", "N", "K", "mode"] + [f"{i} ms" for i in impls] + [f"{i} peak MB" for i in impls]
    header += [f"naive/{i}" for i in impls[1:]] + (["torch/triton"] if "triton" in impls else [])
    rows, notes = [], []
    for case in mq_cases.grid(full=not args.smoke):
        for mode in mq_cases.MODES:
            results = {}
            for impl in impls:
                results[impl] = run_case(impl, mode, case, device)
                shown = results[impl] if isinstance(results[impl], str) else f"{results[impl][0] * 1e3:.2f} ms"
                print(f"{mq_cases.shape_name(case)} {mode:8s} {impl:6s} {shown}", flush=True)
                if isinstance(results[impl], str):
                    notes.append(f"{mq_cases.shape_name(case)} {mode} {impl}: {results[impl]}")
            rows.append(table_row(case, mode, impls, results))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# memory_query benchmark ({device_name})",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, H={mq_cases.HEADS}, d={mq_cases.HEAD_DIM}, fp32, "
        f"shared memory (H, N, d). Command: `python benches/run_gpu_suite.py{' --smoke' if args.smoke else ''}`.",
        "fwd runs under no_grad; fwd+bwd is one forward and backward. Peak MB is growth over the inputs "
        "(CUDA max allocated, or CPU max RSS in a fresh process). '-' = not run (see notes).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


def table_row(case, mode, impls, results):
    ok = {i: r for i, r in results.items() if not isinstance(r, str)}
    row = [str(case[x]) for x in ("B", "L", "N", "K")] + [mode]
    row += [f"{ok[i][0] * 1e3:.2f}" if i in ok else "-" for i in impls]
    row += [f"{ok[i][1] / 2**20:.1f}" if i in ok else "-" for i in impls]
    pairs = [("naive", i) for i in impls[1:]] + ([("torch", "triton")] if "triton" in impls else [])
    row += [f"{ok[a][0] / ok[b][0]:.1f}x" if a in ok and b in ok else "-" for a, b in pairs]
    return row


if __name__ == "__main__":
    main()

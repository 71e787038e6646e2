"""Every end-to-end scenario side by side in one command, written as a markdown table.

    python benches/run_e2e.py --output benches/RESULTS-e2e.md            # CPU, the reference's IU sizes
    python benches/run_e2e.py --quick --output /tmp/e2e.md               # tiny sizes: tests this script
    python benches/run_e2e.py --device cuda --output benches/RESULTS-e2e-gpu.md
    python benches/run_e2e.py --scenario train_full --output /tmp/e2e-train.md  # some scenarios only

Each case (scenario x configuration x precision, see benches/e2e_cases.py) runs in a fresh
process: one warm-up call, then the median of up to ``--reps`` timed calls (fewer once
``--max-seconds`` of timed calls have run); CPU peak memory is that process's RSS high-water
mark, CUDA peak is max allocated. Cases run one after another, never in parallel.
"""

import argparse
import datetime
import os
import pathlib
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_cases
from cmn.fsutil import write_atomic

SCENARIO_TITLES = {
    "train_full": "Training iteration, full model",
    "train_encdec": "Training iteration, encoder-decoder alone (precomputed patches)",
    "generate": "Beam-3 generation, per study",
}
# Targets of issue 6 (CPU, default fp32 against naive fp32): (min speedup, max peak ratio).
TARGETS = {"train_full": (2.0, 1 / 3), "train_encdec": (4.0, None), "generate": (10.0, None)}
LOW_MEMORY_MAX_PEAK = 1 / 3  # issue 16: --low-memory full-model training peak against naive fp32
VARIANT_TITLES = {
    ("default", "fp32"): "",
    ("default", "bf16"): ", default under bf16 autocast",
    ("checkpointed", "fp32"): ", default with --checkpoint-visual",
    ("checkpointed", "bf16"): ", --low-memory (= bf16 autocast + --checkpoint-visual)",
    ("jointbn", "fp32"): ", --joint-view-bn (one BatchNorm statistic over both views)",
}


def cases(device, scenarios=e2e_cases.SCENARIOS):
    """(scenario, config, precision) in run order; bf16 runs the default path only."""
    out = []
    for scenario in scenarios:
        out += [(scenario, "naive", "fp32"), (scenario, "default", "fp32")]
        if scenario != "generate" or device == "cuda":
            out.append((scenario, "default", "bf16"))
        if scenario == "train_full":
            out += [(scenario, "checkpointed", "fp32"), (scenario, "checkpointed", "bf16")]
            out.append((scenario, "jointbn", "fp32"))  # what per-view BatchNorm (the default) costs
    return out


def _load():
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def per_unit(r):
    """Seconds per iteration (training) or per study (generation)."""
    return r["seconds"] / r["units"] if r["scenario"] == "generate" else r["seconds"]


def fmt_time(r):
    return "-" if r is None else f"{per_unit(r):.3g} s"


def fmt_mb(r):
    return "-" if r is None else f"{r['peak_bytes'] / 2**20:,.0f}"


def target_note(scenario, speedup, ratio):
    min_speedup, max_ratio = TARGETS[scenario]
    parts = [f"≥{min_speedup:g}x: {'met' if speedup >= min_speedup else 'NOT met'}"]
    if max_ratio is not None:
        parts.append(f"peak ≤1/3: {'met' if ratio <= max_ratio else 'NOT met'}")
    return ", ".join(parts)


def summary_table(results, device, full):
    head = [
        "scenario",
        "naive time",
        "default time",
        "speedup",
        "naive peak MB",
        "default peak MB",
        "memory ratio",
        "target (issue 6)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario in e2e_cases.SCENARIOS:
        naive = results.get((scenario, "naive", "fp32"))
        for config, precision in VARIANT_TITLES:
            if (scenario, config, precision) not in results:
                continue
            default = results[(scenario, config, precision)]
            title = SCENARIO_TITLES[scenario] + VARIANT_TITLES[(config, precision)]
            if naive is None or default is None:
                lines.append(
                    f"| {title} | {fmt_time(naive)} | {fmt_time(default)} | - | {fmt_mb(naive)} | "
                    f"{fmt_mb(default)} | - | failed, see notes |"
                )
                continue
            speedup = per_unit(naive) / per_unit(default)
            ratio = default["peak_bytes"] / naive["peak_bytes"]
            note = "extra"
            if (config, precision) == ("default", "fp32"):
                note = target_note(scenario, speedup, ratio) if device == "cpu" and full else "n/a (quick sizes or GPU)"
            elif (config, precision) == ("checkpointed", "bf16"):
                met = "met" if ratio <= LOW_MEMORY_MAX_PEAK else "NOT met"
                note = f"peak ≤1/3 (issue 16): {met}" if device == "cpu" and full else "n/a (quick sizes or GPU)"
            lines.append(
                f"| {title} | {fmt_time(naive)} | {fmt_time(default)} | {speedup:.1f}x | {fmt_mb(naive)} | "
                f"{fmt_mb(default)} | {ratio:.2f} | {note} |"
            )
    return lines


def detail_table(results):
    head = [
        "scenario",
        "config",
        "precision",
        "median s/call",
        "timed calls",
        "throughput",
        "peak MB",
        "RSS/alloc before MB",
        "decoding steps",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (scenario, config, precision), r in results.items():
        if r is None:
            continue
        unit = "studies/s" if scenario == "generate" else "target tokens/s"
        lines.append(
            f"| {scenario} | {config} | {precision} | {r['seconds']:.3f} | {len(r['times'])} | "
            f"{r['units_per_s']:.3g} {unit} | {fmt_mb(r)} | {r['base_bytes'] / 2**20:,.0f} | "
            f"{r.get('steps', '-')} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benches/RESULTS-e2e.md", help="markdown file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed call: tests this script")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per case at most (after a warm-up)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop timing a case after this long")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=e2e_cases.SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    sizes_name = "smoke" if args.quick else "full"
    reps = 1 if args.quick else args.reps
    command = "python benches/run_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])

    results, notes = {}, []
    load_before = _load()
    for case in cases(args.device, args.scenario or e2e_cases.SCENARIOS):
        try:
            r = e2e_cases.measure_in_subprocess(*case[:2], sizes_name, args.device, case[2], reps, args.max_seconds)
        except RuntimeError as e:
            r = None
            notes.append(str(e).replace("\n", " "))
        results[case] = r
        shown = "failed" if r is None else f"{r['seconds']:.3f} s/call, peak {fmt_mb(r)} MB"
        print(f"{'/'.join(case):28s} {shown}", flush=True)
    import torch  # after the cases: the parent stays small while they run

    sizes = e2e_cases.SIZES[sizes_name]
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    lines = [
        f"# End-to-end benchmarks ({device_name})",
        "",
        f"Command: `{command}`",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, python {platform.python_version()}, "
        f"load average (1/5/15 min) before {load_before}, after {_load()}.",
        f"Sizes ({sizes_name}): {sizes.visual_extractor}, {sizes.num_views} views of {sizes.image_size}px, "
        f"training batch {sizes.batch}, d_model {sizes.d_model}, {sizes.num_heads} heads, {sizes.num_layers} layers, "
        f"N {sizes.memory_size}, K {sizes.topk}, vocabulary {sizes.vocab_size}, {sizes.seq_len} tokens; "
        f"generation: beam {sizes.beam}, trigram blocking, {sizes.gen_batch} studies per call, max_len {sizes.seq_len}.",
        "",
        "- naive: the reference's cost model (memory_impl naive = the reference's ops; memory key/value "
        "projections applied per sequence to a batch-expanded memory copy; generation re-decodes the whole "
        "prefix every step). default: memory_impl auto (on CPU: the fused cpu kernels in fp32, the torch path "
        "under bf16), memory projected once, cached decoding that drops finished studies (no effect here: EOS is banned).",
        "- Training time is one iteration (forward, loss, backward, Adam amsgrad step); generation time is "
        "per study. EOS is banned in both generation runs (logit bias -inf) so both decode max_len steps, "
        "as the reference's search always does.",
        f"- Peak MB: {'max allocated' if args.device == 'cuda' else 'process RSS high-water mark'} over the warm-up "
        "and timed calls of a fresh process (model, optimizer state and inputs included).",
        "",
    ]
    lines += summary_table(results, args.device, full=not args.quick)
    lines += ["", "All cases:", ""] + detail_table(results)
    gen = [results.get(("generate", c, "fp32")) for c in ("naive", "default")]
    if all(gen):
        same = gen[0]["digest"] == gen[1]["digest"]
        lines += [
            "",
            f"Generation outputs of naive and default {'identical' if same else 'DIFFER'} "
            f"(digests {gen[0]['digest']} / {gen[1]['digest']}).",
        ]
    lines += ["", "Failed cases:", ""] + [f"- {n}" for n in notes] if notes else []
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Cost of explaining a study relative to generating its report, on one machine state.

    python benches/explain_cost.py --checkpoint RUN/checkpoint --demo-root DIR [--studies 10] [--reps 3]

For each study (demo test split), alternately times ``generate_reports`` (beam 3) and
``explain_study`` (which generates too, then runs the extra teacher-forced pass), so both see
the same machine load; prints the medians and their ratio, and the time to write the page.
Images are decoded before timing (both would pay the same for it).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--demo-root", required=True, type=Path)
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args(argv)

    import cmn
    from cmn.explain import explain_study
    from cmn.explain.html import render_page
    from cmn.inference import load_study

    bundle = cmn.load_checkpoint(args.checkpoint)
    model = bundle.model
    entries = json.loads((args.demo_root / "annotation.json").read_text())["test"][: args.studies]
    loaded = [load_study(bundle, [args.demo_root / "images" / q for q in e["image_path"]]) for e in entries]
    gen, exp, explanations = [], [], []
    with torch.inference_mode():
        for tensor, _pictures in loaded:
            model.generate(tensor[None], beam_size=args.beam_size)  # warm-up
            for _ in range(args.reps):
                t = time.perf_counter()
                model.generate(tensor[None], beam_size=args.beam_size)
                gen.append(time.perf_counter() - t)
                t = time.perf_counter()
                e = explain_study(bundle, tensor, beam_size=args.beam_size)
                exp.append(time.perf_counter() - t)
            explanations.append(e)
    t = time.perf_counter()
    render_page(explanations)
    page = (time.perf_counter() - t) / len(explanations)
    g, x = statistics.median(gen), statistics.median(exp)
    print(f"studies {len(loaded)} x {args.reps} reps, torch threads {torch.get_num_threads()}")
    print(f"generate (beam {args.beam_size}) median {g * 1e3:.1f} ms/study")
    print(f"explain_study       median {x * 1e3:.1f} ms/study  -> ratio {x / g:.2f}x")
    print(f"HTML page writing          {page * 1e3:.1f} ms/study")
    return 0


if __name__ == "__main__":
    sys.exit(main())

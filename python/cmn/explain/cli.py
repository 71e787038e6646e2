"""``cmn-explain``: generate reports and show what produced them, as one HTML page or PNG files."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cmn.cliutil import ArgumentParser, nonneg_int, positive_int, user_errors
from cmn.errors import CMNError


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-explain",
        description="Generate a report for each study and show, word by word, where the decoder looked and "
        "which memory slots the words and image regions read. Studies are grouped like cmn-generate: "
        "image files in order, as many per study as the model has views; a folder of images is one "
        "study; a folder of folders is one study each.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by cmn-train (RUN/checkpoint)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument(
        "--list", dest="list_file", help="text file: one study per line, its image paths separated by spaces"
    )
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        help="HTML file to write (--format html), or folder of PNG files (--format png)",
    )
    p.add_argument("--format", choices=("html", "png"), default="html")
    p.add_argument("--beam-size", type=positive_int(), default=3)
    p.add_argument("--block-ngram", type=nonneg_int(), default=0, help="forbid repeating any n-gram (0 = off)")
    p.add_argument("--max-len", type=positive_int(), help="maximum generated tokens (default: the model's)")
    p.add_argument("--batch-size", type=positive_int(), default=8)
    p.add_argument(
        "--image-px",
        type=positive_int(4096),
        default=320,
        help="longest side of the images inlined in the HTML page (default: 320)",
    )
    p.add_argument("--title", default="cmn explanations", help="page title (HTML)")
    p.add_argument("--device", default="auto")
    return p


def check_output(path: Path, fmt: str) -> None:
    """Fail before any work when the output cannot be written: one line naming --output."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CMNError(f"--output {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CMNError(f"--output {path}: folder {parent} is not writable")
    if fmt == "html" and path.is_dir():
        raise CMNError(f"--output {path}: is a folder; give the HTML file to write")
    if fmt == "png" and path.exists() and not path.is_dir():
        raise CMNError(f"--output {path}: is a file; --format png writes a folder")


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cmn-explain``; returns the exit status."""
    args = parser().parse_args(argv)
    check_output(args.output, args.format)

    import torch

    from cmn.checkpoint import load_checkpoint
    from cmn.explain.core import explain_batch
    from cmn.inference import collect_studies, load_study
    from cmn.runtime import select_device

    device = select_device(args.device)
    if args.format == "png":
        from cmn.viz.plot import require_matplotlib

        require_matplotlib()
    bundle = load_checkpoint(args.checkpoint, device=device)
    studies = collect_studies(args.images, args.list_file, bundle.num_views)

    explanations = []
    for start in range(0, len(studies), args.batch_size):
        chunk = studies[start : start + args.batch_size]
        loaded = [load_study(bundle, views) for _, views in chunk]
        images = torch.stack([t for t, _ in loaded]).to(device)  # (B, V, 3, S, S)
        explanations += explain_batch(
            bundle,
            images,
            display=[pics for _, pics in loaded],
            study_ids=[sid for sid, _ in chunk],
            beam_size=args.beam_size,
            block_ngram=args.block_ngram,
            max_len=args.max_len,
        )
    files = [[str(v) for v in views] for _, views in studies]
    if args.format == "html":
        from cmn.explain.html import render_page
        from cmn.fsutil import write_atomic

        subtitle = (
            f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; checkpoint {args.checkpoint} "
            f"(variant {bundle.config.variant}, {bundle.config.num_layers} decoder layers); beam {args.beam_size}"
        )
        write_atomic(
            args.output,
            render_page(explanations, files=files, title=args.title, subtitle=subtitle, image_px=args.image_px),
        )
    else:
        from cmn.explain.figures import write_figures
        from cmn.fsutil import folder_writer

        with folder_writer(args.output, replace=True) as tmp:
            write_figures(tmp, explanations)
    print(f"explained {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} -> {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``cmn-convert``: turn a released R2GenCMN checkpoint into a cmn checkpoint bundle."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cmn.cliutil import ArgumentParser, positive_int, user_errors
from cmn.config import PRESETS
from cmn.errors import ConfigError

_DATASETS = ("iu_xray", "mimic_cxr")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-convert",
        description="Convert a checkpoint of another implementation into a cmn checkpoint bundle "
        "(model.safetensors + config.json + tokenizer.json) for cmn-generate, cmn.load_checkpoint and "
        "cmn-train --init-from. Nothing in the input file is executed.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    r = sub.add_parser(
        "r2gencmn",
        help="zhjohnchan/R2GenCMN checkpoints (model_iu_xray.pth, model_mimic_cxr.pth)",
        description="Convert an R2GenCMN checkpoint. The vocabulary, which the reference never "
        "stored, is rebuilt from the annotation's train split exactly as the reference "
        "builds it; the architecture is read from the tensor shapes.",
    )
    r.add_argument("--checkpoint", required=True, type=Path, help="the reference's .pth (or a bare state dict)")
    r.add_argument("--ann-path", required=True, type=Path, help="the annotation.json the model was trained with")
    r.add_argument(
        "--dataset",
        required=True,
        choices=_DATASETS,
        help="preset: cleaning rule, vocabulary threshold, views, max length",
    )
    r.add_argument("--output", required=True, type=Path, help="bundle folder to write")
    r.add_argument("--threshold", type=positive_int(), help="vocabulary threshold (preset: IU 3, MIMIC 10)")
    r.add_argument("--max-seq-length", type=positive_int(10_000), help="generated tokens at most (IU 60, MIMIC 100)")
    r.add_argument("--num-heads", type=positive_int(), default=8, help="attention heads (not in the shapes; default 8)")
    r.add_argument("--topk", type=positive_int(), default=32, help="memory slots per query (default 32)")
    r.add_argument("--image-size", type=positive_int(4096), default=224, help="CNN input size (default 224)")
    r.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="also store the Adam state (for cmn-train --init-from); left out by default",
    )
    r.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    from cmn.checkpoint import save_checkpoint
    from cmn.convert.r2gencmn import convert, read_reference_checkpoint
    from cmn.data.annotation import load_annotation
    from cmn.model import build_model

    out: Path = args.output
    if out.exists() and not args.force:
        raise ConfigError(f"--output {out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a folder")
    preset = PRESETS[args.dataset].data
    threshold = args.threshold or preset["threshold"]
    max_len = args.max_seq_length or preset["max_seq_length"]
    splits = load_annotation(args.ann_path)
    ref = read_reference_checkpoint(args.checkpoint)
    converted = convert(
        ref,
        [s.report for s in splits["train"]],
        origin=str(args.checkpoint),
        ann=str(args.ann_path),
        dataset=args.dataset,
        clean_rule=args.dataset,
        threshold=threshold,
        num_heads=args.num_heads,
        topk=args.topk,
        max_seq_length=max_len,
        num_views=preset["num_views"],
        image_size=args.image_size,
        keep_optimizer=args.keep_optimizer,
    )
    model = build_model(converted.config)
    model.load_state_dict(converted.state)
    extra = {"optimizer": converted.optimizer} if converted.optimizer is not None else None
    save_checkpoint(out, model, converted.tokenizer, converted.data_info, meta=converted.meta, extra_states=extra)
    cfg = converted.config
    print(
        f"wrote {out}: {cfg.visual_extractor}, {cfg.num_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
        f"{cfg.num_heads} heads, memory {cfg.memory_size} top-{cfg.topk}, vocabulary {cfg.vocab_size} ids, "
        f"{converted.data_info['num_views']} view(s), max length {cfg.max_seq_length}"
        + (", optimizer state kept" if converted.optimizer is not None else "")
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

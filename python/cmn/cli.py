"""Command-line entry points: the only place that reads argv.

``cmn-train`` and ``cmn-generate``; ``cmn-eval`` and ``cmn-label`` live in
:mod:`cmn.metrics.cli`. A :class:`cmn.errors.CMNError` is printed as one ``error:`` line
with exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from cmn.config import (
    DATASETS, MEMORY_IMPLS, MODEL_VARIANTS, PRECISIONS, PRESETS, VISUAL_EXTRACTORS,
    DataConfig, ModelConfig, TrainConfig,
)
from cmn.cliutil import user_errors
from cmn.errors import CMNError, ConfigError


# ---- cmn-train ---------------------------------------------------------------------------
# flag -> (config section, field); None defaults mean "take the preset's value"
_MODEL_FLAGS = ["variant", "visual_extractor", "d_model", "d_ff", "num_heads", "num_layers", "dropout",
                "drop_prob_lm", "memory_size", "topk", "memory_impl"]
_DATA_FLAGS = ["ann_path", "image_dir", "image_size", "max_seq_length", "threshold", "batch_size",
               "num_workers", "image_cache", "demo_size"]
_TRAIN_FLAGS = ["epochs", "lr_ve", "lr_ed", "weight_decay", "step_size", "gamma", "seed", "early_stop",
                "beam_size", "block_ngram", "precision", "device", "output_dir", "resume", "trust_pickled_state",
                "visual_weights",
                "eval_max_batches", "freeze_bn", "sync_bn", "checkpoint_visual", "low_memory"]


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmn-train",
        description="Train a Cross-modal Memory Network (CMN) report generator. Without --dataset it trains on "
                    "the built-in synthetic demo data (generated on first use, nothing downloaded).",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="demo", help="preset of reference defaults (default: demo)")
    d.add_argument("--ann-path", help="R2Gen annotation.json")
    d.add_argument("--image-dir", help="folder the annotation's image paths are relative to")
    d.add_argument("--image-size", type=int, help="CNN input size (preset: 224; demo 128)")
    d.add_argument("--max-seq-length", type=int, help="tokens kept per report (IU 60, MIMIC 100)")
    d.add_argument("--threshold", type=int, help="minimum token count for the vocabulary (IU 3, MIMIC 10)")
    d.add_argument("--batch-size", type=int, help="global batch size (default 16)")
    d.add_argument("--num-workers", type=int, help="data loader worker processes (default 2)")
    d.add_argument("--image-cache", metavar="DIR", help="cache decoded, resized images here (safe across ranks)")
    d.add_argument("--demo-size", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="demo studies per split (default 700 100 100)")
    m = p.add_argument_group("model")
    m.add_argument("--model", dest="variant", choices=MODEL_VARIANTS, help="cmn (paper), mem (two memories), base")
    m.add_argument("--visual-extractor", choices=list(VISUAL_EXTRACTORS), help="CNN backbone (preset: resnet101)")
    m.add_argument("--visual-weights", help="'imagenet' (torchvision), a state-dict PATH, or 'none' (random init)")
    m.add_argument("--d-model", type=int)
    m.add_argument("--d-ff", type=int)
    m.add_argument("--num-heads", type=int)
    m.add_argument("--num-layers", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--drop-prob-lm", type=float)
    m.add_argument("--memory-size", type=int, help="memory slots N (paper 2048)")
    m.add_argument("--topk", type=int, help="memory slots kept per query K (paper 32)")
    m.add_argument("--memory-impl", choices=MEMORY_IMPLS, help="memory_query implementation (default auto)")
    t = p.add_argument_group("training")
    t.add_argument("--output-dir", help="run folder: metrics.json, log.jsonl, checkpoint/, last/")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr-ve", type=float, help="visual extractor learning rate")
    t.add_argument("--lr-ed", type=float, help="learning rate of everything else")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--step-size", type=int, help="StepLR period (epochs)")
    t.add_argument("--gamma", type=float, help="StepLR decay")
    t.add_argument("--seed", type=int)
    t.add_argument("--early-stop", type=int, help="patience in epochs on validation BLEU-4")
    t.add_argument("--beam-size", type=int)
    t.add_argument("--block-ngram", type=int, help="forbid repeating any n-gram in beam search (default 0 = off, what the reference effectively does)")
    t.add_argument("--precision", choices=PRECISIONS)
    t.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    t.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT_DIR/last")
    t.add_argument("--trust-pickled-state", action="store_true", default=None,
                   help="with --resume: read a run folder of cmn 0.1, whose trainer_state.pt is a pickle (read with "
                        "torch.load(weights_only=True), so no code in it runs; rewritten in the safe format)")
    t.add_argument("--checkpoint-visual", action="store_true", default=None,
                   help="recompute the CNN's activations in the backward: much less memory, ~1/3 more CNN time")
    t.add_argument("--low-memory", action="store_true", default=None,
                   help="= --precision bf16 --checkpoint-visual: a training step's peak memory about 1/4 of the "
                        "reference code's (see README)")
    t.add_argument("--freeze-bn", action="store_true", default=None,
                   help="keep the CNN's BatchNorm on running statistics (small per-GPU batches)")
    t.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", default=None,
                   help="under torchrun on CUDA, keep per-GPU BatchNorm statistics")
    t.add_argument("--eval-max-batches", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[DataConfig, dict[str, Any], TrainConfig]:
    """Dataclass defaults, then the dataset preset, then every flag the user gave."""
    preset = PRESETS[args.dataset]
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "visual_weights" in given and given["visual_weights"].lower() == "none":
        given["visual_weights"] = None
    if "demo_size" in given:
        given["demo_size"] = tuple(given["demo_size"])

    data_kw = {**preset.data, **{k: given[k] for k in _DATA_FLAGS if k in given}}
    data = DataConfig(dataset=args.dataset, **data_kw)
    model_kw = {**preset.model, **{k: given[k] for k in _MODEL_FLAGS if k in given}}
    model_kw["num_views"] = data.num_views
    model_kw["max_seq_length"] = data.max_seq_length
    train_kw = {**preset.train, **{k: given[k] for k in _TRAIN_FLAGS if k in given}}
    if train_kw.get("low_memory") and given.get("precision") == "fp32":
        raise ConfigError("--low-memory trains under bf16 autocast; it cannot be combined with --precision fp32")
    train_kw.setdefault("output_dir", f"runs/{args.dataset}-{model_kw.get('variant', 'cmn')}")
    train = TrainConfig(**train_kw)
    # validate model flags now (vocab_size is filled in once the vocabulary is built)
    ModelConfig(vocab_size=2, **model_kw)
    return data, model_kw, train


@user_errors
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    data, model_kw, train = configs_from_args(args)
    from cmn.train import run_training

    result = run_training(data, model_kw, train, progress=not args.no_progress, quiet=args.quiet)
    if result and not args.quiet:
        rows = [("val (best)", result["val"]), ("test", result["test"]), ("test, baseline*", result["baseline_test"])]
        keys = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"]
        print(f"{'':18}" + "".join(f"{k:>9}" for k in keys))
        for name, scores in rows:
            print(f"{name:18}" + "".join(f"{scores.get(k, float('nan')):9.4f}" for k in keys))
        print("* baseline: always writing the most frequent training report")
        print(f"best epoch {result['best_epoch']} of {result['epochs_run']}, {result['train_seconds']:.0f} s of "
              f"training; checkpoint: {train.output_dir}/checkpoint")
    return 0


# ---- cmn-generate ------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmn-generate",
        description="Write a findings report for each study. Image files are grouped in order, as many per "
                    "study as the model has views (IU X-Ray style: 2; MIMIC-CXR style: 1); a folder of images is "
                    "one study (or one per image for 1-view models); a folder of folders is one study each.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by cmn-train (RUN/checkpoint)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument("--list", dest="list_file", help="text file: one study per line, its image paths separated by spaces")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--block-ngram", type=int, default=0, help="forbid repeating any n-gram (0 = off)")
    p.add_argument("--max-len", type=int, help="maximum generated tokens (default: the model's max_seq_length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    return p


@user_errors
def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    from pathlib import Path

    from cmn.checkpoint import load_checkpoint
    from cmn.inference import generate_reports, group_studies
    from cmn.runtime import select_device

    args = generate_parser().parse_args(argv)
    if args.beam_size < 1:
        raise CMNError(f"--beam-size must be >= 1, got {args.beam_size}")
    device = select_device(args.device)
    model = load_checkpoint(args.checkpoint, device=device)
    num_views = int(model.data_info["num_views"])
    studies = group_studies(args.images, num_views)
    if args.list_file:
        try:
            lines = Path(args.list_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CMNError(f"--list {args.list_file}: cannot be read ({e})") from None
        for n, line in enumerate(lines, 1):
            paths = line.split()
            if not paths:
                continue
            if len(paths) != num_views:
                raise CMNError(f"--list {args.list_file}, line {n}: {len(paths)} image(s), but this model reads "
                               f"{num_views} per study")
            try:
                studies.extend(group_studies(paths, num_views))
            except CMNError as e:
                raise CMNError(f"--list {args.list_file}, line {n}: {e}") from None
    if not studies:
        raise CMNError("no studies given: pass IMAGE paths or folders, or --list FILE")
    reports = generate_reports(model, [views for _, views in studies], beam_size=args.beam_size,
                               block_ngram=args.block_ngram, batch_size=args.batch_size, device=device,
                               max_len=args.max_len)
    for (sid, views), report in zip(studies, reports):
        if args.format == "jsonl":
            print(json.dumps({"id": sid, "images": [str(v) for v in views], "report": report}))
        else:
            print(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())

"""Command-line entry points: the only place that reads argv.

``cmn-train`` and ``cmn-generate``; ``cmn-eval`` and ``cmn-label`` live in
:mod:`cmn.metrics.cli`. A :class:`cmn.errors.CMNError` is printed as one ``error:`` line
with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from cmn.cliutil import ArgumentParser, bounded, positive_int, user_errors
from cmn.config import (
    ARCHITECTURE_FIELDS,
    DATASETS,
    DECODINGS,
    MAX_TOKENS,
    MEMORY_IMPLS,
    MODEL_VARIANTS,
    MONITORS,
    PRECISIONS,
    PRESETS,
    VISUAL_EXTRACTORS,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from cmn.errors import CMNError, ConfigError

# ---- cmn-train ---------------------------------------------------------------------------
# flag -> (config section, field); None defaults mean "take the preset's value"
_MODEL_FLAGS = [
    "variant",
    "visual_extractor",
    "d_model",
    "d_ff",
    "num_heads",
    "num_layers",
    "dropout",
    "attention_dropout",
    "drop_prob_lm",
    "memory_size",
    "topk",
    "memory_impl",
    "joint_view_bn",
]
_DATA_FLAGS = [
    "ann_path",
    "image_dir",
    "image_size",
    "max_seq_length",
    "threshold",
    "batch_size",
    "num_workers",
    "image_cache",
    "intensity_jitter",
    "demo_size",
]
_TRAIN_FLAGS = [
    "epochs",
    "lr_ve",
    "lr_ed",
    "weight_decay",
    "step_size",
    "gamma",
    "seed",
    "monitor",
    "early_stop",
    "beam_size",
    "block_ngram",
    "precision",
    "device",
    "output_dir",
    "resume",
    "overwrite",
    "trust_pickled_state",
    "init_from",
    "decode",
    "visual_weights",
    "visual_warmup_epochs",
    "visual_warmup_lr",
    "eval_max_batches",
    "freeze_bn",
    "sync_bn",
    "checkpoint_visual",
    "low_memory",
]


def train_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-train",
        description="Train a Cross-modal Memory Network (CMN) report generator. Without --dataset it trains on "
        "the built-in synthetic demo data (generated on first use, nothing downloaded).",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="demo", help="preset of reference defaults (default: demo)")
    d.add_argument("--ann-path", help="R2Gen annotation.json")
    d.add_argument("--image-dir", help="folder the annotation's image paths are relative to")
    d.add_argument(
        "--image-size",
        type=bounded("image_size"),
        help=f"CNN input size (preset: 224; demo {PRESETS['demo'].data['image_size']})",
    )
    d.add_argument("--max-seq-length", type=bounded("max_seq_length"), help="tokens kept per report (IU 60, MIMIC 100)")
    d.add_argument(
        "--threshold", type=bounded("threshold"), help="minimum token count for the vocabulary (IU 3, MIMIC 10)"
    )
    d.add_argument("--batch-size", type=bounded("batch_size"), help="global batch size (default 16)")
    d.add_argument("--num-workers", type=bounded("num_workers"), help="data loader worker processes (default 2)")
    d.add_argument("--image-cache", metavar="DIR", help="cache decoded, resized images here (safe across ranks)")
    d.add_argument(
        "--intensity-jitter",
        type=bounded("intensity_jitter"),
        metavar="J",
        help="training images: brightness and contrast scaled by factors in [1-J, 1+J] (0 = off, the "
        f"reference's way; demo preset: {PRESETS['demo'].data.get('intensity_jitter', 0)})",
    )
    d.add_argument(
        "--demo-size",
        type=positive_int(1_000_000),
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="demo studies per split (default 700 100 100)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", dest="variant", choices=MODEL_VARIANTS, help="cmn (paper), mem (two memories), base")
    m.add_argument("--visual-extractor", choices=list(VISUAL_EXTRACTORS), help="CNN backbone (preset: resnet101)")
    m.add_argument("--visual-weights", help="'imagenet' (torchvision), a state-dict PATH, or 'none' (random init)")
    m.add_argument("--d-model", type=bounded("d_model"))
    m.add_argument("--d-ff", type=bounded("d_ff"))
    m.add_argument("--num-heads", type=bounded("num_heads"))
    m.add_argument("--num-layers", type=bounded("num_layers"))
    m.add_argument(
        "--dropout",
        type=bounded("dropout"),
        help="dropout on residual branches, in the feed-forward and after positional encodings (0.1)",
    )
    m.add_argument(
        "--attention-dropout",
        type=bounded("attention_dropout"),
        help="dropout on attention and memory-selection probabilities (0.1: the reference fixes it)",
    )
    m.add_argument("--drop-prob-lm", type=bounded("drop_prob_lm"), help="dropout after the visual projection (0.5)")
    m.add_argument(
        "--joint-view-bn",
        action="store_true",
        default=None,
        help="CNN BatchNorm statistics over all views of a batch at once (default: per view, as the "
        "reference's one CNN call per view)",
    )
    m.add_argument("--memory-size", type=bounded("memory_size"), help="memory slots N (paper 2048)")
    m.add_argument("--topk", type=bounded("topk"), help="memory slots kept per query K (paper 32)")
    m.add_argument("--memory-impl", choices=MEMORY_IMPLS, help="memory_query implementation (default auto)")
    t = p.add_argument_group("training")
    t.add_argument("--output-dir", help="run folder: metrics.json, log.jsonl, checkpoint/, last/")
    t.add_argument("--epochs", type=bounded("epochs"))
    t.add_argument("--lr-ve", type=bounded("lr_ve"), help="visual extractor learning rate")
    t.add_argument("--lr-ed", type=bounded("lr_ed"), help="learning rate of everything else")
    t.add_argument(
        "--visual-warmup-epochs",
        type=bounded("visual_warmup_epochs"),
        help="first train the CNN this many epochs on the CheXpert labels of the training reports "
        "(0 = off, the reference's way; demo preset: "
        f"{PRESETS['demo'].train.get('visual_warmup_epochs', 0)})",
    )
    t.add_argument("--visual-warmup-lr", type=bounded("visual_warmup_lr"), help="Adam learning rate of the warm-up")
    t.add_argument("--weight-decay", type=bounded("weight_decay"))
    t.add_argument("--step-size", type=bounded("step_size"), help="StepLR period (epochs)")
    t.add_argument("--gamma", type=bounded("gamma"), help="StepLR decay")
    t.add_argument("--seed", type=bounded("seed"))
    t.add_argument(
        "--monitor",
        choices=MONITORS,
        help="validation score that picks the best checkpoint and drives --early-stop (the reference: "
        f"BLEU_4; demo preset: {PRESETS['demo'].train.get('monitor', 'BLEU_4')}; CE_F1 needs a preset that "
        "scores clinical efficacy)",
    )
    t.add_argument("--early-stop", type=bounded("early_stop"), help="patience in epochs on the --monitor score")
    t.add_argument("--beam-size", type=bounded("beam_size"))
    t.add_argument(
        "--block-ngram",
        type=bounded("block_ngram"),
        help="forbid repeating any n-gram in beam search (default 0 = off, what the reference effectively does)",
    )
    t.add_argument("--precision", choices=PRECISIONS)
    t.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    t.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT_DIR/last")
    t.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="delete the run already in OUTPUT_DIR and start a new one (default: refuse)",
    )
    t.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from a checkpoint bundle (e.g. one written by cmn-convert): its weights, vocabulary "
        "and architecture, and its optimizer state if it carries one",
    )
    t.add_argument(
        "--decode",
        choices=DECODINGS,
        help="beam search for validation/test: cmn (default) or reference (the reference code's, exactly)",
    )
    t.add_argument(
        "--trust-pickled-state",
        action="store_true",
        default=None,
        help="with --resume: read a run folder of cmn 0.1, whose trainer_state.pt is a pickle (read with "
        "torch.load(weights_only=True), so no code in it runs; rewritten in the safe format)",
    )
    t.add_argument(
        "--checkpoint-visual",
        action="store_true",
        default=None,
        help="recompute the CNN's activations in the backward: much less memory, ~1/3 more CNN time",
    )
    t.add_argument(
        "--low-memory",
        action="store_true",
        default=None,
        help="= --precision bf16 --checkpoint-visual: a training step's peak memory about 1/4 of the "
        "reference code's (see README)",
    )
    t.add_argument(
        "--freeze-bn",
        action="store_true",
        default=None,
        help="keep the CNN's BatchNorm on running statistics (small per-GPU batches)",
    )
    t.add_argument(
        "--no-sync-bn",
        dest="sync_bn",
        action="store_false",
        default=None,
        help="under torchrun on CUDA, keep per-GPU BatchNorm statistics",
    )
    t.add_argument("--eval-max-batches", type=bounded("eval_max_batches"), help=argparse.SUPPRESS)
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
        if not preset.data.get("demo_size"):
            raise ConfigError(f"--demo-size: only for --dataset demo (this run reads {args.dataset} data)")
        given["demo_size"] = tuple(given["demo_size"])

    data_kw = {**preset.data, **{k: given[k] for k in _DATA_FLAGS if k in given}}
    base_model = dict(preset.model)
    if "init_from" in given:
        base_model, data_kw = _init_from_defaults(given, base_model, data_kw)
    data = DataConfig(dataset=args.dataset, **data_kw)
    model_kw = {**base_model, **{k: given[k] for k in _MODEL_FLAGS if k in given}}
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


def _findings_table(model: dict[str, Any], baseline: dict[str, Any]) -> str:
    """The demo's per-finding results against the drawn truth (test split)."""
    lines = [
        "",
        "test reports vs what the demo images show (drawn truth):",
        f"{'finding':16}{'F1':>8}{'P':>8}{'R':>8}{'side ok':>10}{'support':>9}{'baseline F1':>13}",
    ]
    for name, row in model.items():
        if name == "macro_f1":
            continue
        side = "-" if row.get("laterality") is None else f"{row['laterality']:.2f}"
        lines.append(
            f"{name:16}{row['f1']:8.3f}{row['precision']:8.3f}{row['recall']:8.3f}{side:>10}"
            f"{int(row['support']):9d}{baseline[name]['f1']:13.3f}"
        )
    lines.append(f"{'macro':16}{model['macro_f1']['f1']:8.3f}{'':34}{baseline['macro_f1']['f1']:13.3f}")
    return "\n".join(lines)


def _init_from_defaults(
    given: dict[str, Any], model: dict[str, Any], data: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """With --init-from, the bundle's architecture replaces the preset's; a flag that asks for
    another architecture is an error (its weights would not fit)."""
    from cmn.checkpoint import read_config

    if given.get("resume"):
        raise ConfigError("--init-from starts a new run; --resume continues one: give only one of them")
    try:
        saved = read_config(given["init_from"])
    except CMNError as e:
        raise ConfigError(f"--init-from {e}") from None
    try:
        arch = {k: saved["model"][k] for k in ARCHITECTURE_FIELDS}
        views = int(saved["data"]["num_views"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--init-from {given['init_from']}: config.json lacks {e}") from None
    clash = {k: (arch[k], given[k]) for k in ARCHITECTURE_FIELDS if k in given and given[k] != arch[k]}
    if clash:
        desc = ", ".join(f"{k}: {a!r} in the checkpoint vs {b!r} asked" for k, (a, b) in sorted(clash.items()))
        raise ConfigError(f"--init-from {given['init_from']}: its weights have another architecture ({desc})")
    if data.get("num_views", views) != views:
        raise ConfigError(
            f"--init-from {given['init_from']}: the model reads {views} view(s) per study, this "
            f"dataset {data['num_views']}"
        )
    return {**model, **arch}, data


@user_errors
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    data, model_kw, train = configs_from_args(args)
    from cmn.train import run_training

    result = run_training(data, model_kw, train, progress=not args.no_progress, quiet=args.quiet)
    if result and not args.quiet:
        full = {k[:-5]: v for k, v in result["test"].items() if k.endswith("_full")}
        rows = [
            ("val (best)", result["val"]),
            ("test", result["test"]),
            ("test, full refs**", full),
            ("test, baseline*", result["baseline_test"]),
        ]
        keys = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"]
        print(f"{'':18}" + "".join(f"{k:>9}" for k in keys))
        for name, scores in rows:
            print(f"{name:18}" + "".join(f"{scores.get(k, float('nan')):9.4f}" for k in keys))
        print("* baseline: always writing the most frequent training report")
        print("** references not cut to --max-seq-length tokens (the published protocol cuts them)")
        if "demo_findings" in result:
            print(_findings_table(result["demo_findings"], result["baseline_demo_findings"]))
        print(
            f"best epoch {result['best_epoch']} of {result['epochs_run']}, {result['train_seconds']:.0f} s of "
            f"training; checkpoint: {train.output_dir}/checkpoint"
        )
    return 0


# ---- cmn-generate ------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-generate",
        description="Write a findings report for each study. Image files are grouped in order, as many per "
        "study as the model has views (IU X-Ray style: 2; MIMIC-CXR style: 1); a folder of images is "
        "one study (or one per image for 1-view models); a folder of folders is one study each.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by cmn-train (RUN/checkpoint)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument(
        "--list", dest="list_file", help="text file: one study per line, its image paths separated by spaces"
    )
    p.add_argument(
        "--annotation",
        type=Path,
        help="annotation.json: generate for every study of --split (images under --image-dir); jsonl "
        "records then carry the references too, ready for cmn-eval",
    )
    p.add_argument("--image-dir", type=Path, help="with --annotation: folder its image paths are relative to")
    p.add_argument("--split", default="test", help="with --annotation: which split (default test)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--beam-size", type=bounded("beam_size"), default=3)
    p.add_argument(
        "--block-ngram", type=bounded("block_ngram"), default=0, help="forbid repeating any n-gram (0 = off)"
    )
    p.add_argument(
        "--decode",
        choices=DECODINGS,
        default="cmn",
        help="beam search: cmn (default: refills beams, stops when no beam can win) or reference (the "
        "reference code's, step for step; for identical outputs from converted checkpoints)",
    )
    p.add_argument(
        "--max-len",
        type=positive_int(MAX_TOKENS),
        help="maximum generated tokens (default: the model's max_seq_length)",
    )
    p.add_argument("--batch-size", type=positive_int(100_000), default=8)
    p.add_argument("--device", default="auto")
    return p


@user_errors
def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    from cmn.checkpoint import load_checkpoint
    from cmn.inference import collect_studies, generate_reports
    from cmn.runtime import select_device

    args = generate_parser().parse_args(argv)
    if args.decode == "reference" and (args.beam_size < 2 or args.block_ngram):
        raise CMNError(
            "--decode reference needs --beam-size >= 2 and no --block-ngram (the reference samples at "
            "random with beam 1, and its trigram blocking does nothing with beams)"
        )
    device = select_device(args.device)
    bundle = load_checkpoint(args.checkpoint, device=device)
    num_views = bundle.num_views
    studies: list = []
    if args.images or args.list_file or args.annotation is None:
        studies = collect_studies(args.images, args.list_file, num_views)
    references: dict[str, dict[str, str]] = {}
    if args.annotation is not None:
        found, references = _annotation_studies(args.annotation, args.image_dir, args.split, bundle)
        studies.extend(found)
    reports = generate_reports(
        bundle,
        [views for _, views in studies],
        beam_size=args.beam_size,
        block_ngram=args.block_ngram,
        batch_size=args.batch_size,
        device=device,
        max_len=args.max_len,
        decode=args.decode,
    )
    for (sid, views), report in zip(studies, reports):
        if args.format == "jsonl":
            record = {"id": sid, "images": [str(v) for v in views], "report": report}
            if sid in references:
                record.update(prediction=report, **references[sid])
            print(json.dumps(record))
        else:
            print(report)
    return 0


def _annotation_studies(ann: Path, image_dir: Optional[Path], split: str, bundle: Any):
    """Studies of one annotation split, and per id the references as cmn-train scores them:
    ``reference`` (cut to the model's max_seq_length, through its vocabulary) and
    ``reference_full`` (the whole cleaned report)."""
    from cmn.data.annotation import load_annotation
    from cmn.text import clean_reports

    if image_dir is None:
        raise ConfigError("--annotation needs --image-dir (the folder its image paths are relative to)")
    entries = load_annotation(ann, (split,))[split]
    tok, max_len, num_views = bundle.tokenizer, bundle.max_seq_length, bundle.num_views
    studies, refs = [], {}
    cut = tok.encode_batch([e.report for e in entries], max_len)  # (n, L)
    for e, row, full in zip(entries, cut, clean_reports([e.report for e in entries], tok.dataset)):
        if len(e.image_paths) != num_views:
            raise ConfigError(
                f"--annotation {ann}: study {e.id!r} has {len(e.image_paths)} image(s); the model reads {num_views}"
            )
        studies.append((e.id, tuple(image_dir / p for p in e.image_paths)))
        refs[e.id] = {"reference": tok.decode(row[1:]), "reference_full": full}
    return studies, refs


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())

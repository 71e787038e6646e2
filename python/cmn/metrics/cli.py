"""``cmn-eval`` (score predicted reports) and ``cmn-label`` (label reports, CheXpert CSV).

Both print ``error: <message>`` and exit with status 2 on a :class:`cmn.errors.CMNError`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmn.cliutil import ArgumentParser, positive_int, user_errors
from cmn.config import PRESETS
from cmn.errors import DataError
from cmn.fsutil import write_atomic
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS, SECTION_MODES, UNCERTAIN_POLICIES, label_reports
from cmn.metrics.evaluate import ce_flat, clinical_scores
from cmn.metrics.nlg import NLGScorer, _as_coco

REFERENCE_MODES = ("published", "full", "both")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


_CSV_FIELD_LIMIT = 1 << 28  # a report is text, not a table: allow long fields (csv's default is 131,072)


def _csv_rows(path: Path, required: Sequence[str]) -> list[dict]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    try:
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})")
        return list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file (line {reader.line_num}: {exc})") from None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def read_predictions(
    path: Path, reference_fields: Sequence[str] = ("reference",)
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Read ``id``, ``prediction`` and the ``reference_fields`` from a JSONL or CSV file.

    Returns (predictions by id, {field: texts by id})."""
    required = ("id", "prediction", *reference_fields)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, required)
    else:
        rows = _jsonl_rows(path)
    if not rows:
        raise DataError(f"{path}: no predictions (the file is empty)")
    preds: dict[str, str] = {}
    refs: dict[str, dict[str, str]] = {f: {} for f in reference_fields}
    for n, row in enumerate(rows, 1):
        missing = [k for k in required if k not in row]
        if missing:
            hint = (
                " (cmn-train writes it; pass --references published to score without it)"
                if ("reference_full" in missing)
                else ""
            )
            raise DataError(f"{path}: record {n} lacks field(s) {', '.join(missing)}{hint}")
        key = str(row["id"])
        if key in preds:
            raise DataError(f"{path}: duplicate id {key!r} (record {n})")
        for field in required[1:]:
            if not isinstance(row[field], str):
                raise DataError(f"{path}: record {n} ({key!r}): {field} must be text")
            if not _is_unicode(row[field]):
                raise DataError(
                    f"{path}: record {n} ({key!r}): {field} holds an unpaired surrogate (not Unicode "
                    "text; was it written from broken bytes?)"
                )
        preds[key] = row["prediction"]
        for f in reference_fields:
            refs[f][key] = row[f]
    return preds, refs


def references_from_annotation(
    path: Path, split: str, dataset: str, *, full: bool, threshold: int = 0, max_seq_length: int = 0
) -> dict[str, str]:
    """Reference reports of one split of an R2Gen-style annotation.json.

    ``full``: the whole cleaned report. Otherwise the published protocol, as the reference code
    and ``cmn-train`` score: the vocabulary is built from the annotation's train split with
    ``threshold``, and each report is encoded, cut to ``max_seq_length`` tokens (BOS and EOS
    included) and decoded back (out-of-vocabulary words become ``<unk>``)."""
    from cmn.data.annotation import load_annotation
    from cmn.text import Tokenizer, clean_reports  # lazy: native module

    splits = load_annotation(path, ("train", split) if not full and split != "train" else (split,), images=False)
    studies = splits[split]
    if full:
        return dict(zip((s.id for s in studies), clean_reports([s.report for s in studies], dataset)))
    tok = Tokenizer.build([s.report for s in splits["train"]], threshold, dataset)
    ids = tok.encode_batch([s.report for s in studies], max_seq_length)  # (n, L)
    return {s.id: tok.decode(row[1:]) for s, row in zip(studies, ids)}


def _fmt(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def format_table(scores: dict, ce: dict | None) -> str:
    """Plain-text table of the scores (and the per-observation CE table)."""
    lines = [f"{'metric':<20}{'value':>10}"]
    for key, value in scores.items():
        lines.append(f"{key:<20}{_fmt(value):>10}")
    if ce is not None:
        lines += ["", f"{'observation':<28}{'P':>8}{'R':>8}{'F1':>8}{'support':>9}"]
        for name, row in ce["per_observation"].items():
            lines.append(
                f"{name:<28}{row['precision']:>8.4f}{row['recall']:>8.4f}{row['f1']:>8.4f}{row['support']:>9d}"
            )
    return "\n".join(lines)


def _eval_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-eval",
        description="Score predicted reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical efficacy.",
    )
    p.add_argument(
        "--predictions",
        required=True,
        type=Path,
        help="JSONL of {id, prediction, reference} (or CSV with those columns); "
        "with --annotation only id and prediction are needed",
    )
    p.add_argument("--annotation", type=Path, help="annotation.json to take (and clean) references from")
    p.add_argument("--split", default="test", help="annotation split with the references (default: test)")
    p.add_argument(
        "--dataset",
        choices=("iu_xray", "mimic_cxr"),
        default="mimic_cxr",
        help="cleaning rules, vocabulary threshold and max length for annotation references (default: mimic_cxr)",
    )
    p.add_argument(
        "--references",
        choices=REFERENCE_MODES,
        default="published",
        help="published (default): references cut to max_seq_length tokens and mapped through the "
        "training vocabulary, as the reference code and the paper score; full: the whole cleaned "
        "report (scores get a _full suffix); both",
    )
    p.add_argument("--threshold", type=positive_int(), help="with --annotation: vocabulary threshold (IU 3, MIMIC 10)")
    p.add_argument("--max-seq-length", type=positive_int(), help="with --annotation: tokens kept (IU 60, MIMIC 100)")
    p.add_argument("--output", type=Path, help="write all scores as JSON here")
    p.add_argument(
        "--clinical",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute clinical efficacy with the built-in CheXpert-style labeler (default: on)",
    )
    p.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="negative",
        help="how uncertain CE labels count (default: negative, as the reference code)",
    )
    p.add_argument(
        "--meteor", action=argparse.BooleanOptionalAction, default=True, help="compute METEOR (needs java; default: on)"
    )
    p.add_argument(
        "--html",
        type=Path,
        help="also write a page: prediction and reference side by side per study, "
        "findings the labeler disagrees on highlighted, sortable by BLEU-4",
    )
    return p


def _run_eval(args: argparse.Namespace) -> int:
    modes = ("published", "full") if args.references == "both" else (args.references,)
    fields = {"published": "reference", "full": "reference_full"}
    preds, from_file = read_predictions(args.predictions, () if args.annotation else [fields[m] for m in modes])
    if args.annotation is not None:
        from cmn.data.annotation import load_annotation

        known = {s.id for s in load_annotation(args.annotation, (args.split,), images=False)[args.split]}
        unknown = [k for k in preds if k not in known]
        if unknown:
            raise DataError(
                f"{args.predictions}: {len(unknown)} id(s) not in split {args.split!r} of {args.annotation} "
                f"(e.g. {unknown[0]!r})"
            )
    references: dict[str, dict[str, str]] = {}
    for mode in modes:
        if args.annotation is None:
            refs = from_file[fields[mode]]
        else:
            preset = PRESETS[args.dataset].data
            refs = references_from_annotation(
                args.annotation,
                args.split,
                args.dataset,
                full=mode == "full",
                threshold=args.threshold or preset["threshold"],
                max_seq_length=args.max_seq_length or preset["max_seq_length"],
            )
            refs = {k: refs[k] for k in preds}
        try:
            _as_coco(refs, preds)
        except DataError as exc:
            raise DataError(f"{args.predictions}: {exc}") from None
        references[mode] = refs
    scores: dict = {}
    ce = None
    for mode, refs in references.items():
        suffix = "" if mode == "published" else "_full"
        part, part_ce = _score(args, refs, preds)
        scores.update({k + suffix: v for k, v in part.items()})
        ce = part_ce if ce is None else ce
    print(format_table(scores, ce))
    if args.html is not None:
        from cmn.viz.eval_page import write_eval_page

        write_eval_page(args.html, references[modes[0]], preds, scores, uncertain=args.uncertain)
    if args.output is not None:
        payload = {
            "n": len(preds),
            "references": args.references,
            "scores": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()},
        }
        if ce is not None:
            payload["clinical"] = {"uncertain": args.uncertain, **ce}
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
        write_atomic(args.output, json.dumps(payload, indent=2) + "\n")
    return 0


def _score(args: argparse.Namespace, refs: dict[str, str], preds: dict[str, str]) -> tuple[dict, dict | None]:
    """NLG scores (and CE) of one reference set; CE details for the table."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with NLGScorer(meteor=args.meteor) as scorer:
            scores = scorer(refs, preds)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    ce = None
    if args.clinical:
        ce = clinical_scores(refs, preds, uncertain=args.uncertain)
        scores.update(ce_flat(ce))
    return scores, ce


@user_errors
def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmn-eval``; returns the exit status."""
    return _run_eval(_eval_parser().parse_args(argv))


def _label_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-label",
        description="Label reports for the 14 CheXpert observations (offline, rule-based).",
    )
    p.add_argument("input", type=Path, help="text file with one report per line, or a CSV with a 'report' column")
    p.add_argument("--output", required=True, type=Path, help="CSV to write: Reports, then the 14 observations")
    p.add_argument(
        "--sections",
        choices=SECTION_MODES,
        default="auto",
        help="auto (default): in full reports with headings, label only FINDINGS and IMPRESSION "
        "(text without headings is labeled whole); all: label the whole text",
    )
    return p


def read_reports(path: Path) -> list[str]:
    """Reports from a CSV with a ``report`` column or a text file with one per line."""
    if path.suffix.lower() == ".csv":
        reports = [row["report"] or "" for row in _csv_rows(path, ("report",))]
    else:
        reports = [line for line in _read_text(path).splitlines() if line.strip()]
    if not reports:
        raise DataError(f"{path}: no reports (the file is empty)")
    return reports


def write_labels(path: Path, reports: Sequence[str], labels: np.ndarray) -> None:
    """CheXpert labeler layout: ``Reports`` then one column per observation, 1/0/-1/empty.
    Written atomically: a failed run leaves no partial CSV."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(("Reports",) + CHEXPERT_OBSERVATIONS)
    for report, row in zip(reports, labels):
        writer.writerow([report] + ["" if np.isnan(v) else str(int(v)) for v in row])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None
    write_atomic(path, buf.getvalue())


@user_errors
def label_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmn-label``; returns the exit status."""
    args = _label_parser().parse_args(argv)
    reports = read_reports(args.input)
    write_labels(args.output, reports, label_reports(reports, sections=args.sections))
    print(f"labeled {len(reports)} reports -> {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())

"""``cmn-eval`` (score predicted reports) and ``cmn-label`` (label reports, CheXpert CSV).

Both print ``error: <message>`` and exit with status 2 on a :class:`cmn.errors.CMNError`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from cmn.cliutil import user_errors
from cmn.errors import DataError
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS, UNCERTAIN_POLICIES, label_reports
from cmn.metrics.evaluate import ce_flat, clinical_scores
from cmn.metrics.nlg import NLGScorer, _as_coco


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def _csv_rows(path: Path, required: Sequence[str]) -> list[dict]:
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    columns = reader.fieldnames or []
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})")
    return list(reader)


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


def read_predictions(path: Path, need_reference: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Read ``id``, ``prediction`` (and ``reference``) from a JSONL or CSV file."""
    required = ("id", "prediction", "reference") if need_reference else ("id", "prediction")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, required)
    else:
        rows = _jsonl_rows(path)
    if not rows:
        raise DataError(f"{path}: no predictions (the file is empty)")
    preds: dict[str, str] = {}
    refs: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}: record {n} lacks field(s) {', '.join(missing)}")
        key = str(row["id"])
        if key in preds:
            raise DataError(f"{path}: duplicate id {key!r} (record {n})")
        for field in required[1:]:
            if not isinstance(row[field], str):
                raise DataError(f"{path}: record {n} ({key!r}): {field} must be text")
        preds[key] = row["prediction"]
        if need_reference:
            refs[key] = row["reference"]
    return preds, refs


def references_from_annotation(path: Path, split: str, dataset: str) -> dict[str, str]:
    """Cleaned reference reports of one split of an R2Gen-style annotation.json."""
    try:
        ann = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(ann, dict) or split not in ann:
        raise DataError(f"{path}: no split {split!r} (found: {', '.join(ann) if isinstance(ann, dict) else 'none'})")
    from cmn.text import clean_reports  # lazy: native module

    ids, reports = [], []
    for n, entry in enumerate(ann[split]):
        if not isinstance(entry, dict) or "id" not in entry or "report" not in entry:
            raise DataError(f"{path}: {split}[{n}] lacks 'id' or 'report'")
        ids.append(str(entry["id"]))
        reports.append(entry["report"])
    return dict(zip(ids, clean_reports(reports, dataset)))


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
    p = argparse.ArgumentParser(
        prog="cmn-eval",
        description="Score predicted reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical efficacy.",
    )
    p.add_argument("--predictions", required=True, type=Path,
                   help="JSONL of {id, prediction, reference} (or CSV with those columns); "
                        "with --annotation only id and prediction are needed")
    p.add_argument("--annotation", type=Path, help="annotation.json to take (and clean) references from")
    p.add_argument("--split", default="test", help="annotation split with the references (default: test)")
    p.add_argument("--dataset", choices=("iu_xray", "mimic_cxr"), default="mimic_cxr",
                   help="cleaning rules for annotation references (default: mimic_cxr)")
    p.add_argument("--output", type=Path, help="write all scores as JSON here")
    p.add_argument("--clinical", action=argparse.BooleanOptionalAction, default=True,
                   help="compute clinical efficacy with the built-in CheXpert-style labeler (default: on)")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="negative",
                   help="how uncertain CE labels count (default: negative, as the reference code)")
    p.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="compute METEOR (needs java; default: on)")
    p.add_argument("--html", type=Path, help="also write a page: prediction and reference side by side per study, "
                                             "findings the labeler disagrees on highlighted, sortable by BLEU-4")
    return p


def _run_eval(args: argparse.Namespace) -> int:
    preds, refs = read_predictions(args.predictions, need_reference=args.annotation is None)
    if args.annotation is not None:
        refs = references_from_annotation(args.annotation, args.split, args.dataset)
        unknown = [k for k in preds if k not in refs]
        if unknown:
            raise DataError(
                f"{args.predictions}: {len(unknown)} id(s) not in split {args.split!r} of {args.annotation} "
                f"(e.g. {unknown[0]!r})"
            )
        refs = {k: refs[k] for k in preds}
    try:
        _as_coco(refs, preds)
    except DataError as exc:
        raise DataError(f"{args.predictions}: {exc}") from None
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
    print(format_table(scores, ce))
    if args.html is not None:
        from cmn.viz.eval_page import write_eval_page

        write_eval_page(args.html, refs, preds, scores, uncertain=args.uncertain)
    if args.output is not None:
        payload = {
            "n": len(preds),
            "scores": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()},
        }
        if ce is not None:
            payload["clinical"] = {"uncertain": args.uncertain, **ce}
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
    return 0


@user_errors
def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmn-eval``; returns the exit status."""
    return _run_eval(_eval_parser().parse_args(argv))


def _label_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmn-label",
        description="Label reports for the 14 CheXpert observations (offline, rule-based).",
    )
    p.add_argument("input", type=Path, help="text file with one report per line, or a CSV with a 'report' column")
    p.add_argument("--output", required=True, type=Path, help="CSV to write: Reports, then the 14 observations")
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
    """CheXpert labeler layout: ``Reports`` then one column per observation, 1/0/-1/empty."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("Reports",) + CHEXPERT_OBSERVATIONS)
            for report, row in zip(reports, labels):
                writer.writerow([report] + ["" if np.isnan(v) else str(int(v)) for v in row])
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None


@user_errors
def label_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cmn-label``; returns the exit status."""
    args = _label_parser().parse_args(argv)
    reports = read_reports(args.input)
    write_labels(args.output, reports, label_reports(reports))
    print(f"labeled {len(reports)} reports -> {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())

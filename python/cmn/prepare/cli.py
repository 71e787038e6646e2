"""``cmn-prepare``: R2Gen ``annotation.json`` (and the image folder) from the public downloads
or from a user's own table. One subcommand per source: ``iu_xray``, ``mimic_cxr``, ``csv``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cmn.cliutil import ArgumentParser, nonneg_int, user_errors
from cmn.errors import ConfigError
from cmn.prepare import iu_xray, mimic_cxr, table
from cmn.prepare.common import SECTIONS, check_output, print_lines


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be in [0, 1]")
    return value


def _views(text: str) -> tuple[str, ...]:
    views = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    if not views:
        raise argparse.ArgumentTypeError("give at least one ViewPosition, e.g. PA,AP")
    return views


def _columns(text: str) -> tuple[str, ...]:
    cols = tuple(c.strip() for c in text.split(",") if c.strip())
    if not cols:
        raise argparse.ArgumentTypeError("give at least one column name")
    return cols


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="cmn-prepare",
        description="Write an R2Gen annotation.json (and the image folder cmn-train reads) from the IU X-Ray "
        "(Open-i) or MIMIC-CXR downloads, or from your own CSV table. Prints what was kept and "
        "dropped and why; the output folder appears only when complete.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="{iu_xray,mimic_cxr,csv}")

    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--output",
        "-o",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder: annotation.json, images/, dropped.tsv",
    )
    common.add_argument("--force", action="store_true", help="replace an existing output folder")
    common.add_argument(
        "--check", action="store_true", help="only verify DIR/annotation.json against DIR/images (nothing is written)"
    )
    common.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable report or missing image instead of skipping it",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    splitting = ArgumentParser(add_help=False)
    splitting.add_argument("--seed", type=nonneg_int(), default=0, help="seed of the drawn split (default 0)")
    splitting.add_argument(
        "--split-fractions",
        type=_fraction,
        nargs=3,
        default=[0.7, 0.1, 0.2],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the drawn split (default 0.7 0.1 0.2)",
    )
    sections = ArgumentParser(add_help=False)
    sections.add_argument(
        "--section",
        choices=SECTIONS,
        default="findings",
        help="report text: findings (default, as published), impression, or both",
    )
    sections.add_argument(
        "--impression-fallback",
        action="store_true",
        help="with --section findings: a report without findings uses its impression",
    )

    iu = sub.add_parser(
        "iu_xray",
        parents=[common, splitting, sections],
        help="IU X-Ray from the Open-i NLMCXR_reports.tgz and NLMCXR_png.tgz",
        description="IU X-Ray from the Open-i downloads, selected as the published R2Gen annotation (docs/data.md).",
    )
    iu.add_argument("--reports", type=Path, metavar="TGZ|DIR", help="NLMCXR_reports.tgz or its unpacked folder")
    iu.add_argument("--images", type=Path, metavar="TGZ|DIR", help="NLMCXR_png.tgz or its unpacked folder")
    iu.add_argument(
        "--split-from",
        type=Path,
        metavar="JSON",
        help="take each study's split from this annotation (by id); other studies are dropped",
    )

    mimic = sub.add_parser(
        "mimic_cxr",
        parents=[common, sections],
        help="MIMIC-CXR from the PhysioNet reports zip, split/metadata CSVs and MIMIC-CXR-JPG",
        description="MIMIC-CXR with the official split, one entry per image, as the "
        "published R2Gen annotation (docs/data.md).",
    )
    mimic.add_argument("--reports", type=Path, metavar="ZIP|DIR", help="mimic-cxr-reports.zip or its unpacked folder")
    mimic.add_argument("--split", type=Path, metavar="CSV", help="mimic-cxr-2.0.0-split.csv.gz")
    mimic.add_argument("--metadata", type=Path, metavar="CSV", help="mimic-cxr-2.0.0-metadata.csv.gz (for --views)")
    mimic.add_argument(
        "--images", type=Path, metavar="DIR", help="MIMIC-CXR-JPG folder holding files/p10/... (or p10/... directly)"
    )
    mimic.add_argument(
        "--views",
        type=_views,
        metavar="PA,AP",
        help="keep only images with these ViewPosition values (default: all, as published)",
    )

    csv = sub.add_parser(
        "csv",
        parents=[common, splitting],
        help="your own studies from a CSV table (id, report, image path(s), optional split)",
        description=table.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv.add_argument("--table", type=Path, metavar="CSV", help="one row per study (UTF-8, optionally gzipped)")
    csv.add_argument("--image-root", type=Path, metavar="DIR", help="folder the image paths are relative to")
    csv.add_argument(
        "--preset",
        choices=sorted(table.PRESET_VIEWS),
        default="iu_xray",
        help="the cmn-train --dataset the data is for: iu_xray (2 images per study, default) or mimic_cxr (1)",
    )
    csv.add_argument("--id-column", default="id", metavar="NAME")
    csv.add_argument("--report-column", default="report", metavar="NAME")
    csv.add_argument(
        "--image-columns",
        type=_columns,
        default=("image_path",),
        metavar="A[,B...]",
        help="column(s) with image paths (default image_path)",
    )
    csv.add_argument("--separator", default=";", help="between several paths in one cell (default ';')")
    csv.add_argument("--split-column", metavar="NAME", help="column with the split (default: 'split' if present)")
    csv.add_argument(
        "--copy-images",
        action="store_true",
        help="copy the images into DIR/images (default: DIR/images links to --image-root)",
    )
    return p


def _need(args: argparse.Namespace, *flags: str) -> None:
    missing = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is None]
    if missing:
        raise ConfigError(f"cmn-prepare {args.source}: {', '.join(missing)} required (unless --check)")


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    progress = not args.no_progress
    if args.check:
        views = {"iu_xray": iu_xray.NUM_VIEWS, "mimic_cxr": mimic_cxr.NUM_VIEWS}.get(args.source)
        if views is None:
            views = table.PRESET_VIEWS[args.preset]
        print_lines(check_output(args.output, views, enabled_progress=progress))
        return 0
    if args.source != "mimic_cxr" and abs(sum(args.split_fractions) - 1.0) > 1e-6:
        raise ConfigError(f"--split-fractions {' '.join(map(str, args.split_fractions))}: must add up to 1")
    common = dict(output=args.output, strict=args.strict, force=args.force, progress=progress)
    if args.source == "iu_xray":
        _need(args, "reports", "images")
        lines = iu_xray.prepare(
            iu_xray.IUOptions(
                reports=args.reports,
                images=args.images,
                section=args.section,
                impression_fallback=args.impression_fallback,
                split_from=args.split_from,
                seed=args.seed,
                fractions=tuple(args.split_fractions),
                **common,
            )
        )
    elif args.source == "mimic_cxr":
        _need(args, "reports", "split", "images")
        lines = mimic_cxr.prepare(
            mimic_cxr.MimicOptions(
                reports=args.reports,
                split=args.split,
                metadata=args.metadata,
                images=args.images,
                views=args.views,
                section=args.section,
                impression_fallback=args.impression_fallback,
                **common,
            )
        )
    else:
        _need(args, "table", "image_root")
        lines = table.prepare(
            table.TableOptions(
                table=args.table,
                image_root=args.image_root,
                preset=args.preset,
                id_column=args.id_column,
                report_column=args.report_column,
                image_columns=args.image_columns,
                separator=args.separator,
                split_column=args.split_column,
                seed=args.seed,
                fractions=tuple(args.split_fractions),
                copy_images=args.copy_images,
                **common,
            )
        )
    print_lines(lines)
    return 0

"""``cmn-plot RUN_DIR``: training curves from a run folder's ``log.jsonl`` as PNG files.

Writes into ``RUN_DIR/plots`` (or ``--output``): ``loss.png`` (training loss per token),
``throughput.png`` (training tokens/s), ``val_nlg.png`` (validation BLEU-1..4, METEOR,
ROUGE-L), ``val_ce.png`` (validation clinical efficacy, when the run computed it) and
``curves.png`` with all of them. The best epoch (validation BLEU-4, the model selection
rule) is marked. matplotlib is an optional extra: ``pip install 'cmn[plot]'``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cmn.cliutil import ArgumentParser, user_errors
from cmn.errors import CMNError, DataError

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L")
CE_KEYS = ("CE_precision", "CE_recall", "CE_F1", "CE_precision_micro", "CE_recall_micro", "CE_F1_micro")


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or one clear error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise CMNError("matplotlib is not installed; it draws cmn's figures: pip install 'cmn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> list[dict]:
    """Epoch records of a ``log.jsonl``, one per epoch (a resumed run's later line wins),
    sorted by epoch."""
    from cmn.metrics.cli import _jsonl_rows

    if not path.is_file():
        raise DataError(f"{path}: no training log (is this a cmn-train run folder?)")
    by_epoch: dict[int, dict] = {}
    for n, record in enumerate(_jsonl_rows(path), 1):
        if "warmup_epoch" in record:  # the visual warm-up before epoch 1 (cmn.warmup)
            continue
        if not isinstance(record.get("epoch"), int):
            raise DataError(f"{path}: record {n} has no integer 'epoch'")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise DataError(f"{path}: no epochs logged yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


PANELS = (
    ("loss", "training loss (NLL per token)", ("train_loss",)),
    ("throughput", "training tokens / s", ("train_tokens_per_s",)),
    ("val_nlg", "validation NLG metrics", tuple("val_" + k for k in NLG_KEYS)),
    ("val_ce", "validation clinical efficacy", tuple("val_" + k for k in CE_KEYS)),
)


def _draw(ax, records: list[dict], title: str, keys: Sequence[str]) -> bool:
    drawn = False
    for key in keys:
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix("val_").removeprefix("train_"))
            drawn = True
    best = records[-1].get("best_epoch")
    if drawn and isinstance(best, int) and best > 0:
        ax.axvline(best, color="0.6", linestyle="--", linewidth=1, label=f"best epoch {best}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if drawn and len(keys) > 1:
        ax.legend(fontsize=7, ncol=2, loc="best")
    if not drawn:
        ax.text(0.5, 0.5, "not in this run's log", ha="center", va="center", transform=ax.transAxes, color="0.5")
    return drawn


def plot_run(records: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """Write the curves of ``records`` (from :func:`read_log`) into ``out_dir``; returns the files."""
    import io

    from cmn.fsutil import write_atomic

    plt = require_matplotlib()
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        written.append(write_atomic(out_dir / f"{name}.png", buf.getvalue()))

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for ax, (_, label, keys) in zip(axes.ravel(), PANELS):
        _draw(ax, records, label, keys)
    if title:
        fig.suptitle(title, fontsize=11)
    save(fig, "curves")
    for name, label, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        if _draw(ax, records, label, keys):
            save(fig, name)
        else:
            plt.close(fig)
    return written


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cmn-plot", description="Plot a training run's curves (from RUN_DIR/log.jsonl) as PNG.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a cmn-train output folder")
    p.add_argument("--output", type=Path, help="folder for the PNG files (default: RUN_DIR/plots)")
    return p


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cmn-plot``; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.run_dir.is_dir():
        raise DataError(f"{args.run_dir}: no such run folder")
    records = read_log(args.run_dir / "log.jsonl")
    require_matplotlib()
    out = args.output or args.run_dir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CMNError(f"--output {out}: cannot create the folder ({e.strerror or e})") from None
    files = plot_run(records, out, title=str(args.run_dir))
    print(f"{len(records)} epoch(s) -> " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

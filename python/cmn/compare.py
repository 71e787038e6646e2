"""``cmn-compare``: the paper's ablations in one command, as normal, resumable training runs.

    cmn-compare --model base,mem,cmn --seeds 0,1,2 --output-dir runs/ablation [cmn-train flags]
    cmn-compare --sweep memory_size=256,512,1024 --sweep topk=8,16,32 --seeds 0,1 --output-dir runs/sweep

Each (variant or swept value, seed) is one ``cmn-train`` run in its own folder under
``--output-dir`` (``cmn-s0``, ``memory_size=256-s0``, ...); a finished run (its
``metrics.json`` exists) is not redone, an interrupted one is resumed. Then
``comparison.json`` and ``comparison.md`` hold the mean and standard deviation over seeds of
the test scores, in the layout of the paper's Table 2 (on demo data, also per drawn finding);
a sweep also draws ``sweep_<name>.png`` (scores against the swept value, like the paper's
Figures 3-4; needs ``cmn[plot]``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cmn.cliutil import ArgumentParser, user_errors
from cmn.config import MODEL_VARIANTS
from cmn.data.demo.findings import FINDINGS
from cmn.errors import CMNError, ConfigError
from cmn.fsutil import write_atomic, write_json

# swept setting -> the cmn-train flag that sets it
SWEEPABLE = {
    "memory_size": "--memory-size",
    "topk": "--topk",
    "num_layers": "--num-layers",
    "num_heads": "--num-heads",
    "d_model": "--d-model",
}
COLUMNS = [
    ("BLEU_1", "BL-1"),
    ("BLEU_2", "BL-2"),
    ("BLEU_3", "BL-3"),
    ("BLEU_4", "BL-4"),
    ("METEOR", "MTR"),
    ("ROUGE_L", "RG-L"),
    ("CE_precision", "CE P"),
    ("CE_recall", "CE R"),
    ("CE_F1", "CE F1"),
]
PAPER_NAMES = {"base": "BASE", "mem": "BASE+MEM", "cmn": "BASE+CMN"}
# flags cmn-compare sets for each run itself
_OWN_FLAGS = ("--model", "--seed", "--output-dir", "--resume", "--overwrite")


@dataclass(frozen=True)
class Run:
    group: str  # the row: a variant, or "name=value" of a sweep
    seed: int
    flags: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"{self.group}-s{self.seed}"


def plan(variants: Sequence[str], sweeps: Sequence[tuple[str, list[str]]], seeds: Sequence[int]) -> list[Run]:
    """Every run of the comparison, in order."""
    runs: list[Run] = []
    if sweeps:
        variant = variants[0] if len(variants) == 1 else "cmn"
        for name, values in sweeps:
            for value in values:
                runs += [Run(f"{name}={value}", s, ("--model", variant, SWEEPABLE[name], value)) for s in seeds]
    else:
        for v in variants:
            runs += [Run(v, s, ("--model", v)) for s in seeds]
    return runs


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n-1; 0 for one value) and count."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {metric: {"mean", "std", "n"}}}`` over the seeds' test scores. On demo data also
    ``demo_findings_F1`` (the macro F1 over the drawn findings) and, per finding,
    ``finding_F1/<name>`` and ``finding_side/<name>`` (share of stated sides that are right)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group, metrics in results.items():
        row: dict[str, dict[str, float]] = {}
        for key in sorted({k for m in metrics for k in m["test"]}):
            row[key] = _mean_std([float(m["test"][key]) for m in metrics if key in m["test"]])
        demo = [m["demo_findings"] for m in metrics if "demo_findings" in m]
        if demo:
            row["demo_findings_F1"] = _mean_std([d["macro_f1"]["f1"] for d in demo])
            for name in (n for n in FINDINGS if n in demo[0]):
                row[f"finding_F1/{name}"] = _mean_std([d[name]["f1"] for d in demo if name in d])
                sides = [d[name]["laterality"] for d in demo if d.get(name, {}).get("laterality") is not None]
                if sides:
                    row[f"finding_side/{name}"] = _mean_std(sides)
        out[group] = row
    return out


def _cell(row: dict[str, dict[str, float]], key: str) -> str:
    return f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}" if key in row else "-"


def markdown(summary: dict[str, dict[str, dict[str, float]]], seeds: Sequence[int], title: str) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in row for row in summary.values())]
    if any("demo_findings_F1" in row for row in summary.values()):
        cols.append(("demo_findings_F1", "findings F1"))
    lines = [
        f"# {title}",
        "",
        f"Test split, mean ± standard deviation over seeds {', '.join(map(str, seeds))}.",
        "",
        "| model | " + " | ".join(h for _, h in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for group, row in summary.items():
        lines.append(f"| {PAPER_NAMES.get(group, group)} | " + " | ".join(_cell(row, k) for k, _ in cols) + " |")
    for prefix, caption in (
        ("finding_F1/", "Drawn findings (demo data): F1 of each finding against what the images show."),
        ("finding_side/", "Drawn findings (demo data): share of stated sides (nodule: lobes) that are right."),
    ):
        names = list(dict.fromkeys(k[len(prefix) :] for row in summary.values() for k in row if k.startswith(prefix)))
        if not names:
            continue
        lines += ["", caption, "", "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for group, row in summary.items():
            cells = " | ".join(_cell(row, prefix + n) for n in names)
            lines.append(f"| {PAPER_NAMES.get(group, group)} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, name: str, values: list[str], summary: dict[str, dict[str, dict[str, float]]]) -> None:
    """Scores against the swept value (log-scaled axis), error bars over seeds."""
    from cmn.viz.plot import require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [float(v) for v in values]
    for key, label in (("BLEU_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CE_F1", "CE F1")):
        rows = [summary[f"{name}={v}"].get(key) for v in values]
        present = [r for r in rows if r is not None]
        if len(present) == len(rows):
            ax.errorbar(
                xs, [r["mean"] for r in present], yerr=[r["std"] for r in present], marker="o", capsize=3, label=label
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, values)
    ax.set_xlabel(name)
    ax.set_ylabel("test score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cmn-compare",
        allow_abbrev=False,
        description="Run cmn-train for several model variants (or values of one setting) and seeds, then write "
        "comparison.md/.json with mean and standard deviation of the test scores (the paper's Table 2 "
        "layout; sweeps also as a PNG plot). Other flags are passed to every cmn-train run.",
    )
    p.add_argument("--model", default="base,mem,cmn", help="comma-separated variants (default base,mem,cmn)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help=f"vary one setting ({', '.join(SWEEPABLE)}); repeatable",
    )
    p.add_argument("--output-dir", required=True, type=Path, help="folder of the runs and the comparison files")
    return p


def _parse(args) -> tuple[list[str], list[tuple[str, list[str]]], list[int]]:
    variants = [v.strip() for v in args.model.split(",") if v.strip()]
    bad = [v for v in variants if v not in MODEL_VARIANTS]
    if not variants or bad:
        raise ConfigError(f"--model: choose from {', '.join(MODEL_VARIANTS)}, got {args.model!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: distinct non-negative integers, got {args.seeds!r}")
    sweeps = []
    for spec in args.sweep:
        name, _, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if name not in SWEEPABLE or not vals or not all(v.isdigit() and int(v) > 0 for v in vals):
            raise ConfigError(
                f"--sweep {spec}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)} and positive integers"
            )
        sweeps.append((name, vals))
    if sweeps and len(variants) > 1 and args.model != parser().get_default("model"):
        raise ConfigError("--sweep varies one setting of one variant: give at most one --model")
    return variants, sweeps, seeds


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    from cmn.cli import train_main

    args, train_flags = parser().parse_known_args(argv)
    clash = [f for f in train_flags if f.split("=")[0] in _OWN_FLAGS]
    if clash:
        raise ConfigError(f"{clash[0]}: cmn-compare sets it for each run (use --model/--seeds/--output-dir)")
    variants, sweeps, seeds = _parse(args)
    out: Path = args.output_dir
    runs = plan(variants, sweeps, seeds)
    results: dict[str, list[dict[str, Any]]] = {}
    for i, run in enumerate(runs, 1):
        folder = out / run.folder
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            print(f"[{i}/{len(runs)}] {run.folder}: done before, kept", file=sys.stderr)
        else:
            resume = ["--resume"] if (folder / "last").exists() else ["--overwrite"] if folder.exists() else []
            print(
                f"[{i}/{len(runs)}] {run.folder}: training{' (resumed)' if resume == ['--resume'] else ''}",
                file=sys.stderr,
            )
            argv_run = [*train_flags, *run.flags, "--seed", str(run.seed), "--output-dir", str(folder), *resume]
            code = train_main(argv_run)
            if code != 0:
                return code
        try:
            results.setdefault(run.group, []).append(json.loads(metrics_file.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{metrics_file}: cannot be read ({e})") from None
    summary = summarize(results)
    title = "Sweep of " + ", ".join(n for n, _ in sweeps) if sweeps else "Model variants (the paper's Table 2)"
    write_json(
        out / "comparison.json",
        {"seeds": seeds, "train_flags": train_flags, "runs": {r.folder: r.group for r in runs}, "summary": summary},
    )
    write_atomic(out / "comparison.md", markdown(summary, seeds, title))
    for name, values in sweeps:
        try:
            plot_sweep(out / f"sweep_{name}.png", name, values, summary)
        except CMNError as e:  # matplotlib missing: the tables are still written
            print(f"warning: {e}", file=sys.stderr)
    print(markdown(summary, seeds, title))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

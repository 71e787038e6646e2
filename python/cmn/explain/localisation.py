"""How often a finding word's map is brightest where the demo generator drew that finding.

``python -m cmn.explain.localisation --checkpoint RUN/checkpoint --demo-root DIR`` explains
every study of a demo split (``demo-complete.json`` says how it was made; the drawn regions
are recomputed with :func:`cmn.data.demo.finding_regions`, nothing on disk changes) and, for
each finding that is drawn in a study and that the report states as present (the labeler reads
it positive), takes the first finding word outside a negated phrase (``effusion``,
``pneumothorax``, ``nodule``, ``enlarged``/``cardiomegaly``, ``consolidation``/``opacity``,
``catheter``/``pacemaker``...). A case is a
hit when the patch with the largest mean-over-layers attention (over all views) overlaps the
drawn region. The chance rate is the same for a patch picked uniformly at random: the share of
patches the region touches, averaged over the cases. Each layer's map and the memory-overlap
map are scored the same way.

``--report reference`` explains the reference reports (teacher-forced) instead of generated
ones, so findings the model does not write yet are scored too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cmn.cliutil import ArgumentParser, positive_int, user_errors
from cmn.errors import DataError
from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS

#: Words that name each demo finding in its reports.
FINDING_WORDS = {
    "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "effusion": ("effusion", "effusions"),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule", "nodular"),
    "consolidation": ("consolidation", "opacity"),
    "device": ("catheter", "pacemaker", "pacing", "device", "line"),
}
#: The labeler's observations that state each demo finding.
FINDING_OBSERVATIONS = {
    "cardiomegaly": ("Cardiomegaly",),
    "effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "nodule": ("Lung Lesion",),
    "consolidation": ("Consolidation", "Lung Opacity", "Pneumonia"),
    "device": ("Support Devices",),
}


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool (rows, cols) region -> (h, w) bool: which patches of the model's grid it touches
    (the eval transform resizes the whole image to the square input, so patch (i, j) covers
    rows i/h..(i+1)/h and columns j/w..(j+1)/w of the image)."""
    h, w = grid
    rows, cols = mask.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        r0, r1 = (i * rows) // h, -(-(i + 1) * rows // h)
        for j in range(w):
            c0, c1 = (j * cols) // w, -(-(j + 1) * cols // w)
            out[i, j] = mask[r0:r1, c0:c1].any()
    return out


def hit(heat: np.ndarray, region: np.ndarray) -> bool:
    """heat (V, h, w) float, region (V, h, w) bool: is the brightest patch inside the region?"""
    return bool(region.reshape(-1)[int(np.argmax(heat.reshape(-1)))])


@dataclass
class Tally:
    """Cases and hits per map: ``attention`` (mean of layers, what the page shows first),
    ``attention_layer_<k>`` and ``memory_overlap``."""

    cases: int = 0
    hits: dict = field(default_factory=dict)
    chance: float = 0.0  # sum over cases of the region's share of patches
    by_finding: dict = field(default_factory=dict)

    def add(self, finding: str, hits: dict[str, bool], chance: float) -> None:
        for t in (self, self.by_finding.setdefault(finding, Tally())):
            t.cases += 1
            for name, h in hits.items():
                t.hits[name] = t.hits.get(name, 0) + int(h)
            t.chance += chance

    def summary(self) -> dict:
        n = max(self.cases, 1)
        return {
            "cases": self.cases,
            **{f"{name}_rate": h / n for name, h in self.hits.items()},
            "chance_rate": self.chance / n,
        }


def finding_word(e, finding: str) -> Optional[int]:
    """Index of the first word naming ``finding`` outside a negated phrase, when the labeler
    reads the report as stating the finding (positive); else None."""
    if not any(e.labels[CHEXPERT_OBSERVATIONS.index(o)] == 1.0 for o in FINDING_OBSERVATIONS[finding]):
        return None
    negated = {i for en in e.entities if en.label == 0.0 for i in en.words}
    return next((i for i, word in enumerate(e.words) if word in FINDING_WORDS[finding] and i not in negated), None)


def score_study(e, regions: Mapping[str, tuple[np.ndarray, ...]], tally: Tally) -> None:
    """Add the cases of one explained study (its drawn ``regions``) to ``tally``."""
    h, w = e.grid
    for finding, masks in regions.items():
        i = finding_word(e, finding)
        if i is None:
            continue
        region = np.stack([patch_coverage(m, (h, w)) for m in masks])  # (V, h, w)
        hits = {"attention": hit(e.attention(i), region)}
        hits.update(
            {
                f"attention_layer_{y + 1}": hit(e.attention(i, layer=y), region)
                for y in range(e.cross_attention.shape[0])
            }
        )
        if e.shared_memory and e.word_slots is not None:
            hits["memory_overlap"] = hit(e.overlap(i), region)
        tally.add(finding, hits, float(region.mean()))


def measure(
    bundle,
    demo_root: Path,
    split: str = "test",
    *,
    report: str = "generated",
    limit: Optional[int] = None,
    batch_size: int = 8,
    beam_size: int = 3,
) -> Tally:
    """Explain the studies of ``split`` under ``demo_root`` and tally the hits (see module docstring)."""
    import torch

    from cmn.data.demo import finding_regions, read_params
    from cmn.explain.core import explain_batch
    from cmn.inference import load_study

    params = read_params(demo_root)
    try:
        entries = json.loads((demo_root / "annotation.json").read_text(encoding="utf-8"))[split]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{demo_root / 'annotation.json'}: no split {split!r} ({err})") from None
    entries = entries[:limit] if limit else entries
    device = bundle.device
    tally = Tally()
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        images = torch.stack(
            [load_study(bundle, [demo_root / "images" / p for p in en["image_path"]])[0] for en in chunk]
        ).to(device)  # (B, V, 3, S, S)
        refs = [en["report"] for en in chunk] if report == "reference" else None
        for k, e in enumerate(explain_batch(bundle, images, reports=refs, beam_size=beam_size)):
            score_study(e, finding_regions(params, split, start + k), tally)
    return tally


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m cmn.explain.localisation",
        description="Localisation rate of finding-word heatmaps on the built-in demo data.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder of a model trained on the demo data")
    p.add_argument("--demo-root", required=True, type=Path, help="demo data folder (holding demo-complete.json)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument(
        "--report",
        choices=("generated", "reference"),
        default="generated",
        help="explain the generated reports (default) or the references",
    )
    p.add_argument("--limit", type=positive_int(), help="only the first N studies of the split")
    p.add_argument("--batch-size", type=positive_int(), default=8)
    p.add_argument("--beam-size", type=positive_int(), default=3)
    p.add_argument("--device", default="auto")
    return p


@user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from cmn.checkpoint import load_checkpoint
    from cmn.runtime import select_device

    bundle = load_checkpoint(args.checkpoint, device=select_device(args.device))
    tally = measure(
        bundle,
        args.demo_root,
        args.split,
        report=args.report,
        limit=args.limit,
        batch_size=args.batch_size,
        beam_size=args.beam_size,
    )
    result = {
        "split": args.split,
        "report": args.report,
        **tally.summary(),
        "by_finding": {k: v.summary() for k, v in sorted(tally.by_finding.items())},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

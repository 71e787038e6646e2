"""The demo dataset on disk: deterministic generation, atomic and shared by concurrent callers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cmn.config import DEMO_SIZE
from cmn.data.demo.findings import FINDINGS, Findings, sample_findings
from cmn.data.demo.render import render_study
from cmn.data.demo.reports import write_report
from cmn.errors import DataError

DEMO_VERSION = 1
MARKER = "demo-complete.json"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class DemoParams:
    n_train: int = DEMO_SIZE[0]
    n_val: int = DEMO_SIZE[1]
    n_test: int = DEMO_SIZE[2]
    image_size: int = 128
    seed: int = 0
    version: int = DEMO_VERSION


def _study(params: DemoParams, split: str, index: int, regions: Optional[tuple[dict, dict]] = None):
    rng = np.random.default_rng([params.seed, _SPLIT_CODES[split], index])
    findings = sample_findings(rng)
    report = write_report(findings, rng)
    frontal, lateral = render_study(findings, params.image_size, rng, regions)
    return findings, report, frontal, lateral


def finding_regions(params: DemoParams, split: str, index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Where study ``index`` of ``split`` shows each of its findings: ``{finding: (frontal,
    lateral)}`` bool (image_size, image_size) masks, for the findings drawn in it.

    Re-draws the study from its seed (about as costly as generating it); the dataset on
    disk is not read or changed. ``params`` is what made it (``demo-complete.json``).
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_CODES)}, got {split!r}")
    frontal: dict[str, np.ndarray] = {}
    lateral: dict[str, np.ndarray] = {}
    _study(params, split, index, (frontal, lateral))
    return {name: (frontal[name], lateral[name]) for name in FINDINGS if name in frontal}


def read_params(root: str | Path) -> DemoParams:
    """The parameters a complete demo folder was made with (its marker file)."""
    marker = Path(root) / MARKER
    try:
        return DemoParams(**json.loads(marker.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{marker}: not a complete demo data folder ({e})") from None


def _generate(out: Path, params: DemoParams) -> None:
    images = out / "images"
    annotation = {}
    number = 0
    for split, n in (("train", params.n_train), ("val", params.n_val), ("test", params.n_test)):
        entries = []
        for i in range(n):
            number += 1
            sid = f"demo_{number:04d}"
            findings, report, frontal, lateral = _study(params, split, i)
            (images / sid).mkdir(parents=True)
            for view, arr in enumerate((frontal, lateral)):
                Image.fromarray(arr).save(images / sid / f"{view}.png", format="PNG")
            entries.append(
                {
                    "id": sid,
                    "report": report,
                    "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
                    "split": split,
                    "findings": asdict(findings),
                }
            )
        annotation[split] = entries
    (out / "annotation.json").write_text(json.dumps(annotation, indent=1), encoding="utf-8")
    # Written last: its presence means the folder is complete.
    (out / MARKER).write_text(json.dumps(asdict(params), sort_keys=True), encoding="utf-8")


def _is_complete(root: Path, params: DemoParams) -> bool:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8")) == asdict(params)
    except (OSError, ValueError):
        return False


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_data(
    root: str | Path,
    *,
    n_train: int = DEMO_SIZE[0],
    n_val: int = DEMO_SIZE[1],
    n_test: int = DEMO_SIZE[2],
    image_size: int = 128,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Return ``(annotation.json, image_dir)`` of the demo dataset under ``root``, generating it if needed.

    Generation goes to a temporary sibling folder that is renamed to ``root`` only when
    complete, so an interrupted run never leaves a partial dataset; a ``root`` that is
    incomplete or made with other parameters is replaced. Concurrent callers (DDP ranks)
    may both generate; the first rename wins and the identical copy is discarded.
    """
    params = DemoParams(n_train, n_val, n_test, image_size, seed)
    if min(n_train, n_val, n_test) < 0 or n_train < 1 or image_size < 32:
        raise ValueError(f"need n_train >= 1, n_val, n_test >= 0 and image_size >= 32, got {params}")
    root = Path(root).expanduser().absolute()
    ann, image_dir = root / "annotation.json", root / "images"
    if _is_complete(root, params):
        return ann, image_dir
    prefix = f".{root.name}.tmp-"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root.parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root.parent))
    except OSError as e:
        raise DataError(f"{root}: cannot create the demo data folder ({e})") from None
    try:
        _generate(tmp, params)
        if root.exists() and not _is_complete(root, params):
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=root.parent))
            os.replace(root, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, params):  # not a concurrent winner: a real failure
                raise
    except OSError as e:
        raise DataError(f"{root}: cannot write the demo data ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ann, image_dir


def drawn_findings(ann_path: str | Path, split: str) -> dict[str, Findings]:
    """``{study id: Findings}`` of one split of a demo ``annotation.json`` (its ``findings`` entries)."""
    try:
        entries = json.loads(Path(ann_path).read_text(encoding="utf-8"))[split]
        return {str(e["id"]): Findings(**e["findings"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann_path}: not a demo annotation with drawn findings ({e})") from None

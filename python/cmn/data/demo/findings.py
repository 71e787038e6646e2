"""What a demo study shows: six findings drawn independently (see :mod:`cmn.data.demo`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINDINGS = ("cardiomegaly", "effusion", "pneumothorax", "nodule", "consolidation", "device")


@dataclass(frozen=True)
class Findings:
    """What one study shows. Sides are the patient's; "" means absent."""

    cardiomegaly: str  # "" | "mild" | "moderate"
    effusion_side: str  # "" | "left" | "right" | "bilateral"
    effusion_size: str  # "small" | "moderate"
    pneumothorax_side: str  # "" | "left" | "right"
    nodule_lobe: str  # "" | "right upper" | "left upper" | "right lower" | "left lower"
    nodule_cm: int  # 1 | 2
    consolidation_side: str  # "" | "left" | "right"
    device: str  # "" | "catheter" | "pacemaker"

    def labels(self) -> dict[str, bool]:
        present = (
            self.cardiomegaly,
            self.effusion_side,
            self.pneumothorax_side,
            self.nodule_lobe,
            self.consolidation_side,
            self.device,
        )
        return {name: bool(v) for name, v in zip(FINDINGS, present)}


def sample_findings(rng: np.random.Generator) -> Findings:
    def pick(options, p=None):
        return str(options[rng.choice(len(options), p=p)])

    return Findings(
        cardiomegaly=pick(["mild", "moderate"], [0.6, 0.4]) if rng.random() < 0.30 else "",
        effusion_side=pick(["left", "right", "bilateral"], [0.35, 0.35, 0.30]) if rng.random() < 0.30 else "",
        effusion_size=pick(["small", "moderate"], [0.6, 0.4]),
        pneumothorax_side=pick(["left", "right"]) if rng.random() < 0.25 else "",
        nodule_lobe=pick(["right upper", "left upper", "right lower", "left lower"]) if rng.random() < 0.25 else "",
        nodule_cm=int(rng.choice([1, 2])),
        consolidation_side=pick(["left", "right"]) if rng.random() < 0.25 else "",
        device=pick(["catheter", "pacemaker"]) if rng.random() < 0.30 else "",
    )

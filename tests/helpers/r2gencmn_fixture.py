"""Pieces of the R2GenCMN reference fixtures that are regenerated instead of committed.

``tests/fixtures/make_reference_fixtures.py`` runs the real reference code once and stores its
outputs; the CNN weights (megabytes) and the input images are not stored but computed by
the functions below from integer arithmetic alone, so the fixture script and the tests get
bit-identical values on any machine: every weight is a small dyadic rational (exact in float32).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "r2gencmn"

# Small models of both datasets' shapes (IU X-Ray: two views; MIMIC-CXR: one view, its
# cleaning, threshold and max length). resnet18 keeps the CNN cheap; the converter infers it.
SETTINGS = {
    "iu_xray": dict(num_views=2, threshold=3, max_seq_length=60, n_train=40, n_val=4, n_test=6, seed=1),
    "mimic_cxr": dict(num_views=1, threshold=10, max_seq_length=100, n_train=60, n_val=4, n_test=6, seed=2),
}
MODEL = dict(
    visual_extractor="resnet18",
    d_vf=512,
    d_model=32,
    d_ff=32,
    num_heads=4,
    num_layers=2,
    cmm_size=64,
    cmm_dim=32,
    topk=8,
)
IMAGE_SIZE = (240, 256)  # (width, height): not 224, so the test transform really resizes


def hashed(n: int, key: int) -> np.ndarray:
    """``n`` integers in [-1024, 1024] from a splitmix64-style hash of (key, index)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    # array (not scalar) arithmetic: uint64 arrays wrap around silently, as the hash needs
    offset = np.array([key], dtype=np.uint64) * np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    x = (np.arange(n, dtype=np.uint64) + offset) & mask
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & mask
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & mask
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(2049)).astype(np.int64) - 1024


def dyadic(shape, key: int, scale_exp: int) -> torch.Tensor:
    """float32 tensor of ``hashed/1024 * 2**-scale_exp``: exact, platform independent."""
    n = int(np.prod(shape)) if len(shape) else 1
    values = hashed(n, key).astype(np.float64) / 1024.0 * 2.0**-scale_exp
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def reference_visual_state(backbone: str = "resnet18", key: int = 7) -> OrderedDict[str, torch.Tensor]:
    """A torchvision ResNet trunk's state under the reference's names
    (``visual_extractor.model.<child>...``), with hashed weights that keep activations sane."""
    import torchvision

    trunk = torch.nn.Sequential(*list(getattr(torchvision.models, backbone)(weights=None).children())[:-2])
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (name, t) in enumerate(trunk.state_dict().items()):
        k = key * 1000 + i
        if name.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_var"):
            value = 1.0 + dyadic(t.shape, k, 2).abs()
        elif name.endswith("running_mean") or name.endswith("bias"):
            value = dyadic(t.shape, k, 4)
        elif t.dim() == 1:  # BatchNorm weight
            value = 1.0 + dyadic(t.shape, k, 3)
        else:  # conv weight: about 1/sqrt(fan_in), a power of two
            fan_in = int(np.prod(t.shape[1:]))
            value = dyadic(t.shape, k, round(math.log2(math.sqrt(fan_in))) - 1)
        state["visual_extractor.model." + name] = value.to(t.dtype)
    return state


def study_image(study: int, view: int, key: int) -> Image.Image:
    """A deterministic RGB test image (smooth bands plus hashed texture)."""
    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    noise = hashed(h * w * 3, key * 10_000 + study * 10 + view).reshape(h, w, 3)
    base = (x * (3 + study) + y * (5 + view))[..., None] + np.array([0, 40, 80])
    pixels = (base + (noise % 64)) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def write_images(annotation: dict, image_dir: Path, key: int) -> None:
    """Write every study image of ``annotation`` (R2Gen layout) under ``image_dir``."""
    for split in ("train", "val", "test"):
        for s, entry in enumerate(annotation[split]):
            for v, rel in enumerate(entry["image_path"]):
                p = image_dir / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                study_image(hash_split(split) + s, v, key).save(p)


def hash_split(split: str) -> int:
    return {"train": 0, "val": 1000, "test": 2000}[split]


def positional_encoding(max_len: int, d_model: int) -> torch.Tensor:
    """The reference's registered ``pe`` buffer (1, max_len, d_model)."""
    from cmn.model.transformer import PositionalEncoding

    return PositionalEncoding(d_model, 0.0, max_len=max_len).pe.unsqueeze(0).clone()


def full_reference_checkpoint(dataset: str, out: Path) -> Path:
    """Assemble the reference-format ``.pth`` the fixture describes: its stored tensors, the
    regenerated CNN and positional encodings, in the reference's key order."""
    import json

    from cmn.checkpoint import load_plain_pickle

    root = FIXTURE_DIR / dataset
    partial = load_plain_pickle(root / "checkpoint_partial.pth")
    order = json.loads((root / "state_keys.json").read_text())
    visual = reference_visual_state(MODEL["visual_extractor"])
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in order:
        if k in partial["state_dict"]:
            state[k] = partial["state_dict"][k]
        elif k in visual:
            state[k] = visual[k]
        elif k.endswith(".pe"):
            state[k] = positional_encoding(5000, MODEL["d_model"])
        else:
            raise KeyError(k)
    torch.save(
        {
            "epoch": partial["epoch"],
            "state_dict": state,
            "optimizer": partial["optimizer"],
            "monitor_best": partial["monitor_best"],
        },
        out,
    )
    return out

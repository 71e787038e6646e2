"""Visual extractor: a torchvision ResNet cut before pooling, giving patch features.

Differs from the reference code in two ways: all views of a study go through the CNN in one
batch (same weights, same result as one call per view), and ImageNet weights are optional:
a local file, torchvision's cache/download, or random init with a warning, never a crash.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torchvision

from cmn.config import VISUAL_EXTRACTORS
from cmn.errors import CheckpointError, ConfigError

_TORCHVISION_WEIGHTS = {
    "resnet101": "ResNet101_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet152": "ResNet152_Weights",
}


def _bn_stats_once(block: nn.Module):
    """Checkpoint contexts for ``block``: the recomputation in the backward runs BatchNorm
    with momentum 0, so running statistics are updated once per step, as without checkpointing."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextlib.contextmanager
    def recompute():
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

    return lambda: (contextlib.nullcontext(), recompute())


class VisualExtractor(nn.Module):
    """ResNet trunk: images (B, V, 3, S, S) -> patch features (B, V * P, C), P = (S/32)^2."""

    def __init__(self, name: str):
        super().__init__()
        if name not in VISUAL_EXTRACTORS:
            raise ConfigError(f"unknown visual extractor {name!r}; choose one of {', '.join(VISUAL_EXTRACTORS)}")
        resnet = getattr(torchvision.models, name)(weights=None)
        # Drop the global pooling and the classifier: the last conv map is the patch grid.
        self.trunk = nn.Sequential(*list(resnet.children())[:-2])
        self.name = name
        self.out_channels = VISUAL_EXTRACTORS[name]
        # Activation checkpointing of the residual blocks: their activations are recomputed in
        # the backward instead of kept (the CNN holds most of a training step's memory).
        self.grad_checkpoint = False

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpoint and torch.is_grad_enabled() and self.training):
            return self.trunk(x)
        from torch.utils.checkpoint import checkpoint

        stem, stages = self.trunk[:4], self.trunk[4:]
        x = stem(x)
        for stage in stages:
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False, context_fn=_bn_stats_once(block))
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, V = images.shape[:2]
        fmap = self._trunk(images.flatten(0, 1))  # (B*V, C, h, w)
        patches = fmap.flatten(2).transpose(1, 2)  # (B*V, P, C)
        return patches.reshape(B, V * patches.shape[1], patches.shape[2])  # (B, V*P, C)

    def load_pretrained(self, source: Optional[str]) -> str:
        """Load ImageNet weights into the trunk; returns a one-line description of what happened.

        ``source``: ``"imagenet"`` (torchvision's weights: from its cache, downloading when the
        machine can), a path to a state dict (``.pth``/``.pt`` from torchvision, or
        ``.safetensors``), or ``None`` (keep random init).
        """
        if source is None:
            return "visual extractor: random init (no pretrained weights requested)"
        if source == "imagenet":
            weights_enum = getattr(torchvision.models, _TORCHVISION_WEIGHTS[self.name]).IMAGENET1K_V1
            try:
                state = weights_enum.get_state_dict(progress=False, check_hash=False)
            except Exception as e:  # no network, proxy, partial download: keep going with random init
                msg = (
                    f"could not load ImageNet weights for {self.name} through torchvision ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'no detail'}); training from random init. "
                    f"Pass --visual-weights PATH with a local state dict to use pretrained weights."
                )
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                return "visual extractor: random init (" + msg + ")"
            self._load_state(state, f"torchvision {weights_enum}")
            return f"visual extractor: ImageNet weights from torchvision ({weights_enum})"
        if not os.path.isfile(source):
            raise ConfigError(f"--visual-weights {source}: no such file")
        try:
            if source.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(source)
            else:
                state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"--visual-weights {source}: cannot be read as a state dict ({e})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._load_state(state, source)
        return f"visual extractor: weights from {source}"

    def _load_state(self, state: dict, origin: str) -> None:
        # torchvision names are resnet-level ("conv1.weight", "layer1.0..."); our trunk is a
        # Sequential of the same children, so map names to their positions.
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        prefix = {n: str(i) for i, n in enumerate(names)}
        mapped = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            head, _, rest = key.partition(".")
            if head in ("fc",):
                continue
            if head not in prefix:
                raise CheckpointError(f"{origin}: unexpected key {key!r}; expected a torchvision {self.name} state dict")
            mapped[prefix[head] + "." + rest] = value
        try:
            missing, unexpected = self.trunk.load_state_dict(mapped, strict=False)
        except RuntimeError as e:  # shape mismatch: a different architecture
            raise CheckpointError(f"{origin}: does not match {self.name}: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"{origin}: does not match {self.name} (missing {len(missing)} keys, e.g. {missing[:2]}; "
                f"unexpected {len(unexpected)}, e.g. {unexpected[:2]})"
            )

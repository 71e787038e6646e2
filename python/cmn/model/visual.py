"""Visual extractor: a torchvision ResNet cut before pooling, giving patch features.

The reference runs the CNN once per view (``visual_extractor(images[:, 0])``, then view 1).
cmn runs all views of a batch through the convolutions in ONE call, and keeps the
reference's training semantics in BatchNorm: each BatchNorm layer normalises the views
separately with their own batch statistics and updates its running statistics once per view,
in view order (:class:`ViewBatchNorm2d`), so features, gradients and running statistics equal
the per-view calls. ``joint_view_bn=True`` instead pools the statistics of all views (one
update per step; cmn 0.1's behaviour). In eval mode both are the same as the reference.

ImageNet weights are optional: a local file, torchvision's cache/download, or random init with
a warning, never a crash.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, TypeVar, cast

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

    def tracked_count(m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        assert m.num_batches_tracked is not None  # ResNet's BatchNorms track running statistics
        return m.num_batches_tracked

    @contextlib.contextmanager
    def recompute():
        saved = [(m.momentum, tracked_count(m).clone()) for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                tracked_count(m).copy_(tracked)

    return lambda: (contextlib.nullcontext(), recompute())


class _PerView:
    """BatchNorm mixin: in training, the batch holds ``groups`` views one after the other
    (view-major) and each view is normalised with its own statistics, updating the running
    statistics once per view in order, exactly like one call per view."""

    groups: int = 1
    training: bool  # from the nn.Module it is mixed into

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (V*B, C, h, w), view-major
        if not self.training or self.groups == 1:
            return super().forward(x)  # type: ignore[misc]
        return torch.cat([super(_PerView, self).forward(part) for part in x.chunk(self.groups, 0)], 0)  # type: ignore[misc]


class ViewBatchNorm2d(_PerView, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with per-view training statistics (same parameters and buffers)."""


class ViewSyncBatchNorm(_PerView, nn.SyncBatchNorm):
    """:class:`torch.nn.SyncBatchNorm` (statistics across ranks) with per-view training statistics."""


_M = TypeVar("_M", bound=nn.Module)


def _swap_norms(module: _M, cls: type) -> _M:
    """Replace every BatchNorm in ``module`` by ``cls`` with the same parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) is not cls:
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_norms(child, cls)
    return module


class VisualExtractor(nn.Module):
    """ResNet trunk: images (B, V, 3, S, S) -> patch features (B, V * P, C), P = (S/32)^2."""

    def __init__(self, name: str, joint_view_bn: bool = False):
        super().__init__()
        if name not in VISUAL_EXTRACTORS:
            raise ConfigError(f"unknown visual extractor {name!r}; choose one of {', '.join(VISUAL_EXTRACTORS)}")
        resnet = getattr(torchvision.models, name)(weights=None)
        # Drop the global pooling and the classifier: the last conv map is the patch grid.
        self.trunk = _swap_norms(nn.Sequential(*list(resnet.children())[:-2]), ViewBatchNorm2d)
        self.joint_view_bn = joint_view_bn
        self.name = name
        self.out_channels = VISUAL_EXTRACTORS[name]
        # Activation checkpointing of the residual blocks: their activations are recomputed in
        # the backward instead of kept (the CNN holds most of a training step's memory).
        self.grad_checkpoint = False

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpoint and torch.is_grad_enabled() and self.training):
            return self.trunk(x)
        from torch.utils.checkpoint import checkpoint

        # a slice of a Sequential is a Sequential (torch annotates it ``Sequential | Module``)
        stem, stages = self.trunk[:4], cast(nn.Sequential, self.trunk[4:])
        x = stem(x)
        for stage in stages:
            for block in cast(nn.Sequential, stage):  # a ResNet stage
                x = checkpoint(block, x, use_reentrant=False, context_fn=_bn_stats_once(block))
        return x

    def use_sync_batchnorm(self) -> None:
        """Statistics across DDP ranks (SyncBatchNorm), still per view unless joint_view_bn."""
        _swap_norms(self.trunk, ViewSyncBatchNorm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, V = images.shape[:2]
        groups = 1 if self.joint_view_bn else V
        for m in self.trunk.modules():
            if isinstance(m, _PerView):
                m.groups = groups
        fmap = self._trunk(images.transpose(0, 1).flatten(0, 1))  # (V*B, C, h, w), view-major
        patches = fmap.flatten(2).transpose(1, 2)  # (V*B, P, C)
        P, C = patches.shape[1:]
        return patches.view(V, B, P, C).transpose(0, 1).reshape(B, V * P, C)  # (B, V*P, C): view 0's patches first

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
                raise CheckpointError(
                    f"{origin}: unexpected key {key!r}; expected a torchvision {self.name} state dict"
                )
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

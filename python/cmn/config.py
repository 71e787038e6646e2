"""Frozen configuration dataclasses and the dataset presets.

Only :mod:`cmn.cli` turns command-line flags into these; every other module receives the
values it needs as explicit arguments. A preset carries the reference code's defaults for a
dataset (zhjohnchan/R2GenCMN run scripts); any flag the user gives overrides it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from cmn.errors import ConfigError

MODEL_VARIANTS = ("cmn", "mem", "base")
VISUAL_EXTRACTORS = {"resnet101": 2048, "resnet50": 2048, "resnet18": 512}  # name -> channels of the last conv layer
DATASETS = ("demo", "iu_xray", "mimic_cxr")
MEMORY_IMPLS = ("auto", "naive", "torch", "cpu", "triton")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    vocab_size: int  # model output size: number of token ids including id 0 (BOS/EOS/PAD)
    variant: str = "cmn"  # cmn: one memory shared by image and text; mem: two memories; base: none
    visual_extractor: str = "resnet101"  # torchvision ResNet whose last conv layer gives the patches
    num_views: int = 2  # images per study (IU X-Ray 2, MIMIC-CXR 1), patch sequences concatenated
    d_model: int = 512  # Transformer width
    d_ff: int = 512  # feed-forward width (the reference uses 512, not 4*d_model)
    num_heads: int = 8  # attention heads, also the memory's query "threads"
    num_layers: int = 3  # encoder and decoder layers each
    dropout: float = 0.1  # Transformer dropout
    drop_prob_lm: float = 0.5  # dropout after the visual projection (reference: drop_prob_lm)
    memory_size: int = 2048  # N memory slots
    topk: int = 32  # K memory slots each query keeps
    max_seq_length: int = 60  # generated tokens at most (BOS excluded)
    memory_impl: str = "auto"  # memory_query implementation: auto | naive | torch | cpu | triton

    @property
    def d_vf(self) -> int:
        """Channels of one patch feature, fixed by the backbone."""
        return VISUAL_EXTRACTORS[self.visual_extractor]

    def __post_init__(self) -> None:
        if self.variant not in MODEL_VARIANTS:
            raise ConfigError(f"--model must be one of {', '.join(MODEL_VARIANTS)}, got {self.variant!r}")
        if self.visual_extractor not in VISUAL_EXTRACTORS:
            raise ConfigError(
                f"--visual-extractor must be one of {', '.join(VISUAL_EXTRACTORS)}, got {self.visual_extractor!r}"
            )
        if self.memory_impl not in MEMORY_IMPLS:
            raise ConfigError(f"--memory-impl must be one of {', '.join(MEMORY_IMPLS)}, got {self.memory_impl!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.variant != "base" and not 1 <= self.topk <= self.memory_size:
            raise ConfigError(f"--topk ({self.topk}) must be between 1 and --memory-size ({self.memory_size})")
        if self.vocab_size < 2:
            raise ConfigError(f"vocabulary has {self.vocab_size} ids; it needs at least one token besides id 0")
        if self.num_views < 1:
            raise ConfigError(f"num_views must be >= 1, got {self.num_views}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)} (checkpoint from a newer cmn?)")
        return cls(**d)


@dataclass(frozen=True)
class DataConfig:
    """Where the studies come from and how they become tensors."""

    dataset: str = "demo"  # preset name; also selects the report cleaning rule
    ann_path: Optional[str] = None  # R2Gen annotation.json (demo: generated)
    image_dir: Optional[str] = None  # root the annotation's image paths are relative to
    image_size: int = 224  # crop size fed to the CNN
    num_views: int = 2
    max_seq_length: int = 60  # tokens kept per report, BOS and EOS included (reference truncation)
    threshold: int = 3  # minimum training-set count for a token to enter the vocabulary
    batch_size: int = 16  # global batch (split across ranks under torchrun)
    num_workers: int = 2
    image_cache: Optional[str] = None  # folder for decoded, resized images
    demo_size: tuple[int, int, int] = (700, 100, 100)  # demo train/val/test studies

    @property
    def clean_rule(self) -> str:
        """Report cleaning rule: MIMIC-CXR's for MIMIC, IU X-Ray's otherwise (demo included)."""
        return "mimic_cxr" if self.dataset == "mimic_cxr" else "iu_xray"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and evaluation settings (reference defaults)."""

    epochs: int = 100
    lr_ve: float = 1e-4  # visual extractor learning rate
    lr_ed: float = 5e-4  # everything else
    weight_decay: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    amsgrad: bool = True
    step_size: int = 10  # StepLR period in epochs
    gamma: float = 0.8  # StepLR decay
    seed: int = 7580
    early_stop: int = 50  # epochs without validation BLEU-4 improvement before stopping
    beam_size: int = 3
    # n-gram blocking in beam search. The reference sets block_trigrams=1, but its blocking
    # silently does nothing with beam > 1, so its published scores are unblocked: 0 (off)
    # reproduces them. Templated reports repeat trigrams (". no ..."), so blocking costs BLEU.
    block_ngram: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/cmn"
    resume: bool = False
    trust_pickled_state: bool = False  # --resume may read a cmn 0.1 trainer_state.pt (weights_only, no code runs)
    visual_weights: Optional[str] = "imagenet"  # imagenet | PATH to a state dict | None (random init)
    checkpoint_visual: bool = False  # recompute the CNN's block activations in the backward (less memory)
    low_memory: bool = False  # = precision bf16 + checkpoint_visual: a training step's peak about 1/4 of the reference's
    freeze_bn: bool = False  # BatchNorm on running statistics (small per-GPU batches, exact DDP equivalence)
    sync_bn: bool = True  # under torchrun on CUDA, SyncBatchNorm so batch statistics span all ranks
    eval_max_batches: Optional[int] = None  # cap validation/test batches (smoke tests)
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.beam_size < 1:
            raise ConfigError(f"--beam-size must be >= 1, got {self.beam_size}")


@dataclass(frozen=True)
class Preset:
    """Reference defaults of one dataset; each field is overridable by a flag."""

    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # train_iu_xray.sh of the reference code
    "iu_xray": Preset(
        data=dict(num_views=2, max_seq_length=60, threshold=3, batch_size=16, image_size=224),
        model=dict(visual_extractor="resnet101", num_views=2, max_seq_length=60),
        train=dict(epochs=100, lr_ve=1e-4, lr_ed=5e-4, step_size=10, gamma=0.8, seed=7580, early_stop=50),
    ),
    # train_mimic_cxr.sh of the reference code
    "mimic_cxr": Preset(
        data=dict(num_views=1, max_seq_length=100, threshold=10, batch_size=16, image_size=224),
        model=dict(visual_extractor="resnet101", num_views=1, max_seq_length=100),
        train=dict(epochs=30, lr_ve=1e-4, lr_ed=5e-4, step_size=3, gamma=0.8, seed=9153, early_stop=50),
    ),
    # Built-in synthetic data sized for ~10 minutes on 2 CPU cores: a small backbone,
    # small images and a smaller memory; the model code is the paper configuration's.
    "demo": Preset(
        data=dict(num_views=2, max_seq_length=60, threshold=3, batch_size=16, image_size=96),
        model=dict(
            visual_extractor="resnet18", num_views=2, max_seq_length=60, d_model=256, d_ff=256,
            num_heads=8, num_layers=3, memory_size=512, topk=32,
        ),
        train=dict(
            epochs=10, lr_ve=1e-3, lr_ed=1e-3, step_size=4, gamma=0.8, seed=1234, early_stop=6,
            visual_weights=None,
        ),
    ),
}

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
# name -> channels of the last conv layer (torchvision ResNets)
VISUAL_EXTRACTORS = {"resnet101": 2048, "resnet50": 2048, "resnet18": 512, "resnet34": 512, "resnet152": 2048}
DATASETS = ("demo", "iu_xray", "mimic_cxr")
MEMORY_IMPLS = ("auto", "naive", "torch", "cpu", "triton")
PRECISIONS = ("fp32", "bf16")
CLEAN_RULES = ("iu_xray", "mimic_cxr")
DEMO_SIZE = (700, 100, 100)  # built-in demo data: train/val/test studies
# Upper bounds on numbers a flag or a checkpoint's config.json can set: far above any real use,
# low enough that a typo is an error instead of an out-of-memory crash or hours of work.
MAX_TOKENS = 4096  # max_seq_length / --max-len (the positional encoding covers 5000 positions)
MAX_BEAM = 100
DECODINGS = ("cmn", "reference")  # beam search: cmn's (refills beams, stops when done) or the reference's exact one
# validation scores that can pick the best checkpoint (--monitor); CE_* need a preset that scores clinical efficacy
MONITORS = ("BLEU_4", "BLEU_3", "BLEU_2", "BLEU_1", "METEOR", "ROUGE_L", "CIDEr", "CE_F1")
# Model fields that fix the weights' shapes or meaning; --init-from keeps the bundle's.
ARCHITECTURE_FIELDS = ("variant", "visual_extractor", "d_model", "d_ff", "num_heads", "num_layers", "memory_size")

# Allowed range of every numeric setting, wherever it comes from (a flag, a preset, a checkpoint's
# config.json): (low, high, low_open, high_open). The flags use the same table (cmn.cli).
_INF = float("inf")
BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "vocab_size": (2, 50_000_000, False, False),
    "num_views": (1, 16, False, False),
    "d_model": (1, 16_384, False, False),
    "d_ff": (1, 65_536, False, False),
    "num_heads": (1, 1024, False, False),
    "num_layers": (1, 128, False, False),
    "memory_size": (1, 1 << 20, False, False),
    "topk": (1, 1 << 20, False, False),
    "max_seq_length": (2, MAX_TOKENS, False, False),
    "dropout": (0.0, 1.0, False, True),
    "attention_dropout": (0.0, 1.0, False, True),
    "drop_prob_lm": (0.0, 1.0, False, True),
    "image_size": (32, 4096, False, False),  # the ResNets need 32 px for one patch
    "intensity_jitter": (0.0, 1.0, False, True),
    "threshold": (1, 1 << 40, False, False),
    "batch_size": (1, 1 << 20, False, False),
    "num_workers": (0, 512, False, False),
    "epochs": (1, 1_000_000, False, False),
    "lr_ve": (0.0, 10.0, False, False),
    "lr_ed": (0.0, 10.0, False, False),
    "visual_warmup_epochs": (0, 1_000_000, False, False),
    "visual_warmup_lr": (0.0, 10.0, True, False),
    "weight_decay": (0.0, 10.0, False, False),
    "adam_eps": (0.0, 1.0, True, False),
    "step_size": (1, 1_000_000, False, False),
    "gamma": (0.0, 1.0, True, False),
    "seed": (0, (1 << 63) - 1, False, False),
    "early_stop": (1, 1_000_000, False, False),
    "beam_size": (1, MAX_BEAM, False, False),
    "block_ngram": (0, 1000, False, False),
    "eval_max_batches": (1, 1 << 40, False, False),
}


def describe_bounds(name: str) -> str:
    lo, hi, lo_open, hi_open = BOUNDS[name]
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def in_bounds(name: str, value: Any) -> bool:
    lo, hi, lo_open, hi_open = BOUNDS[name]
    return (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)


def _check_numbers(obj: Any) -> None:
    """Every bounded field of a config: the right type and in range (ConfigError otherwise)."""
    for f in dataclasses.fields(obj):
        if f.name not in BOUNDS:
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        integral = isinstance(BOUNDS[f.name][0], int)
        ok_type = isinstance(value, int) if integral else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not integral and value != value):
            raise ConfigError(f"{f.name} must be {'an integer' if integral else 'a number'}, got {value!r}")
        if not in_bounds(f.name, value):
            raise ConfigError(f"{f.name} must be {describe_bounds(f.name)}, got {value!r}")


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
    dropout: float = 0.1  # residual branches, feed-forward, positional encoding (reference: --dropout)
    attention_dropout: float = 0.1  # attention and memory-selection probabilities (reference: fixed 0.1)
    drop_prob_lm: float = 0.5  # dropout after the visual projection (reference: drop_prob_lm)
    memory_size: int = 2048  # N memory slots
    topk: int = 32  # K memory slots each query keeps
    max_seq_length: int = 60  # generated tokens at most (BOS excluded)
    memory_impl: str = "auto"  # memory_query implementation: auto | naive | torch | cpu | triton
    joint_view_bn: bool = False  # CNN BatchNorm statistics over all views at once (reference: per view)

    @property
    def d_vf(self) -> int:
        """Channels of one patch feature, fixed by the backbone."""
        return VISUAL_EXTRACTORS[self.visual_extractor]

    def __post_init__(self) -> None:
        _check_numbers(self)
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
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)} (checkpoint from a newer cmn?)")
        return cls(**d)


@dataclass(frozen=True)
class DataConfig:
    """Where the studies come from and how they become tensors."""

    dataset: str = "demo"  # preset name, recorded in checkpoints and metrics
    ann_path: Optional[str] = None  # R2Gen annotation.json (demo: generated)
    image_dir: Optional[str] = None  # root the annotation's image paths are relative to
    image_size: int = 224  # crop size fed to the CNN
    num_views: int = 2
    max_seq_length: int = 60  # tokens kept per report, BOS and EOS included (reference truncation)
    threshold: int = 3  # minimum training-set count for a token to enter the vocabulary
    batch_size: int = 16  # global batch (split across ranks under torchrun)
    num_workers: int = 2
    image_cache: Optional[str] = None  # folder for decoded, resized images
    clean_rule: str = "iu_xray"  # report cleaning: the reference's iu_xray or mimic_cxr rules
    clinical: bool = False  # also score clinical efficacy (CheXpert labels) in validation and test
    hflip: bool = True  # random horizontal flip in training, as the reference
    random_crop: bool = True  # train on random crops of a 1.14x larger resize, as the reference
    # training only: brightness and contrast each scaled by a factor drawn from [1 - j, 1 + j]
    # (0 = off, as the reference); exposure changes, never a finding's place, size or side
    intensity_jitter: float = 0.0
    demo_size: Optional[tuple[int, int, int]] = None  # generate the demo data: train/val/test studies

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.clean_rule not in CLEAN_RULES:
            raise ConfigError(f"clean_rule must be one of {', '.join(CLEAN_RULES)}, got {self.clean_rule!r}")
        if self.demo_size is not None:
            if len(self.demo_size) != 3 or not all(isinstance(n, int) and 1 <= n <= 1_000_000 for n in self.demo_size):
                raise ConfigError(f"--demo-size needs three study counts from 1 to 1000000, got {self.demo_size}")


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
    # the validation score that picks the best checkpoint and counts towards early_stop (the reference: BLEU_4)
    monitor: str = "BLEU_4"
    early_stop: int = 50  # epochs without improvement of the monitored validation score before stopping
    beam_size: int = 3
    # n-gram blocking in beam search. The reference sets block_trigrams=1, but its blocking
    # silently does nothing with beam > 1, so its published scores are unblocked: 0 (off)
    # reproduces them. Templated reports repeat trigrams (". no ..."), so blocking costs BLEU.
    block_ngram: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/cmn"
    resume: bool = False
    overwrite: bool = False  # replace a run already in output_dir (otherwise an error)
    init_from: Optional[str] = None  # start from a bundle's weights (and its optimizer state, if it has one)
    decode: str = "cmn"  # beam search of validation/test: cmn | reference
    trust_pickled_state: bool = False  # --resume may read a cmn 0.1 trainer_state.pt (weights_only, no code runs)
    visual_weights: Optional[str] = "imagenet"  # imagenet | PATH to a state dict | None (random init)
    # epochs the CNN first learns the training reports' CheXpert labels (cmn.warmup); 0: off, as the reference
    visual_warmup_epochs: int = 0
    visual_warmup_lr: float = 1e-3  # Adam, cosine decay to 0 over the warm-up
    checkpoint_visual: bool = False  # recompute the CNN's block activations in the backward (less memory)
    low_memory: bool = (
        False  # = precision bf16 + checkpoint_visual: a training step's peak about 1/4 of the reference's
    )
    freeze_bn: bool = False  # BatchNorm on running statistics (small per-GPU batches, exact DDP equivalence)
    sync_bn: bool = True  # under torchrun on CUDA, SyncBatchNorm so batch statistics span all ranks
    eval_max_batches: Optional[int] = None  # cap validation/test batches (smoke tests)

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.beam_size < 1:
            raise ConfigError(f"--beam-size must be >= 1, got {self.beam_size}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"--monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.decode not in DECODINGS:
            raise ConfigError(f"--decode must be one of {', '.join(DECODINGS)}, got {self.decode!r}")
        if self.decode == "reference" and (self.beam_size < 2 or self.block_ngram):
            raise ConfigError(
                "--decode reference needs --beam-size >= 2 and no --block-ngram (the reference samples "
                "at random with beam 1, and its trigram blocking does nothing with beams)"
            )
        if self.init_from and self.resume:
            raise ConfigError("--init-from starts a new run; --resume continues one: give only one of them")


@dataclass(frozen=True)
class Preset:
    """Reference defaults of one dataset; each field is overridable by a flag."""

    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # train_iu_xray.sh of the reference code
    "iu_xray": Preset(
        data=dict(num_views=2, max_seq_length=60, threshold=3, batch_size=16, image_size=224, clean_rule="iu_xray"),
        model=dict(visual_extractor="resnet101", num_views=2, max_seq_length=60),
        train=dict(epochs=100, lr_ve=1e-4, lr_ed=5e-4, step_size=10, gamma=0.8, seed=7580, early_stop=50),
    ),
    # train_mimic_cxr.sh of the reference code
    "mimic_cxr": Preset(
        data=dict(
            num_views=1,
            max_seq_length=100,
            threshold=10,
            batch_size=16,
            image_size=224,
            clean_rule="mimic_cxr",
            clinical=True,
        ),
        model=dict(visual_extractor="resnet101", num_views=1, max_seq_length=100),
        train=dict(epochs=30, lr_ve=1e-4, lr_ed=5e-4, step_size=3, gamma=0.8, seed=9153, early_stop=50),
    ),
    # Built-in synthetic data sized for about 10 minutes on 2 CPU cores: a small backbone from random
    # init, small images, a one-layer encoder-decoder and a smaller memory; the model code is the
    # paper configuration's. What makes it learn the images (README, "Demo results"): with no
    # pretrained CNN, the report loss alone washes the random-init features out before the
    # encoder-decoder reads them, so the CNN is first warmed up on the CheXpert labels of the
    # training reports (cmn.warmup) and then kept frozen; training images keep the evaluation
    # scale (no random crop: reports state sizes) and side (no flip: reports state sides);
    # batch 8 and lr_ed 2e-3 give the small encoder-decoder enough steps.
    "demo": Preset(
        # hflip off: demo reports name the side of a finding, so a mirrored image contradicts them;
        # random crop off: they state sizes, and the crop shows training images 1.14x larger;
        # intensity jitter on: the demo's exposure and contrast vary by study, and a CNN trained on
        # 700 studies without it tells faint opacities (consolidations, nodules) from exposure poorly
        data=dict(
            num_views=2,
            max_seq_length=60,
            threshold=3,
            batch_size=8,
            image_size=96,
            clean_rule="iu_xray",
            clinical=True,
            hflip=False,
            random_crop=False,
            intensity_jitter=0.2,
            demo_size=DEMO_SIZE,
        ),
        model=dict(
            visual_extractor="resnet18",
            num_views=2,
            max_seq_length=60,
            d_model=128,
            d_ff=256,
            num_heads=8,
            num_layers=1,
            memory_size=512,
            topk=32,
            drop_prob_lm=0.1,
        ),
        train=dict(
            epochs=14,
            lr_ve=0.0,  # the warmed-up CNN stays as it is: no CNN backward, 2-3x faster epochs
            lr_ed=2e-3,
            step_size=4,
            gamma=0.8,
            seed=1234,
            # the checkpoint kept is the epoch whose validation reports state the findings best (CE F1):
            # validation BLEU-4 of templated demo reports moves by < 0.01 between late epochs
            monitor="CE_F1",
            early_stop=14,
            visual_weights=None,
            visual_warmup_epochs=8,
            visual_warmup_lr=1e-3,
        ),
    ),
}

"""Tiny models, inputs and runs shared by the tests (seconds on a CPU)."""

import torch

from cmn.config import DataConfig, ModelConfig, TrainConfig


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=30,
        visual_extractor="resnet18",
        d_model=32,
        d_ff=32,
        num_heads=4,
        num_layers=2,
        memory_size=16,
        topk=4,
        num_views=2,
        max_seq_length=10,
        dropout=0.0,
        attention_dropout=0.0,
        drop_prob_lm=0.0,
    )
    base.update(kw)
    return ModelConfig(**base)


def inputs(B=2, V=2, S=64, T=8, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, V, 3, S, S, generator=g)  # (B, V, 3, S, S)
    targets = torch.randint(1, vocab, (B, T), generator=g)  # (B, T)
    targets[:, 0] = 0
    targets[0, -1] = 0
    targets[1, -3:] = 0  # EOS then padding
    return images, targets


TINY_MODEL = dict(
    variant="cmn",
    visual_extractor="resnet18",
    d_model=32,
    d_ff=32,
    num_heads=4,
    num_layers=1,
    memory_size=32,
    topk=4,
    dropout=0.1,
    drop_prob_lm=0.1,
    num_views=2,
    max_seq_length=60,
)


def tiny_run(tmp_path, out, workers=0, **train_kw):
    data = DataConfig(
        dataset="demo", image_size=64, batch_size=4, num_workers=workers, demo_size=(8, 4, 4), clinical=True, hflip=True
    )
    kw = dict(
        epochs=2,
        seed=3,
        output_dir=str(tmp_path / out),
        visual_weights=None,
        beam_size=2,
        lr_ve=1e-3,
        lr_ed=1e-3,
        step_size=1,
        gamma=0.5,
    )
    kw.update(train_kw)
    return data, dict(TINY_MODEL), TrainConfig(**kw)


# cmn-train flags of a tiny demo run (seconds on a CPU): data, model; add epochs, beam, output
TINY_DEMO_FLAGS = [
    "--dataset", "demo", "--demo-size", "8", "4", "4", "--image-size", "64", "--batch-size", "4",
    "--num-workers", "0", "--d-model", "32", "--d-ff", "32", "--num-heads", "4", "--num-layers", "1",
    "--memory-size", "32", "--topk", "4",
]  # fmt: skip

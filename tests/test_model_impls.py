"""The full model gives the same logits and gradients with every memory_query implementation.

Tolerances are derived, not guessed: the naive implementation in fp64 is the ground truth,
and each fp32 implementation may be off from it by at most twice what naive fp32 is (plus a
floor for quantities that are ~0). The triton implementation runs under TRITON_INTERPRET=1
here (tests/conftest.py sets it on machines without CUDA), so the shapes stay tiny:
2 heads, 32 memory slots, 10 query rows.
"""

import pytest
import torch

from cmn.model import build_model
from helpers.tiny import inputs, tiny_cfg


def run(impl, variant, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = tiny_cfg(
        variant=variant, d_model=16, d_ff=16, num_heads=2, num_layers=1, memory_size=32, topk=4, memory_impl=impl
    )
    model = build_model(cfg).to(dtype).train()  # dropout is 0 in tiny_cfg; BatchNorm uses batch statistics
    images, targets = inputs(B=2, S=32, T=6)
    logprobs = model(images.to(dtype), targets)
    logprobs.sum().backward()
    grads = {n: p.grad.clone().double() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach().double(), grads


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", ["cmn", "mem"])
def test_same_logits_and_gradients_for_every_impl(variant):
    truth_logits, truth_grads = run("naive", variant, torch.float64)
    ref_logits, ref_grads = run("naive", variant)
    assert any(n.endswith("memory.weight") for n in ref_grads)  # gradients reach the memory matrix
    for impl in ("torch", "cpu", "triton"):
        logits, grads = run(impl, variant)
        assert max_err(logits, truth_logits) <= 2 * max_err(ref_logits, truth_logits) + 1e-6, impl
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            scale = truth_grads[name].abs().max().item()
            allowed = 2 * max_err(ref_grads[name], truth_grads[name]) + 1e-6 * max(scale, 1.0)
            assert max_err(g, truth_grads[name]) <= allowed, f"{impl}: {name}"


def test_config_selects_the_impl():
    model = build_model(tiny_cfg(memory_impl="torch", variant="mem"))
    assert model.visual_memory_query.impl == model.text_memory_query.impl == "torch"

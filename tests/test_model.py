"""Model variants, the memory's role in each, and incremental vs full decoding."""

import copy
import itertools
import math

import pytest
import torch

from cmn.errors import ConfigError
from cmn.model import build_model
from cmn.ops import memory_query
from helpers.tiny import inputs, tiny_cfg
from helpers.tolerance import assert_close_derived


def param_names(model):
    return {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("variant", ["cmn", "mem", "base"])
def test_shapes(variant):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant=variant)).eval()
    images, targets = inputs()
    logprobs = model(images, targets)
    assert logprobs.shape == (2, 7, 30)
    assert logprobs.dtype == torch.float32
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(2, 7), atol=1e-5)
    # 64x64 images -> 2x2 patches per view, two views concatenated
    assert model.encode(images, model.memory_kv()[0]).shape == (2, 8, 32)


def test_variants_differ_as_described():
    names = {v: param_names(build_model(tiny_cfg(variant=v))) for v in ("cmn", "mem", "base")}
    assert not any("memory" in n for n in names["base"])
    # CMN: one matrix and one set of projections shared by both modalities
    assert {n for n in names["cmn"] if n.startswith("memory.")} == {"memory.weight"}
    assert {n.split(".")[0] for n in names["cmn"] if "memory" in n} == {"memory", "memory_query"}
    # MEM: a memory and projections for each modality
    assert {n.split(".")[0] for n in names["mem"] if "memory" in n} == {
        "visual_memory",
        "text_memory",
        "visual_memory_query",
        "text_memory_query",
    }
    extra = len(names["cmn"] - names["base"])
    assert extra == 1 + 4 * 2  # matrix + q/k/v/out weights and biases
    assert len(names["mem"] - names["base"]) == 2 * extra


def test_cmn_memory_is_used_by_both_sides():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant="cmn")).eval()
    images, targets = inputs()
    with torch.no_grad():
        model.memory.weight.normal_()
        before = model(images, targets)
        visual_kv, text_kv = model.memory_kv()
        assert visual_kv is text_kv  # one projected memory serves image and text
        enc = model.encode(images, visual_kv)
        model.memory.weight.mul_(3.0)
        assert not torch.allclose(model.encode(images, model.memory_kv()[0]), enc)
        assert not torch.allclose(
            model.embed_tokens(targets, model.memory_kv()[1]), model.embed_tokens(targets, text_kv)
        )
        assert not torch.allclose(model(images, targets), before)


def test_memory_query_hand_computed():
    # one head, N=3 memory slots, K=2: scores / sqrt(d), top-2, softmax, weighted values
    q = torch.tensor([[[[1.0, 0.0]]]])  # (B=1, H=1, L=1, d=2)
    k = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (H=1, N=3, d=2)
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (H, N, d)
    s = [2 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]  # slots 0 and 2 win
    w0 = math.exp(s[0]) / (math.exp(s[0]) + math.exp(s[2]))
    expected = torch.tensor([w0 * 1 + (1 - w0) * 5, w0 * 2 + (1 - w0) * 6])
    for impl in ("naive", "torch"):
        out, idx, w = memory_query(q, k, v, 2, impl=impl, return_selection=True)
        assert torch.allclose(out[0, 0, 0], expected, atol=1e-6), impl
        assert sorted(idx[0, 0, 0].tolist()) == [0, 2]
        assert torch.allclose(w[0, 0, 0].sort().values, torch.tensor([1 - w0, w0]), atol=1e-6)


@pytest.mark.parametrize("variant", ["cmn", "mem", "base"])
def test_incremental_decoding_equals_full_redecoding(variant):
    torch.manual_seed(1)
    model = build_model(tiny_cfg(variant=variant)).eval()
    images, _ = inputs(B=3)
    model64 = copy.deepcopy(model).double()  # the reference path in fp64: its own rounding error
    with torch.no_grad():
        cached = model.start_decoding(images, 2)
        full = model.start_decoding(images, 2, reference=True)
        full64 = model64.start_decoding(images.double(), 2, reference=True)
        tokens = torch.zeros(6, dtype=torch.long)
        for t in range(7):
            a, b, c = cached.step(tokens), full.step(tokens), full64.step(tokens)
            assert_close_derived(a, b, c, msg=f"step {t}")
            tokens = a.argmax(-1)
            if t == 3:  # rows drop out and reorder, as beams and finished studies do
                index = torch.tensor([4, 0, 2])
                for d in (cached, full, full64):
                    d.reorder(index)
                tokens = tokens[index]


def test_teacher_forcing_equals_stepwise():
    torch.manual_seed(2)
    model = build_model(tiny_cfg()).eval()
    images, targets = inputs()
    targets[1, -3:] = 5  # no padding: every position is a real token
    with torch.no_grad():
        forced = model(images, targets)
        forced64 = copy.deepcopy(model).double()(images.double(), targets)
        dec = model.start_decoding(images)
        stepped = torch.stack([dec.step(targets[:, t]) for t in range(targets.shape[1] - 1)], 1)
    assert_close_derived(stepped, forced, forced64, msg="stepwise vs teacher-forced")


@pytest.mark.parametrize("variant", ["cmn", "mem", "base"])
def test_generation_with_cache_equals_reference_decoding(variant):
    from cmn.decode import beam_search, greedy_search

    torch.manual_seed(3)
    model = build_model(tiny_cfg(variant=variant)).eval()
    images, _ = inputs(B=3)
    with torch.no_grad():
        for beam in (1, 3):
            if beam == 1:
                a = greedy_search(model.start_decoding(images), 3, 9)
                b = greedy_search(model.start_decoding(images, reference=True), 3, 9)
                assert a == b
                continue
            a = beam_search(model.start_decoding(images, beam), 3, beam, 9, n_best=beam)
            b = beam_search(model.start_decoding(images, beam, reference=True), 3, beam, 9, n_best=beam)
            assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
            model64 = copy.deepcopy(model).double()
            c = beam_search(model64.start_decoding(images.double(), beam, reference=True), 3, beam, 9, n_best=beam)
            for ha, hb, hc in zip(itertools.chain(*a), itertools.chain(*b), itertools.chain(*c)):
                assert ha.tokens == hc.tokens
                s32, s64 = torch.tensor([ha.score, hb.score]), torch.tensor([hc.score, hc.score], dtype=torch.float64)
                assert_close_derived(s32[:1], s32[1:], s64[1:], msg="beam score")


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="--model"):
        tiny_cfg(variant="transformer")
    with pytest.raises(ConfigError, match="--topk"):
        tiny_cfg(topk=64)
    with pytest.raises(ConfigError, match="divisible"):
        tiny_cfg(num_heads=5)
    with pytest.raises(ConfigError, match="--visual-extractor"):
        tiny_cfg(visual_extractor="vgg16")

"""Explanation arrays: the attention-weights path, the memory overlap, and explain_study on a tiny model."""

import copy
import math

import numpy as np
import pytest
import torch

from cmn.explain import entities_of, explain_study, memory_overlap
from cmn.inference import generate_reports
from cmn.model.memory import MemoryQuery
from cmn.model.transformer import MultiHeadAttention
from helpers.explain_fixtures import demo_data, demo_reports, demo_views, tiny_model
from helpers.tolerance import assert_close_derived, sum_atol


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("explain") / "demo")


@pytest.fixture(scope="module")
def model(demo, tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("ckpt") / "cmn", demo, "cmn")


@pytest.fixture(scope="module", params=["cmn", "mem", "base"])
def any_model(request, model, demo, tmp_path_factory):
    if request.param == "cmn":
        return model
    return tiny_model(tmp_path_factory.mktemp("ckpt") / request.param, demo, request.param)


@pytest.mark.parametrize("masked", [False, True])
def test_attend_weights_path_gives_the_sdpa_outputs(masked):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, dropout=0.1).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 32)  # (B, L, D), (B, S, D)
    k, v = mha.project_kv(ctx)  # (B, H, S, d_k)
    mask = None
    if masked:
        mask = torch.rand(2, 5, 7) > 0.3
        mask[..., 0] = True  # every row sees at least one key
    expected = mha.attend(x, k, v, mask)
    mha64 = copy.deepcopy(mha).double()
    expected64 = mha64.attend(x.double(), k.double(), v.double(), mask)
    out, weights = mha.attend(x, k, v, mask, return_weights=True)
    assert_close_derived(out, expected, expected64, msg="explicit-softmax attention")
    assert weights.shape == (2, 4, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    if masked:
        assert (weights.masked_select(~mask.unsqueeze(1)) == 0).all()


def test_attend_weights_refuses_training_mode():
    mha = MultiHeadAttention(8, 2, dropout=0.1).train()
    k, v = mha.project_kv(torch.randn(1, 3, 8))
    with pytest.raises(RuntimeError, match="eval mode"):
        mha.attend(torch.randn(1, 2, 8), k, v, None, return_weights=True)


def test_memory_query_selection_keeps_the_response():
    torch.manual_seed(0)
    q = MemoryQuery(32, 4, topk=3, dropout=0.0, impl="torch").eval()
    kv = q.project_memory(torch.randn(10, 32))
    x = torch.randn(2, 6, 32)
    out, idx, weights = q(x, kv, return_selection=True)
    torch.testing.assert_close(out, q(x, kv))
    assert idx.shape == weights.shape == (2, 4, 6, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


def test_memory_overlap_hand_computed():
    # two heads, top-2: head 0 shares slot 5 (0.3 vs 0.6 -> 0.3); head 1 shares slots 1 and 2
    # (min(0.5, 0.1) + min(0.5, 0.9) = 0.6); mean over heads 0.45.
    a_slots = np.array([[[3, 5], [1, 2]]])
    a_w = np.array([[[0.7, 0.3], [0.5, 0.5]]])
    b_slots = np.array([[[5, 9], [2, 1]], [[3, 5], [1, 2]], [[0, 4], [6, 7]]])
    b_w = np.array([[[0.6, 0.4], [0.9, 0.1]], [[0.7, 0.3], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    got = memory_overlap(a_slots, a_w, b_slots, b_w)
    np.testing.assert_allclose(got, [[0.45, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(memory_overlap(b_slots, b_w, a_slots, a_w), got.T, atol=1e-6)


def test_explanation_arrays(any_model, demo):
    model = any_model
    e = explain_study(model, demo_views(demo), study_id="s0")
    assert e.report == generate_reports(model, [demo_views(demo)])[0]
    T, V = len(e.words), 2
    Y = model.config.num_layers
    assert T > 0 and e.report == " ".join(e.words)
    assert e.cross_attention.shape == (Y, T, V, 2, 2)
    # each layer's map of each word is a distribution over all patches of all views
    np.testing.assert_allclose(e.cross_attention.sum(axis=(2, 3, 4)), np.ones((Y, T)), atol=sum_atol(V * 2 * 2))
    np.testing.assert_allclose(e.attention([0, T - 1]).sum(), 1.0, atol=sum_atol(2 * V * 2 * 2 * Y))
    assert [im.shape for im in e.images] == [(64, 64, 3)] * 2
    assert e.labels.shape == (14,)
    if model.config.variant == "base":
        assert e.word_slots is None and e.patch_slots is None
        return
    H, K, N = model.config.num_heads, model.config.topk, model.config.memory_size
    assert e.patch_slots.shape == e.patch_slot_weights.shape == (V, 2, 2, H, K)
    assert e.word_slots.shape == e.word_slot_weights.shape == (T, H, K)
    assert e.word_slots.min() >= 0 and e.word_slots.max() < N
    np.testing.assert_allclose(e.patch_slot_weights.sum(-1), 1.0, atol=sum_atol(e.patch_slot_weights.shape[-1]))
    if model.config.variant == "mem":
        assert not e.shared_memory
        with pytest.raises(ValueError, match="one memory"):
            e.overlap(0)
        return
    ov = e.overlap_matrix()
    assert ov.shape == (T, V, 2, 2) and (ov >= 0).all() and (ov <= 1 + 1e-6).all()
    np.testing.assert_allclose(e.overlap(1), ov[1], atol=1e-6)
    np.testing.assert_allclose(e.overlap([0, 1]), ov[:2].mean(0), atol=1e-6)


def test_each_word_map_comes_from_the_step_that_wrote_it(model, demo):
    """The map of word i is the decoder step that produced it: it depends on words < i only,
    while the memory reading of word i depends on word i itself."""
    a = "the heart size is normal . the lungs are clear ."
    b = "the heart size is enlarged . the lungs are clear ."
    ea = explain_study(model, demo_views(demo), report=a)
    eb = explain_study(model, demo_views(demo), report=b)
    k = a.split().index("normal")
    np.testing.assert_allclose(ea.cross_attention[:, : k + 1], eb.cross_attention[:, : k + 1], atol=1e-6)
    assert not np.allclose(ea.cross_attention[:, k + 1], eb.cross_attention[:, k + 1], atol=1e-6)
    np.testing.assert_array_equal(ea.word_slots[:k], eb.word_slots[:k])
    assert not np.allclose(ea.word_slot_weights[k], eb.word_slot_weights[k])


def test_explain_a_given_report_and_its_entities(model, demo):
    report = demo_reports(demo, "test")[0]
    e = explain_study(model, demo_views(demo), report=report)
    assert e.report == model.tokenizer.decode(model.tokenizer.encode(report))
    assert e.entities
    for en in e.entities:
        assert " ".join(e.words[i] for i in en.words) == en.text


def test_entities_map_phrases_to_words():
    words = ["there", "is", "a", "small", "left", "pleural", "effusion", ".", "no", "pneumothorax", "."]
    ents = entities_of(words)
    by_obs = {en.observation: en for en in ents}
    assert by_obs["Pleural Effusion"].label == 1.0
    assert [words[i] for i in by_obs["Pleural Effusion"].words][-1] == "effusion"
    assert by_obs["Pneumothorax"].label == 0.0 and by_obs["Pneumothorax"].words == (9,)


def test_explain_from_a_tensor_matches_paths(model, demo):
    from cmn.inference import load_study

    tensor, _ = load_study(model, demo_views(demo))
    e1 = explain_study(model, tensor)
    e2 = explain_study(model, demo_views(demo))
    assert e1.words == e2.words
    np.testing.assert_allclose(e1.cross_attention, e2.cross_attention, atol=1e-6)
    assert e1.images[0].shape == (64, 64, 3) and not math.isnan(float(e1.images[0].mean()))


def test_model_mode_is_restored(model, demo):
    model.model.train()
    try:
        explain_study(model, demo_views(demo))
        assert model.model.training
    finally:
        model.model.eval()

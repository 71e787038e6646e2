"""Training as the reference trains: BatchNorm per view, dropout where the reference puts it.

The spec is the reference's order of computation, written out here: the CNN (plain
torchvision BatchNorm) runs once per view in training mode, view 0 then view 1, the patch
sequences are concatenated, and the rest of the model follows.
"""

import copy

import pytest
import torch
import torchvision

from cmn.engine import masked_nll
from cmn.model import build_model
from helpers.tiny import tiny_cfg

BOUND = 1e-10  # fp64: same operations in another grouping


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(tiny_cfg(**{"vocab_size": 12, "num_layers": 1, "max_seq_length": 60, **kw})).double()


def batch(B=3, V=2, S=64):
    torch.manual_seed(1)
    images = torch.randn(B, V, 3, S, S, dtype=torch.float64)
    targets = torch.tensor([[0, 3, 4, 5, 0, 0], [0, 6, 7, 0, 0, 0], [0, 2, 2, 2, 9, 0]][:B])
    masks = torch.zeros(targets.shape, dtype=torch.float64)
    for i, row in enumerate(targets):
        masks[i, : int((row > 0).sum()) + 2] = 1
    return images, targets, masks


def reference_step(model, images, targets, masks):
    """One training step's loss the reference's way; returns (loss, plain trunk)."""
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).double()
    trunk.load_state_dict(model.visual.trunk.state_dict())
    trunk.train()
    views = []
    for v in range(images.shape[1]):  # one CNN call per view, in order
        fmap = trunk(images[:, v])  # (B, C, h, w)
        views.append(fmap.flatten(2).transpose(1, 2))  # (B, P, C)
    patches = torch.cat(views, 1)  # (B, V*P, C)
    return masked_nll(model.forward_patches(patches, targets), targets, masks), trunk


@pytest.mark.parametrize("variant", ["cmn", "mem", "base"])
def test_train_step_equals_per_view_reference(variant):
    model = tiny(variant=variant).train()
    spec = copy.deepcopy(model)
    images, targets, masks = batch()
    loss = masked_nll(model(images, targets), targets, masks)
    loss.backward()
    ref_loss, ref_trunk = reference_step(spec, images, targets, masks)
    ref_loss.backward()
    assert abs(float((loss - ref_loss).detach())) <= BOUND
    ref_grads = {"visual.trunk." + k: p.grad for k, p in ref_trunk.named_parameters()}
    ref_grads.update({k: p.grad for k, p in spec.named_parameters() if not k.startswith("visual.")})
    for name, p in model.named_parameters():
        want = ref_grads[name]
        assert (p.grad is None) == (want is None), name
        if want is not None:
            assert float((p.grad - want).abs().max()) <= BOUND * max(1.0, float(want.abs().max())), name
    ours, theirs = model.visual.trunk.state_dict(), ref_trunk.state_dict()
    for k, v in theirs.items():
        if k.endswith("num_batches_tracked"):
            assert int(ours[k]) == int(v) == 2, k  # updated once per view
        elif k.endswith(("running_mean", "running_var")):
            assert float((ours[k] - v).abs().max()) <= BOUND, k


def test_checkpointed_cnn_keeps_per_view_semantics():
    model, plain = tiny().train(), tiny().train()
    model.visual.grad_checkpoint = True
    images, targets, masks = batch()
    for m in (model, plain):
        masked_nll(m(images, targets), targets, masks).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert float((a.grad - b.grad).abs().max()) <= BOUND * max(1.0, float(b.grad.abs().max())), name
    for (k, a), (_, b) in zip(model.visual.trunk.state_dict().items(), plain.visual.trunk.state_dict().items()):
        assert torch.equal(a, b) if k.endswith("num_batches_tracked") else float((a - b).abs().max()) <= BOUND, k


def test_joint_view_bn_pools_the_views():
    per_view, joint = tiny().train(), tiny(joint_view_bn=True).train()
    images, targets, _ = batch()
    a, b = per_view(images, targets), joint(images, targets)
    assert float((a - b).detach().abs().max()) > 1e-4  # different statistics
    assert int(joint.visual.trunk[1].num_batches_tracked) == 1
    assert int(per_view.visual.trunk[1].num_batches_tracked) == 2
    per_view.eval(), joint.eval()
    joint.load_state_dict(per_view.state_dict())
    with torch.no_grad():
        assert torch.equal(per_view(images, targets), joint(images, targets))  # eval: the same function


def test_dropout_placement_matches_the_reference():
    """--dropout: residual branches, feed-forward, positional encodings; attention and memory
    probabilities: attention_dropout (the reference's fixed 0.1); after the visual projection:
    drop_prob_lm."""
    model = tiny(dropout=0.3, attention_dropout=0.1, drop_prob_lm=0.5)
    attn = [m for n, m in model.named_modules() if n.endswith(("self_attn", "src_attn"))]
    assert attn and all(m.dropout == 0.1 for m in attn)
    assert model.memory_query.dropout == 0.1
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert rates.pop("att_embed.2") == 0.5
    assert rates and set(rates.values()) == {0.3}, rates
    assert {n.rsplit(".", 1)[0] for n in rates} >= {
        "src_pos",
        "tgt_pos",
        "encoder.layers.0",
        "encoder.layers.0.ff",
        "decoder.layers.0",
        "decoder.layers.0.ff",
    }

"""Pretrained CNN weights: local files, torchvision's cache, and the no-weights fallback.

No test downloads anything: the weights files are made here from a randomly initialised
torchvision ResNet-18.
"""

import copy
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from cmn.errors import CheckpointError, ConfigError
from cmn.model.visual import VisualExtractor
from helpers.tolerance import assert_close_derived


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def assert_loaded(extractor, state):
    trunk = extractor.trunk.state_dict()
    assert torch.equal(trunk["0.weight"], state["conv1.weight"])
    assert torch.equal(trunk["7.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def test_patch_features_shape():
    ve = VisualExtractor("resnet18").eval()
    out = ve(torch.randn(2, 2, 3, 128, 128))  # (B, V, 3, S, S)
    assert out.shape == (2, 2 * 16, 512)  # 4x4 patches per view at 128 px


def test_views_share_the_cnn():
    ve = VisualExtractor("resnet18").eval()
    x = torch.randn(1, 2, 3, 64, 64)
    both = ve(x)
    first = ve(x[:, :1])
    torch.testing.assert_close(both[:, :4], first)


def test_local_pth_and_safetensors(tmp_path, resnet18_state):
    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save(resnet18_state, pth)
    save_file(resnet18_state, str(st))
    for path in (pth, st):
        ve = VisualExtractor("resnet18")
        assert "weights from" in ve.load_pretrained(str(path))
        assert_loaded(ve, resnet18_state)


def test_torchvision_cache_is_used(tmp_path, monkeypatch, resnet18_state):
    # torchvision looks in $TORCH_HOME/hub/checkpoints/<file name of the URL> before downloading
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ve = VisualExtractor("resnet18")
    assert "ImageNet weights" in ve.load_pretrained("imagenet")
    assert_loaded(ve, resnet18_state)


def test_unavailable_imagenet_weights_warn_and_keep_random_init(monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(type(weights), "get_state_dict", no_network)
    ve = VisualExtractor("resnet18")
    before = ve.trunk[0].weight.clone()
    with pytest.warns(RuntimeWarning, match="random init.*--visual-weights"):
        msg = ve.load_pretrained("imagenet")
    assert "random init" in msg
    assert torch.equal(ve.trunk[0].weight, before)


def test_bad_weight_files(tmp_path, resnet18_state):
    with pytest.raises(ConfigError, match="no such file"):
        VisualExtractor("resnet18").load_pretrained(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="junk.pth"):
        VisualExtractor("resnet18").load_pretrained(str(junk))
    r50 = tmp_path / "r50.pth"
    torch.save(resnet18_state, r50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="does not match resnet50"):
            VisualExtractor("resnet50").load_pretrained(str(r50))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = VisualExtractor("resnet18").train()
    b = VisualExtractor("resnet18").train()
    b.load_state_dict(a.state_dict())
    b.grad_checkpoint = True
    c = copy.deepcopy(a).double()  # the plain path in fp64: its own rounding error sets the tolerance
    x = torch.randn(2, 2, 3, 64, 64)
    ya, yb, yc = a(x), b(x), c(x.double())
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    yc.square().sum().backward()
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert_close_derived(pb.grad, pa.grad, pc.grad, msg=n)
    # BatchNorm running statistics are updated once per step, not again by the recomputation
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, msg=n)

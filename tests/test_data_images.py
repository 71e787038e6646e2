"""cmn.data.images and cmn.data.cache: decoding errors, transforms, the resized-image cache."""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cmn.data.cache import ImageCache
from cmn.data.images import build_transform, load_image, resize_size
from cmn.errors import DataError


def gradient_image(path, size=(40, 30), mode="L", fmt=None):
    """A smooth test image (W, H) written to ``path``."""
    w, h = size
    arr = (np.add.outer(np.arange(h) * 3, np.arange(w) * 5) % 256).astype(np.uint8)  # (H, W)
    img = Image.fromarray(arr)
    if mode != "L":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_load_png_gray_becomes_rgb(tmp_path):
    img = load_image(gradient_image(tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_load_jpeg(tmp_path):
    img = load_image(gradient_image(tmp_path / "a.jpg", mode="RGB"))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_missing_image(tmp_path):
    with pytest.raises(DataError, match=r"a\.png: image file not found"):
        load_image(tmp_path / "a.png")


def test_directory_instead_of_image(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_truncated_image(tmp_path, name):
    path = truncate(gradient_image(tmp_path / name, size=(200, 150), mode="RGB"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "a.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"a\.png: (not a readable image|corrupt or truncated)"):
        load_image(path)


def test_resize_size_matches_reference():
    assert resize_size(224) == 256
    assert resize_size(112) == 128


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [224, 64])
def test_transform_shape_and_normalisation(tmp_path, train, size):
    tf = build_transform(size, train=train)
    out = tf(load_image(gradient_image(tmp_path / "a.png", size=(50, 70))))
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    # ImageNet normalisation maps [0, 1] to about [-2.1, 2.6].
    assert out.min() > -2.2 and out.max() < 2.7


def test_eval_transform_is_deterministic(tmp_path):
    tf = build_transform(32, train=False)
    img = load_image(gradient_image(tmp_path / "a.png"))
    assert torch.equal(tf(img), tf(img))


def test_train_resize_keeps_aspect_ratio(tmp_path):
    tf = build_transform(56, train=True)
    img = tf.resize(load_image(gradient_image(tmp_path / "a.png", size=(40, 80))))
    assert img.size == (64, 128)  # shorter side to round(56 * 256 / 224)


def test_train_without_crop_sees_images_at_the_eval_scale(tmp_path):
    """crop=False (the demo preset): training images are the eval transform's square resize,
    flipped or not, so sizes in the images mean the same in training and evaluation."""
    img = load_image(gradient_image(tmp_path / "a.png", size=(40, 80)))
    eval_x = build_transform(32, train=False)(img)
    assert torch.equal(build_transform(32, train=True, hflip=False, crop=False)(img), eval_x)
    flip = build_transform(32, train=True, hflip=True, crop=False)
    assert flip.resize_key == build_transform(32, train=False).resize_key  # one cache entry serves both
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        x = flip(img)
        assert torch.equal(x, eval_x) or torch.equal(x, eval_x.flip(-1))
        seen.add(torch.equal(x, eval_x))
    assert seen == {True, False}
    cropped = build_transform(32, train=True, hflip=False)
    assert cropped.resize_key != flip.resize_key  # the reference's larger resize


def test_intensity_jitter_changes_exposure_not_geometry(tmp_path):
    """jitter=J (the demo preset's --intensity-jitter): each training image is the eval image
    under one affine intensity map a*x + b with a in [(1-J)^2, (1+J)^2] (brightness times
    contrast), so every finding keeps its place, size and side; evaluation is never jittered and
    the resize (and so the cache entry) is the eval one."""
    arr = (64 + np.add.outer(np.arange(30) * 2, np.arange(40)) % 96).astype(np.uint8)  # (H, W), mid-range: no clipping
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    j = 0.2
    eval_tf = build_transform(32, train=False, jitter=j)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x0 = (eval_tf(img) * std + mean).flatten()  # (3*S*S,) in [0, 1]
    assert torch.equal(eval_tf(img), build_transform(32, train=False)(img))
    tf = build_transform(32, train=True, hflip=False, crop=False, jitter=j)
    assert tf.resize_key == eval_tf.resize_key
    assert torch.equal(build_transform(32, train=True, hflip=False, crop=False, jitter=0.0)(img), eval_tf(img))
    slopes = []
    for seed in range(16):
        torch.manual_seed(seed)
        x = (tf(img) * std + mean).flatten()
        design = torch.stack([x0, torch.ones_like(x0)], 1).double()  # (P, 2)
        a, b = torch.linalg.lstsq(design, x.double()[:, None]).solution.flatten().tolist()
        residual = (x.double() - (a * x0.double() + b)).abs().max().item()
        assert residual < 3.5 / 255, (seed, residual)  # two uint8 roundings, nothing moved
        assert (1 - j) ** 2 - 0.02 <= a <= (1 + j) ** 2 + 0.02, (seed, a)
        slopes.append(a)
    assert max(slopes) - min(slopes) > 0.1  # it does vary from image to image


# ---- cache -------------------------------------------------------------------------------


def test_cache_round_trip_equals_uncached(tmp_path):
    src = gradient_image(tmp_path / "a.png", size=(90, 60))
    tf = build_transform(48, train=True)
    cache = ImageCache(tmp_path / "cache")
    first = cache.get(src, tf.resize, tf.resize_key)
    entry = cache.entry_path(src, tf.resize_key)
    assert entry.is_file()
    assert np.load(entry).ndim == 2  # gray images are stored as one channel
    second = cache.get(src, tf.resize, tf.resize_key)
    expected = tf.resize(load_image(src))
    assert first.mode == second.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(expected))
    assert np.array_equal(np.asarray(second), np.asarray(expected))
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]


def test_cache_keeps_colour(tmp_path):
    src = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(src)
    tf = build_transform(16, train=False)
    cache = ImageCache(tmp_path / "cache")
    cache.get(src, tf.resize, tf.resize_key)
    again = cache.get(src, tf.resize, tf.resize_key)
    assert np.array_equal(np.asarray(again), np.asarray(tf.resize(load_image(src))))


def test_cache_key_depends_on_resize_and_file_state(tmp_path):
    src = gradient_image(tmp_path / "a.png")
    cache = ImageCache(tmp_path / "cache")
    train_key, eval_key = build_transform(32, True).resize_key, build_transform(32, False).resize_key
    assert cache.entry_path(src, train_key) != cache.entry_path(src, eval_key)
    before = cache.entry_path(src, train_key)
    gradient_image(src, size=(41, 30))
    os.utime(src, ns=(1, 1))
    assert cache.entry_path(src, train_key) != before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_dtype"])
def test_corrupt_cache_entry_is_recreated(tmp_path, damage):
    src = gradient_image(tmp_path / "a.png")
    tf = build_transform(32, train=False)
    cache = ImageCache(tmp_path / "cache")
    good = np.asarray(cache.get(src, tf.resize, tf.resize_key))
    entry = cache.entry_path(src, tf.resize_key)
    if damage == "truncate":
        truncate(entry, keep=0.3)
    elif damage == "garbage":
        entry.write_bytes(b"\x00\x01garbage")
    else:
        np.save(entry, np.zeros((32, 32), np.float64))
    assert np.array_equal(np.asarray(cache.get(src, tf.resize, tf.resize_key)), good)
    assert np.load(entry).dtype == np.uint8  # rewritten


def test_cache_of_missing_or_corrupt_source(tmp_path):
    tf = build_transform(32, train=False)
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(DataError, match="not found"):
        cache.get(tmp_path / "gone.png", tf.resize, tf.resize_key)
    bad = truncate(gradient_image(tmp_path / "b.png", size=(200, 200)))
    with pytest.raises(DataError, match=r"b\.png: corrupt or truncated"):
        cache.get(bad, tf.resize, tf.resize_key)


def test_cache_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create image cache directory"):
        ImageCache(blocker / "cache")

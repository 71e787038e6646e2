"""cmn.data.dataset: construction-time checks, item shapes, collate padding, the image cache path."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cmn.data.annotation import Study
from cmn.data.cache import ImageCache
from cmn.data.dataset import ReportDataset, collate
from cmn.data.images import build_transform
from cmn.errors import DataError

SIZE = 32


def fake_encode(reports, max_len):
    """Stands in for Tokenizer.encode_batch: [0, ids..., 0] cut to max_len, 0-padded."""
    out = np.zeros((len(reports), max_len), dtype=np.int64)
    for i, report in enumerate(reports):
        ids = [0] + [len(w) for w in report.split()] + [0]  # word length as a non-zero id
        out[i, : min(len(ids), max_len)] = ids[:max_len]
    return out


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        (tmp_path / sid).mkdir()
        for view in (0, 1):
            arr = rng.integers(0, 255, (40, 36), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / sid / f"{view}.png")
    return tmp_path


def studies(reports=("one two three", "four", "five six seven eight nine ten"), views=2):
    return [Study(sid, r, tuple(f"{sid}/{v}.png" for v in range(views))) for sid, r in zip("abc", reports)]


def make(image_dir, items=None, num_views=2, train=False, **kw):
    return ReportDataset(items or studies(), image_dir, num_views, build_transform(SIZE, train=train), **kw)


def test_item_without_reports(image_dir):
    item = make(image_dir)[1]
    assert item["id"] == "b"
    assert item["images"].shape == (2, 3, SIZE, SIZE) and item["images"].dtype == torch.float32
    assert "targets" not in item and "mask" not in item


def test_item_targets_follow_the_reference(image_dir):
    ds = make(image_dir, encode=fake_encode, max_seq_length=6)
    item = ds[0]
    assert item["targets"].dtype == torch.int64 and item["mask"].dtype == torch.float32
    assert item["targets"].tolist() == [0, 3, 3, 5, 0]  # BOS, three words, EOS
    assert item["mask"].tolist() == [1.0] * 5
    assert ds[1]["targets"].tolist() == [0, 4, 0]
    assert ds[2]["targets"].tolist() == [0, 4, 3, 5, 5, 4]  # cut to max_seq_length: no EOS


def test_empty_report_is_bos_eos(image_dir):
    ds = make(image_dir, studies(("", "x", "y")), encode=fake_encode, max_seq_length=6)
    assert ds[0]["targets"].tolist() == [0, 0]


def test_single_view_dataset(image_dir):
    item = make(image_dir, studies(views=1), num_views=1)[2]
    assert item["images"].shape == (1, 3, SIZE, SIZE)


def test_train_transform_is_random_eval_is_not(image_dir):
    torch.manual_seed(0)
    train, evaluation = make(image_dir, train=True), make(image_dir)
    assert not all(torch.equal(train[0]["images"], train[0]["images"]) for _ in range(5))
    assert torch.equal(evaluation[0]["images"], evaluation[0]["images"])


def test_collate_pads_to_the_longest(image_dir):
    ds = make(image_dir, encode=fake_encode, max_seq_length=60)
    batch = collate([ds[1], ds[0], ds[2]])
    assert batch["ids"] == ["b", "a", "c"]
    assert batch["images"].shape == (3, 2, 3, SIZE, SIZE)
    assert batch["targets"].dtype == torch.int64 and batch["masks"].dtype == torch.float32
    assert batch["targets"].shape == batch["masks"].shape == (3, 8)
    assert batch["targets"][0].tolist() == [0, 4, 0, 0, 0, 0, 0, 0]
    assert batch["masks"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["masks"].sum(1).tolist() == [3, 5, 8]


def test_collate_without_reports(image_dir):
    batch = collate([make(image_dir)[0]])
    assert set(batch) == {"ids", "images"}


def test_data_loader_with_workers(image_dir):
    ds = make(image_dir, encode=fake_encode, max_seq_length=10)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=1))
    assert [b["ids"] for b in batches] == [["a", "b"], ["c"]]


def test_wrong_number_of_views_names_study_and_file(image_dir):
    items = studies()
    items[1] = Study("b", "r", ("b/0.png",))
    with pytest.raises(DataError) as info:
        make(image_dir, items, ann_path="ann.json")
    assert str(info.value).startswith("ann.json: study 'b' has 1 image(s), expected 2")


def test_mimic_study_with_two_images_is_an_error(image_dir):
    with pytest.raises(DataError, match="study 'a' has 2 image"):
        make(image_dir, num_views=1)


def test_missing_files_are_listed_up_front(image_dir):
    (image_dir / "a" / "1.png").unlink()
    (image_dir / "c" / "0.png").unlink()
    with pytest.raises(DataError) as info:
        make(image_dir, ann_path="ann.json")
    message = str(info.value)
    assert message.startswith("ann.json: 2 image file(s) not found")
    assert "a/1.png" in message and "c/0.png" in message


def test_missing_image_directory(image_dir):
    with pytest.raises(DataError, match=r"^ann\.json: image directory .*nowhere not found$"):
        make(image_dir / "nowhere", ann_path="ann.json")


def test_long_missing_list_is_shortened(image_dir):
    items = [Study(f"m{i}", "r", (f"m{i}/0.png", f"m{i}/1.png")) for i in range(10)]
    with pytest.raises(DataError, match=r"20 image file\(s\) not found .*m2/0\.png, \.\.\.$"):
        make(image_dir, items)


def test_corrupt_image_at_load_time_names_the_file(image_dir):
    path = image_dir / "b" / "1.png"
    path.write_bytes(path.read_bytes()[:60])
    ds = make(image_dir)  # construction only checks existence
    ds[0]
    with pytest.raises(DataError, match=r"b/1\.png: corrupt or truncated"):
        ds[1]


def test_encoder_with_wrong_shape_is_rejected(image_dir):
    with pytest.raises(ValueError, match="encode returned shape"):
        make(image_dir, encode=lambda reports, n: np.zeros((1, n), np.int64), max_seq_length=5)


def test_encode_needs_max_seq_length(image_dir):
    with pytest.raises(ValueError, match="max_seq_length"):
        make(image_dir, encode=fake_encode)


@pytest.mark.parametrize("train", [True, False])
def test_cached_items_equal_uncached(image_dir, tmp_path_factory, train):
    cache = ImageCache(tmp_path_factory.mktemp("cache"))
    plain, cached = make(image_dir, train=train), make(image_dir, train=train, image_cache=cache)
    for _ in range(2):  # first fills the cache, second reads it
        torch.manual_seed(1)
        a = plain[2]["images"]
        torch.manual_seed(1)
        b = cached[2]["images"]
        assert torch.equal(a, b)
    assert len(list(cache.directory.rglob("*.npy"))) == 2


def test_cache_needs_image_transform(image_dir, tmp_path_factory):
    cache = ImageCache(tmp_path_factory.mktemp("cache"))
    with pytest.raises(TypeError, match="ImageTransform"):
        ReportDataset(studies(), image_dir, 2, lambda img: img, image_cache=cache)

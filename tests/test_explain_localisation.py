"""Where the demo generator drew each finding, and the localisation measure built on it."""

import json

import numpy as np
import pytest

from cmn.data.demo import store as demo_mod
from cmn.explain.core import Explanation, entities_of
from cmn.explain.localisation import Tally, finding_word, hit, main, patch_coverage, score_study
from cmn.metrics.clinical import label_reports
from helpers.explain_fixtures import IMAGE_SIZE, demo_data, tiny_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    demo = demo_data(root / "demo")
    return demo, tiny_bundle(root / "ckpt", demo)


def test_regions_do_not_change_the_drawn_study():
    params = demo_mod.DemoParams(4, 1, 4, IMAGE_SIZE, 0)
    for index in range(6):
        plain = demo_mod._study(params, "train", index)
        regions = ({}, {})
        with_regions = demo_mod._study(params, "train", index, regions)
        assert plain[1] == with_regions[1]
        np.testing.assert_array_equal(plain[2], with_regions[2])
        np.testing.assert_array_equal(plain[3], with_regions[3])
        drawn = {k for k, v in plain[0].labels().items() if v}
        assert set(regions[0]) == set(regions[1]) == drawn


def test_regions_lie_where_the_findings_are_drawn():
    params = demo_mod.DemoParams(40, 1, 1, 128, 0)
    seen = set()
    for index in range(40):
        regions = ({}, {})
        findings = demo_mod._study(params, "train", index, regions)[0]
        assert demo_mod.finding_regions(params, "train", index).keys() == regions[0].keys()
        for name in regions[0]:
            frontal, lateral = regions[0][name], regions[1][name]
            seen.add(name)
            assert frontal.dtype == bool and frontal.shape == (128, 128) and frontal.any() and lateral.any()
            rows, cols = np.nonzero(frontal)
            if name == "effusion":
                assert rows.mean() > 64  # fluid collects at the lung bases
            if name == "pneumothorax":
                assert rows.mean() < 64  # apical
                # the patient's right is on the image left
                assert (cols.mean() < 64) == (findings.pneumothorax_side == "right")
            if name == "nodule":
                assert frontal.mean() < 0.02  # a 1-2 cm spot
    assert seen == set(demo_mod.FINDINGS)


def test_patch_coverage_and_hit():
    mask = np.zeros((6, 6), bool)
    mask[0, 5] = True  # top right pixel
    np.testing.assert_array_equal(patch_coverage(mask, (2, 2)), [[False, True], [False, False]])
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True  # the centre pixel lies in every patch of a 2 x 2 grid when rows do not split evenly
    assert patch_coverage(mask, (2, 2)).all()
    region = np.zeros((2, 2, 2), bool)
    region[1, 0, 1] = True
    heat = np.zeros((2, 2, 2))
    heat[1, 0, 1] = 0.9
    assert hit(heat, region)
    heat[0, 0, 0] = 1.0
    assert not hit(heat, region)


def _explanation(words, peak):
    """Attention peaked at one patch (view, row, col) of a 2-view 2 x 2 grid."""
    T = len(words)
    att = np.full((1, T, 2, 2, 2), 0.1, np.float32)
    att[(0, slice(None)) + peak] = 0.3
    att /= att.sum(axis=(2, 3, 4), keepdims=True)
    labels = label_reports([" ".join(words)])[0]
    return Explanation(
        "s", tuple(words), " ".join(words), (), att, None, None, None, None, False, labels, entities_of(words)
    )


def test_score_study_counts_only_stated_findings():
    words = ["no", "pleural", "effusion", ".", "there", "is", "a", "right", "apical", "pneumothorax", "."]
    e = _explanation(words, (0, 0, 0))
    assert finding_word(e, "effusion") is None  # negated: not scored
    assert finding_word(e, "pneumothorax") == words.index("pneumothorax")
    top_left = np.zeros((8, 8), bool)
    top_left[:2, :2] = True
    bottom = np.zeros((8, 8), bool)
    bottom[6:, :] = True
    tally = Tally()
    score_study(e, {"pneumothorax": (top_left, top_left), "effusion": (bottom, bottom)}, tally)
    assert tally.summary() == {
        "cases": 1,
        "attention_rate": 1.0,
        "attention_layer_1_rate": 1.0,
        "chance_rate": pytest.approx(0.25),
    }
    score_study(_explanation(words, (1, 1, 1)), {"pneumothorax": (top_left, top_left)}, tally)
    assert tally.summary()["attention_rate"] == 0.5 and tally.by_finding["pneumothorax"].cases == 2


def test_command_on_demo_data(setup, capsys):
    demo, ckpt = setup
    assert main(["--checkpoint", str(ckpt), "--demo-root", str(demo), "--report", "reference"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cases"] > 0 and 0 <= result["attention_rate"] <= 1 and 0 < result["chance_rate"] <= 1
    assert sum(v["cases"] for v in result["by_finding"].values()) == result["cases"]


def test_command_needs_a_demo_folder(setup, tmp_path, capsys):
    _, ckpt = setup
    assert main(["--checkpoint", str(ckpt), "--demo-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")

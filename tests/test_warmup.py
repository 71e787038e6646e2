"""Visual warm-up (cmn.warmup): report labels, the probe, that it learns, and its place in a run."""

import json

import pytest
import torch

from cmn.metrics.clinical import CHEXPERT_OBSERVATIONS
from cmn.model.visual import VisualExtractor
from cmn.warmup import N_TARGETS, LabelProbe, report_targets, targets_for, warm_up_visual
from helpers.tiny import tiny_run

OBS = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}


# demo data generated once per session, under pytest's base temp (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("demo_dir")


def test_report_targets_positive_negative_and_uncertain():
    targets, weights = report_targets(
        [
            "There is a small left pleural effusion. No pneumothorax.",
            "The heart is mildly enlarged. Possible pneumonia.",
        ]
    )
    assert targets.shape == weights.shape == (2, N_TARGETS) == (2, 3 * len(CHEXPERT_OBSERVATIONS))
    assert targets.dtype == torch.float32
    eff, ptx, card, pna = OBS["Pleural Effusion"], OBS["Pneumothorax"], OBS["Cardiomegaly"], OBS["Pneumonia"]
    assert targets[0, eff] == 1 and weights[0, eff] == 1
    assert targets[0, ptx] == 0 and weights[0, ptx] == 1  # stated absent: taught as absent
    assert targets[1, card] == 1
    assert targets[1, pna] == 0 and weights[1, pna] == 0  # uncertain: neither
    assert targets[1, eff] == 0 and weights[1, eff] == 1  # not mentioned: absent


N = len(CHEXPERT_OBSERVATIONS)
LEFT, RIGHT = N, 2 * N  # offsets of the side columns


def test_report_targets_read_the_side_of_each_positive_mention():
    reports = [
        "There is a small left pleural effusion. No pneumothorax.",
        "Bilateral pleural effusions. Right apical pneumothorax. Possible left pneumonia.",
        "A 1 cm nodule is seen in the right upper lobe; the heart is mildly enlarged.",
        "There is mild cardiomegaly.",
    ]
    targets, weights = report_targets(reports)
    eff, ptx, les, card, pna = (
        OBS[k] for k in ("Pleural Effusion", "Pneumothorax", "Lung Lesion", "Cardiomegaly", "Pneumonia")
    )

    def side(i, obs):
        return [(int(targets[i, o + obs]), int(weights[i, o + obs])) for o in (LEFT, RIGHT)]

    assert side(0, eff) == [(1, 1), (0, 1)]
    assert side(0, ptx) == [(0, 1), (0, 1)]  # absent: on neither side
    assert side(1, eff) == [(1, 1), (1, 1)]  # bilateral: both
    assert side(1, ptx) == [(0, 1), (1, 1)]
    assert side(1, pna) == [(0, 0), (0, 0)]  # uncertain: side not taught
    assert side(2, les) == [(0, 1), (1, 1)]  # the side of the sentence, not of the report
    assert side(2, card) == [(0, 0), (0, 0)]  # present, no side stated: not taught
    assert side(3, card) == [(0, 0), (0, 0)]


class _Patches(torch.nn.Module):
    """Stands in for the CNN: images (B, V, 3, S, S) -> their pixels as patches (B, V*S*S, 3)."""

    def forward(self, images):
        B, V, C = images.shape[:3]
        return images.flatten(3).transpose(2, 3).reshape(B, -1, C)


def test_probe_pools_each_view_by_mean_and_max():
    probe = LabelProbe(_Patches(), num_views=2, channels=3, n_labels=4)
    images = torch.randn(5, 2, 3, 4, 4)
    per_view = images.flatten(3).transpose(2, 3)  # (B, V, P, C)
    pooled = torch.cat([per_view.mean(2), per_view.amax(2)], -1).flatten(1)  # (B, V*2C)
    # same values, other summation order of the mean: float32 rounding only (assert_close's fp32 defaults)
    torch.testing.assert_close(probe(images), probe.head(pooled))


def test_warm_up_teaches_the_cnn_a_small_bright_spot():
    """A 1/8-size spot in one view is what a report states: after the warm-up, the CNN's
    patches (the probe) tell the studies with the spot from those without."""
    torch.manual_seed(0)
    n, S = 32, 64
    images = torch.randn(n, 2, 3, S, S) * 0.3
    has = torch.arange(n) % 2 == 0
    for i in torch.nonzero(has).flatten().tolist():
        y, x = torch.randint(0, S - 8, (2,)).tolist()
        images[i, 1, :, y : y + 8, x : x + 8] += 2.0
    ids = [f"s{i}" for i in range(n)]
    label = torch.zeros(len(CHEXPERT_OBSERVATIONS))
    targets = {k: (label.clone(), torch.ones_like(label)) for k in ids}
    for i in torch.nonzero(has).flatten().tolist():
        targets[ids[i]][0][OBS["Lung Lesion"]] = 1
    loader = [{"ids": ids[i : i + 8], "images": images[i : i + 8]} for i in range(0, n, 8)]

    class _Sampler:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

    probe = LabelProbe(VisualExtractor("resnet18"), 2, 512, len(CHEXPERT_OBSERVATIONS))
    sampler = _Sampler()
    records = warm_up_visual(
        probe, loader, sampler, targets, epochs=8, lr=1e-3, device=torch.device("cpu"), log=lambda m: None
    )
    assert [r["warmup_epoch"] for r in records] == list(range(1, 9))
    assert records[-1]["warmup_loss"] < 0.5 * records[0]["warmup_loss"]
    assert len(set(sampler.epochs)) == 8 and min(sampler.epochs) > 1000  # apart from report epochs 1, 2, ...
    probe.eval()
    with torch.no_grad():
        lesion = probe(images)[:, OBS["Lung Lesion"]]
    assert ((lesion > 0) == has).float().mean() >= 0.9


def test_targets_for_keys_studies_by_id():
    class S:
        def __init__(self, i, r):
            self.id, self.report = i, r

    t = targets_for([S("a", "No pneumothorax."), S("b", "Right pneumothorax.")])
    assert t["a"][0][OBS["Pneumothorax"]] == 0 and t["b"][0][OBS["Pneumothorax"]] == 1


@pytest.mark.slow
def test_training_run_warms_up_once_and_resumes_exactly(tmp_path):
    """The warm-up runs before epoch 1, is logged and stored in metrics.json, changes the CNN
    report training starts from, and a resumed run neither redoes it nor differs from an
    uninterrupted one."""
    from safetensors.torch import load_file

    from cmn.train import run_training
    from cmn.viz.plot import read_log

    result = run_training(*tiny_run(tmp_path, "straight", epochs=2, visual_warmup_epochs=2), progress=False, quiet=True)
    assert [r["warmup_epoch"] for r in result["visual_warmup"]] == [1, 2]
    lines = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r.get("warmup_epoch") for r in lines] == [1, 2, None, None]
    assert [r["epoch"] for r in read_log(tmp_path / "straight" / "log.jsonl")] == [1, 2]

    run_training(*tiny_run(tmp_path, "resumed", epochs=1, visual_warmup_epochs=2), progress=False, quiet=True)
    resumed = run_training(
        *tiny_run(tmp_path, "resumed", epochs=2, visual_warmup_epochs=2, resume=True), progress=False, quiet=True
    )
    # not run again (the log would hold it twice); metrics.json still records it, from the log
    assert [r["warmup_epoch"] for r in resumed["visual_warmup"]] == [1, 2]
    lines_b = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r.get("warmup_epoch") for r in lines_b] == [1, 2, None, None]
    assert [r.get("train_loss") for r in lines_b] == [r.get("train_loss") for r in lines]
    wa = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    plain = run_training(*tiny_run(tmp_path, "plain", epochs=1), progress=False, quiet=True)
    assert "visual_warmup" not in plain
    first = json.loads((tmp_path / "plain" / "log.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] != lines[2]["train_loss"]  # epoch 1 starts from another CNN


def test_flags_and_presets():
    """The demo preset warms up, trains without crops and jitters intensities; the reference
    presets do none of it (the reference has no warm-up, trains on random crops and leaves
    intensities alone); flags override."""
    from cmn.cli import configs_from_args, train_parser

    data, _, train = configs_from_args(train_parser().parse_args([]))
    assert train.visual_warmup_epochs > 0 and not data.random_crop and not data.hflip
    assert data.intensity_jitter > 0 and train.monitor == "CE_F1"
    for name in ("iu_xray", "mimic_cxr"):
        data, _, train = configs_from_args(
            train_parser().parse_args(["--dataset", name, "--ann-path", "a.json", "--image-dir", "."])
        )
        assert train.visual_warmup_epochs == 0 and data.random_crop and data.hflip and data.intensity_jitter == 0
        assert train.monitor == "BLEU_4"
    _, _, train = configs_from_args(
        train_parser().parse_args(["--visual-warmup-epochs", "0", "--visual-warmup-lr", "3e-4"])
    )
    assert train.visual_warmup_epochs == 0 and train.visual_warmup_lr == 3e-4
    data, _, _ = configs_from_args(train_parser().parse_args(["--intensity-jitter", "0"]))
    assert data.intensity_jitter == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--visual-warmup-epochs", "-1"], "--visual-warmup-epochs"),
        (["--visual-warmup-lr", "0"], "--visual-warmup-lr"),
        (["--visual-warmup-lr", "nan"], "--visual-warmup-lr"),
        (["--intensity-jitter", "1"], "--intensity-jitter"),
        (["--intensity-jitter", "-0.1"], "--intensity-jitter"),
        (["--monitor", "CIDEr_D"], "--monitor"),
        (["--dataset", "iu_xray", "--ann-path", "a.json", "--image-dir", ".", "--monitor", "CE_F1"], "--monitor"),
    ],
)
def test_bad_warmup_flags_are_one_error_line(args, needle, capsys):
    from cmn.cli import train_main

    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {needle}") and err.count("\n") == 1 and "Traceback" not in err

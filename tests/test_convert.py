"""cmn-convert r2gencmn: identity with the real reference code on its own fixtures, and bad input.

The fixtures under tests/fixtures/r2gencmn/ were produced by running zhjohnchan/R2GenCMN
(tests/fixtures/make_reference_fixtures.py); the CNN weights and images are regenerated here
bit for bit (tests/helpers/r2gencmn_fixture.py).
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmn.checkpoint import load_checkpoint, load_state_tree
from cmn.convert.cli import main as convert_main
from cmn.convert.r2gencmn import infer_backbone, read_reference_checkpoint
from cmn.data.images import build_transform, load_image
from cmn.errors import CheckpointError
from helpers.r2gencmn_fixture import FIXTURE_DIR, SETTINGS, full_reference_checkpoint, write_images

DATASETS = list(SETTINGS)


def reference(dataset):
    root = FIXTURE_DIR / dataset
    return json.loads((root / "reference_outputs.json").read_text()), load_file(
        str(root / "reference_outputs.safetensors")
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per dataset: (bundle folder, image folder, annotation dict, full reference .pth)."""
    out = {}
    for dataset in DATASETS:
        root = tmp_path_factory.mktemp(dataset)
        pth = full_reference_checkpoint(dataset, root / f"model_{dataset}.pth")
        ann_path = FIXTURE_DIR / dataset / "annotation.json"
        ann = json.loads(ann_path.read_text())
        write_images(ann, root / "images", key=SETTINGS[dataset]["seed"])
        bundle = root / "bundle"
        assert (
            convert_main(
                [
                    "r2gencmn",
                    "--checkpoint",
                    str(pth),
                    "--ann-path",
                    str(ann_path),
                    "--dataset",
                    dataset,
                    "--output",
                    str(bundle),
                    "--topk",
                    "8",
                    "--num-heads",
                    "4",
                    "--keep-optimizer",
                ]
            )
            == 0
        )
        out[dataset] = (bundle, root / "images", ann, pth)
    return out


def test_input_files_are_the_reference_format():
    """The fixture checkpoint is what the reference trainer saves (numpy monitor_best included)."""
    ref = read_reference_checkpoint(FIXTURE_DIR / "iu_xray" / "checkpoint_partial.pth")
    assert ref.epoch is not None and isinstance(ref.monitor_best, float)
    assert set(ref.optimizer) == {"state", "param_groups"}


def _test_inputs(dataset, converted):
    """The test split through cmn's eval transform, and the reference's targets."""
    bundle, images, ann, _ = converted[dataset]
    loaded = load_checkpoint(bundle)
    tf = build_transform(loaded.image_size, train=False)
    batch = torch.stack([torch.stack([tf(load_image(images / p)) for p in e["image_path"]]) for e in ann["test"]])
    return loaded, batch  # (B, V, 3, 224, 224)


@pytest.mark.parametrize("dataset", DATASETS)
def test_vocabulary_and_targets_match_the_reference(dataset, converted):
    record, tensors = reference(dataset)
    loaded, _ = _test_inputs(dataset, converted)
    ann = converted[dataset][2]
    assert len(loaded.tokenizer) == record["vocab_size"]
    L = SETTINGS[dataset]["max_seq_length"]
    ours = torch.from_numpy(loaded.tokenizer.encode_batch([e["report"] for e in ann["test"]], L))
    theirs = tensors["targets"]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs) and not ours[:, theirs.shape[1] :].any()


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_teacher_forced_logprobs_equal_the_reference(dataset, dtype, bound, converted):
    record, tensors = reference(dataset)
    loaded, images = _test_inputs(dataset, converted)
    model = loaded.model
    targets = tensors["targets"]  # (B, T)
    want = tensors["logprobs_fp32" if dtype == torch.float32 else "logprobs_fp64"]  # (B, T-1, V)
    model = model.to(dtype)
    with torch.no_grad():
        got = model(images.to(dtype), targets)  # (B, T-1, V) in dtype
    assert got.dtype == dtype
    lengths = (targets > 0).sum(1) + 1  # tokens to predict: words and EOS
    diff = max(float((got[i, :n] - want[i, :n]).abs().max()) for i, n in enumerate(lengths.tolist()))
    print(f"{dataset} {dtype}: max |log p - reference| = {diff:.3g}")
    assert diff <= bound


@pytest.mark.parametrize("dataset", DATASETS)
def test_reference_beam_search_is_token_for_token(dataset, converted):
    record, _ = reference(dataset)
    loaded, images = _test_inputs(dataset, converted)
    got = loaded.model.generate(images, beam_size=3, decode="reference")
    assert got == record["beam3_ids"]
    assert [loaded.tokenizer.decode(s) for s in got] == record["beam3_reports"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_cmn_generate_cli_gives_the_reference_reports(dataset, converted, capsys):
    from cmn.cli import generate_main

    bundle, images, ann, _ = converted[dataset]
    record, _ = reference(dataset)
    paths = [str(images / p) for e in ann["test"] for p in e["image_path"]]
    assert generate_main(["--checkpoint", str(bundle), "--decode", "reference", "--device", "cpu", *paths]) == 0
    assert capsys.readouterr().out.splitlines() == record["beam3_reports"]


def test_optimizer_state_follows_the_parameters(converted):
    """--keep-optimizer: each Adam moment lands on the cmn parameter that the reference's belonged to."""
    from cmn.convert.r2gencmn import name_map

    bundle, _, _, pth = converted["iu_xray"]
    ref = read_reference_checkpoint(pth)
    saved = load_state_tree(bundle, "optimizer")
    model = load_checkpoint(bundle).model
    cmn_names = [n for n, _ in model.visual.named_parameters(prefix="visual")]
    cmn_names += [n for n, _ in model.named_parameters() if not n.startswith("visual.")]
    names = name_map(ref.state, model.cfg.num_layers)
    assert saved["param_groups"][0]["lr"] == ref.optimizer["param_groups"][0]["lr"]
    # the reference's optimizer order: visual extractor parameters, then the others, each in
    # registration order (its state-dict order without buffers and the shared memory's twin)
    ref_params = [
        k
        for k in ref.order
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked", ".pe"))
        and not k.startswith("encoder_decoder.model.cmn.")
    ]
    ref_params = [k for k in ref_params if k.startswith("visual_extractor.")] + [
        k for k in ref_params if not k.startswith("visual_extractor.")
    ]
    own = dict(model.named_parameters())
    for i, state in ref.optimizer["state"].items():
        name = names[ref_params[int(i)]]
        ours = saved["state"][cmn_names.index(name)]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(ours[key], state[key]) and ours[key].shape == own[name].shape
    assert len(ref.optimizer["state"]) > 10


@pytest.mark.slow
def test_init_from_a_converted_bundle_trains(converted, tmp_path):
    from cmn.cli import train_main

    bundle, images, _, _ = converted["iu_xray"]
    out = tmp_path / "ft"
    code = train_main(
        [
            "--dataset",
            "iu_xray",
            "--ann-path",
            str(FIXTURE_DIR / "iu_xray" / "annotation.json"),
            "--image-dir",
            str(images),
            "--init-from",
            str(bundle),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--image-size",
            "64",
            "--topk",
            "8",
            "--beam-size",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
            "--quiet",
            "--eval-max-batches",
            "1",
        ]
    )
    assert code == 0
    tuned = load_checkpoint(out / "last")
    assert tuned.config.d_model == 32 and len(tuned.tokenizer) == len(load_checkpoint(bundle).tokenizer)


def test_init_from_refuses_another_architecture(converted, capsys, tmp_path):
    from cmn.cli import train_main

    bundle = converted["iu_xray"][0]
    code = train_main(
        [
            "--dataset",
            "iu_xray",
            "--ann-path",
            "x",
            "--image-dir",
            "y",
            "--init-from",
            str(bundle),
            "--d-model",
            "64",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "d_model: 32 in the checkpoint vs 64 asked" in capsys.readouterr().err


# ---- bad input ------------------------------------------------------------------------------
def _convert(tmp_path, pth, *extra, dataset="iu_xray", ann=None):
    ann = ann or FIXTURE_DIR / dataset / "annotation.json"
    return convert_main(
        [
            "r2gencmn",
            "--checkpoint",
            str(pth),
            "--ann-path",
            str(ann),
            "--dataset",
            dataset,
            "--output",
            str(tmp_path / "out"),
            "--topk",
            "8",
            "--num-heads",
            "4",
            *extra,
        ]
    )


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_bare_state_dict_is_accepted(converted, tmp_path):
    ref = read_reference_checkpoint(converted["iu_xray"][3])
    torch.save(ref.state, tmp_path / "bare.pth")
    assert _convert(tmp_path, tmp_path / "bare.pth") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_output_needs_force(converted, tmp_path, capsys):
    pth = converted["iu_xray"][3]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _convert(tmp_path, pth) == 2
    assert "already exists" in _one_error_line(capsys) and (tmp_path / "out" / "keep.txt").exists()
    assert _convert(tmp_path, pth, "--force") == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_vocabulary_mismatch_names_the_threshold_that_fits(converted, tmp_path, capsys):
    assert _convert(tmp_path, converted["iu_xray"][3], "--threshold", "40") == 2
    err = _one_error_line(capsys)
    fits = err.split("--threshold ")[1].split(" would fit")[0].split(", ")
    assert "threshold 40 gives" in err and "3" in fits
    assert not (tmp_path / "out").exists()


def test_wrong_annotation_is_named(converted, tmp_path, capsys):
    assert _convert(tmp_path, converted["iu_xray"][3], ann=FIXTURE_DIR / "mimic_cxr" / "annotation.json") == 2
    assert "trained with" in _one_error_line(capsys)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "case", ["payload", "nested", "truncated", "list", "keys", "r2gen", "other_model", "nan", "missing_tensor", "heads"]
)
def test_bad_checkpoints_are_one_error_line(case, converted, tmp_path, capsys):
    pth, bad = converted["iu_xray"][3], tmp_path / "bad.pth"
    marker = tmp_path / "pwned"
    extra = []
    if case == "payload":
        torch.save(Payload(marker), bad)
    elif case == "nested":  # hidden inside an otherwise real checkpoint
        ref = read_reference_checkpoint(pth)
        torch.save({"epoch": 1, "state_dict": ref.state, "optimizer": {"x": Payload(marker)}, "monitor_best": 0.1}, bad)
    elif case == "truncated":
        bad.write_bytes(pth.read_bytes()[:5000])
    elif case == "list":
        torch.save([1, 2, 3], bad)
    elif case == "keys":
        torch.save({"model": {}, "args": 3}, bad)
    else:
        state = dict(read_reference_checkpoint(pth).state)
        if case == "r2gen":
            state["encoder_decoder.model.rm.mlp.0.weight"] = torch.zeros(2, 2)
        elif case == "other_model":
            state = {"backbone.conv.weight": torch.zeros(3, 3), "head.weight": torch.zeros(2, 2)}
        elif case == "nan":
            state["encoder_decoder.logit.bias"] = state["encoder_decoder.logit.bias"].clone().fill_(float("nan"))
        elif case == "missing_tensor":
            del state["encoder_decoder.model.decoder.layers.1.src_attn.linears.2.bias"]
        elif case == "heads":
            extra = ["--num-heads", "5"]
        torch.save({"epoch": 1, "state_dict": state, "optimizer": {}, "monitor_best": np.float64(0.1)}, bad)
    assert _convert(tmp_path, bad, *extra) == 2
    err = _one_error_line(capsys)
    expected = {
        "payload": "posix.system",
        "nested": "posix.system",
        "truncated": "truncated",
        "list": "holds a list",
        "keys": "found args, model",
        "r2gen": "R2Gen checkpoint",
        "other_model": "not an R2GenCMN checkpoint",
        "nan": "NaN",
        "missing_tensor": "missing 1 tensor",
        "heads": "does not divide",
    }[case]
    assert expected in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_backbone_inferred_from_key_structure():
    import torchvision

    for name in ("resnet50", "resnet101"):
        with torch.device("meta"):
            trunk = torch.nn.Sequential(*list(getattr(torchvision.models, name)(weights=None).children())[:-2])
        state = {"visual_extractor.model." + k: v for k, v in trunk.state_dict().items()}
        assert infer_backbone(state, "x") == name
    with pytest.raises(CheckpointError, match="not a torchvision ResNet"):
        infer_backbone({"visual_extractor.model.0.weight": torch.zeros(1), "visual_extractor.model.4.0.x": 0}, "x")


@pytest.mark.parametrize("dataset", DATASETS)
def test_published_model_pipeline(dataset, converted, capsys, tmp_path):
    """convert -> cmn-generate --annotation (reports and published-protocol references equal the
    reference code's) -> cmn-eval scores the file."""
    from cmn.cli import generate_main
    from cmn.metrics.cli import eval_main

    bundle, images, ann, _ = converted[dataset]
    record, _ = reference(dataset)
    assert (
        generate_main(
            [
                "--checkpoint",
                str(bundle),
                "--annotation",
                str(FIXTURE_DIR / dataset / "annotation.json"),
                "--image-dir",
                str(images),
                "--split",
                "test",
                "--decode",
                "reference",
                "--format",
                "jsonl",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [e["id"] for e in ann["test"]]  # the reference's test order
    assert [r["prediction"] for r in rows] == record["beam3_reports"]
    assert [r["reference"] for r in rows] == record["ground_truths"]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    assert eval_main(["--predictions", str(preds), "--references", "both", "--no-meteor", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert {"BLEU_4", "BLEU_4_full", "CE_F1", "CE_F1_full"} <= set(scores)

"""Training: overfitting two studies, a full tiny run, and exact resumption."""

import json

import pytest
import torch

from cmn.engine import masked_nll
from cmn.model import build_model
from cmn.text import Tokenizer
from helpers.tiny import tiny_cfg, tiny_run

# demo data generated once per session, under pytest's base temp (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("demo_dir")


def test_tiny_model_overfits_two_studies():
    reports = ["the heart is enlarged . there is a left pleural effusion .", "the lungs are clear . no pneumothorax ."]
    tok = Tokenizer.build(reports, 1, "iu_xray")
    torch.manual_seed(0)
    model = build_model(tiny_cfg(vocab_size=len(tok), dropout=0.0, drop_prob_lm=0.0, max_seq_length=20))
    images = torch.randn(2, 2, 3, 64, 64)
    targets = torch.from_numpy(tok.encode_batch(reports, 20))  # (2, 20)
    masks = (targets > 0).float()
    masks[:, 0] = 1
    lengths = [len(tok.encode(r)) for r in reports]
    for i, n in enumerate(lengths):
        masks[i, :n] = 1  # EOS counts as a target
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    expected = [tok.decode(tok.encode(r)[1:]) for r in reports]
    assert all(expected)
    for step in range(1, 301):
        loss = masked_nll(model(images, targets), targets, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            greedy = [tok.decode(s) for s in model.generate(images, beam_size=1, block_ngram=0)]
            beam = [tok.decode(s) for s in model.generate(images, beam_size=3, block_ngram=0)]
            if greedy == expected and beam == expected:
                break
    assert greedy == expected
    assert beam == expected


@pytest.mark.slow
def test_tiny_training_run_writes_metrics_and_checkpoints(tmp_path):
    from cmn.checkpoint import load_checkpoint
    from cmn.train import run_training

    result = run_training(*tiny_run(tmp_path, "run"), progress=False, quiet=True)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for section in ("val", "test", "baseline_test"):
        assert set(metrics[section]) >= {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"}
    assert metrics["test"] == result["test"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["lr_ed"] == pytest.approx(1e-3 * 0.25)  # StepLR every epoch, gamma 0.5
    assert load_checkpoint(out / "checkpoint").meta["epoch"] == metrics["best_epoch"]
    preds = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(p["reference"] for p in preds)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path, workers):
    """Killed after epoch 1 and resumed (random crops and flips on, loader workers or not):
    weights, optimizer, scheduler and losses equal an uninterrupted run bit for bit."""
    from safetensors.torch import load_file

    from cmn.checkpoint import load_trainer_state
    from cmn.train import run_training

    run_training(*tiny_run(tmp_path, "straight", workers, epochs=3), progress=False, quiet=True)
    run_training(*tiny_run(tmp_path, "resumed", workers, epochs=1), progress=False, quiet=True)
    run_training(*tiny_run(tmp_path, "resumed", workers, epochs=3, resume=True), progress=False, quiet=True)
    a, b = tmp_path / "straight" / "last", tmp_path / "resumed" / "last"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = load_trainer_state(a), load_trainer_state(b)
    assert sa["epoch"] == sb["epoch"] == 3
    assert sa["scheduler"] == sb["scheduler"]
    for (ka, va), (_kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        for name in va:
            assert torch.equal(va[name], vb[name]), (ka, name)
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    la = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()

    def losses(lines):
        return [json.loads(x)["train_loss"] for x in lines]

    assert losses(la) == losses(lb)


@pytest.mark.slow
def test_resume_with_other_model_is_refused(tmp_path):
    from cmn.errors import ConfigError
    from cmn.train import run_training

    run_training(*tiny_run(tmp_path, "r", epochs=1), progress=False, quiet=True)
    data, model_kw, train = tiny_run(tmp_path, "r", epochs=2, resume=True)
    model_kw["variant"] = "base"
    with pytest.raises(ConfigError, match="variant: 'cmn' in the checkpoint vs 'base' now"):
        run_training(data, model_kw, train, progress=False, quiet=True)


@pytest.mark.slow
def test_monitor_picks_the_best_epoch_by_its_score_and_resume_keeps_it(tmp_path):
    """--monitor CE_F1 (the demo preset's): the checkpoint kept is the first epoch with the
    highest validation CE F1, metrics.json names the score; resuming under another score is
    refused (the saved best would be compared with a different metric)."""
    from cmn.checkpoint import load_checkpoint
    from cmn.errors import ConfigError
    from cmn.train import run_training

    result = run_training(*tiny_run(tmp_path, "m", epochs=3, monitor="CE_F1"), progress=False, quiet=True)
    out = tmp_path / "m"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scores = [r["val_CE_F1"] for r in log]
    best = scores.index(max(scores)) + 1
    assert result["monitor"] == "CE_F1" and result["best_epoch"] == best
    assert result["val"]["CE_F1"] == max(scores)
    assert load_checkpoint(out / "checkpoint").meta["epoch"] == best
    data, model_kw, train = tiny_run(tmp_path, "m", epochs=4, resume=True)  # BLEU_4, the default
    with pytest.raises(ConfigError, match="by validation CE_F1, this run by BLEU_4"):
        run_training(data, model_kw, train, progress=False, quiet=True)


@pytest.mark.slow
def test_bf16_trains(tmp_path):
    from cmn.train import run_training

    result = run_training(*tiny_run(tmp_path, "bf16", epochs=1, precision="bf16"), progress=False, quiet=True)
    assert result["epochs_run"] == 1


@pytest.mark.slow
def test_lr_ve_zero_freezes_the_cnn_without_its_backward(tmp_path):
    """--lr-ve 0: the CNN's weights never move (no gradients are computed for them), the rest trains."""
    from safetensors.torch import load_file

    from cmn.train import run_training

    for epochs in (1, 2):
        run_training(*tiny_run(tmp_path, f"e{epochs}", epochs=epochs, lr_ve=0.0), progress=False, quiet=True)
    a = load_file(str(tmp_path / "e1" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "e2" / "last" / "model.safetensors"))
    weights = [k for k in a if k.startswith("visual.") and not k.endswith(("running_mean", "running_var", "tracked"))]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    assert any(not torch.equal(a[k], b[k]) for k in a if not k.startswith("visual."))

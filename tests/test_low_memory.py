"""--low-memory: the flag, its one conflict, and a tiny run that really trains in bf16 with checkpointing."""

import pytest

from cmn.cli import configs_from_args, train_main, train_parser
from helpers.tiny import tiny_run

# demo data generated once per session, under pytest's base temp (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("demo_dir")


def test_flag_sets_the_config():
    _, _, train = configs_from_args(train_parser().parse_args(["--low-memory"]))
    assert train.low_memory
    _, _, train = configs_from_args(train_parser().parse_args([]))
    assert not train.low_memory


def test_low_memory_with_fp32_is_an_error(capsys):
    assert train_main(["--low-memory", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --low-memory") and "--precision fp32" in err and "Traceback" not in err


@pytest.mark.slow
def test_low_memory_run_uses_bf16_and_checkpointing(tmp_path, monkeypatch):
    import cmn.engine
    from cmn.train import run_training

    seen = []
    train_one_epoch = cmn.engine.train_one_epoch

    def spy(net, *args, precision, **kwargs):
        seen.append((precision, net.visual.grad_checkpoint))
        return train_one_epoch(net, *args, precision=precision, **kwargs)

    monkeypatch.setattr(cmn.engine, "train_one_epoch", spy)
    result = run_training(*tiny_run(tmp_path, "low", epochs=1, low_memory=True), progress=False, quiet=True)
    assert seen == [("bf16", True)]
    assert result["epochs_run"] == 1

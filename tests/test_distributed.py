"""DistributedDataParallel on 2 CPU processes (gloo) matches one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.tiny import TINY_DEMO_FLAGS

HERE = Path(__file__).parent


def torchrun(args, tmp_path, timeout=300, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process_steps(tmp_path):
    script = str(HERE / "helpers" / "ddp_step.py")
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, script, str(single)], check=True, env=env, timeout=300)
    torchrun([script, str(double)], tmp_path)
    a = torch.load(single, weights_only=False)
    b = torch.load(double, weights_only=False)
    assert a["stats"]["train_batches"] == b["stats"]["train_batches"] == 2
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], atol=1e-6, rtol=1e-5, msg=k)
    # the same tokens were trained on: the global mean loss matches
    assert abs(a["stats"]["train_loss"] - b["stats"]["train_loss"]) < 1e-5


@pytest.mark.slow
def test_cmn_train_under_torchrun_checkpoints_on_rank0(tmp_path):
    out = tmp_path / "run"
    args = [
        "-m",
        "cmn.cli",
        *TINY_DEMO_FLAGS,
        "--epochs",
        "1",
        "--beam-size",
        "2",
        "--no-progress",
        "--visual-weights",
        "none",
        "--visual-warmup-epochs",
        "1",
        "--output-dir",
        str(out),
    ]
    torchrun(args, tmp_path, CMN_DEMO_DIR=str(tmp_path / "demo"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1
    assert [r["warmup_epoch"] for r in metrics["visual_warmup"]] == [1]  # the warm-up under DDP too
    assert (out / "checkpoint" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [("warmup_epoch" in r, r.get("epoch")) for r in lines] == [(True, None), (False, 1)]  # one writer

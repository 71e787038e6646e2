"""Trainer state without pickle: round trip, and no code from a run folder ever runs."""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from cmn.checkpoint import decode_state, encode_state, load_trainer_state
from cmn.cli import train_main
from cmn.errors import CheckpointError
from helpers.tiny import TINY_DEMO_FLAGS

TINY = [
    *TINY_DEMO_FLAGS,
    "--beam-size",
    "2",
    "--no-progress",
    "--quiet",
]


class Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_tree_round_trip():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))], betas=(0.9, 0.98), amsgrad=True)
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best_score": float("-inf"),
        "nan": float("nan"),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "best_val": {"BLEU_4": 0.25},
        "monitor": np.float64(0.5),
        "t": (1, "a", None, True),
    }
    tree, tensors = encode_state(state)
    json.dumps(tree)  # plain JSON
    back = decode_state(json.loads(json.dumps(tree)), tensors)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)  # tuples stay tuples
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    assert back["rng"]["python"] == state["rng"]["python"]
    name, keys, *rest = state["rng"]["numpy"]
    bname, bkeys, *brest = back["rng"]["numpy"]
    assert (bname, brest) == (name, rest) and bkeys.dtype == keys.dtype and np.array_equal(bkeys, keys)
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["best_score"] == float("-inf") and np.isnan(back["nan"])
    assert back["monitor"] == 0.5 and isinstance(back["monitor"], np.float64)
    assert back["t"] == (1, "a", None, True) and back["best_val"] == {"BLEU_4": 0.25}


def test_state_tree_refuses_other_types():
    with pytest.raises(TypeError, match="Payload"):
        encode_state({"x": Payload("/nonexistent")})
    with pytest.raises(CheckpointError, match="unknown entry type"):
        decode_state({"__cmn__": "pickle", "v": "x"}, {})
    with pytest.raises(CheckpointError, match="not stored"):
        decode_state({"__cmn__": "tensor", "k": "t9"}, {})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    old = os.environ.get("CMN_DEMO_DIR")
    os.environ["CMN_DEMO_DIR"] = str(root / "demo")
    try:
        assert train_main(TINY + ["--epochs", "1", "--output-dir", str(root / "run")]) == 0
    finally:
        if old is None:
            os.environ.pop("CMN_DEMO_DIR")
        else:
            os.environ["CMN_DEMO_DIR"] = old
    return root


@pytest.fixture
def run_copy(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CMN_DEMO_DIR", str(run_dir / "demo"))
    shutil.copytree(run_dir / "run", tmp_path / "run")
    return tmp_path / "run"


def test_saved_state_is_json_and_safetensors(run_copy):
    last = run_copy / "last"
    names = {p.name for p in last.iterdir()}
    assert {"trainer_state.json", "trainer_state.safetensors"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
    state = load_trainer_state(last)
    assert state["epoch"] == 1 and "optimizer" in state and "rng" in state


def _legacy_state(last, payload=None):
    """Rewrite last/ the way cmn 0.1 stored it: one pickled trainer_state.pt."""
    state = load_trainer_state(last)
    if payload is not None:
        state["rng"]["extra"] = payload  # hidden inside a real state
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (last / name).unlink()
    torch.save(state, last / "trainer_state.pt")


def _resume(run, capsys, *extra):
    code = train_main(TINY + ["--epochs", "2", "--output-dir", str(run), "--resume", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["last", ".last.previous"])
@pytest.mark.parametrize("trust", [False, True])
def test_crafted_pickle_never_runs(run_copy, tmp_path, capsys, where, trust):
    marker = tmp_path / "pwned"
    last = run_copy / "last"
    _legacy_state(last, Payload(marker))
    if where != "last":
        last.rename(run_copy / where)  # the set-aside copy a crash can leave
    code, err = _resume(run_copy, capsys, *(["--trust-pickled-state"] if trust else []))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert ("posix.system" in err) if trust else ("--trust-pickled-state" in err)
    assert not marker.exists()


def test_bare_payload_file_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    last = run_copy / "last"
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (last / name).unlink()
    torch.save(Payload(marker), last / "trainer_state.pt")
    code, err = _resume(run_copy, capsys, "--trust-pickled-state")
    assert code == 2 and err.startswith("error: ") and not marker.exists()


@pytest.mark.slow
def test_legacy_state_resumes_when_trusted_and_is_rewritten(run_copy, capsys):
    last = run_copy / "last"
    _legacy_state(last)
    code, err = _resume(run_copy, capsys)
    assert code == 2 and "--trust-pickled-state" in err
    code, err = _resume(run_copy, capsys, "--trust-pickled-state")
    assert code == 0, err
    assert not (last / "trainer_state.pt").exists()
    assert load_trainer_state(last)["epoch"] == 2


@pytest.mark.parametrize("damage", ["json", "tag", "tensors", "missing_key"])
def test_damaged_state_is_one_error_line(run_copy, capsys, damage):
    js, ts = run_copy / "last" / "trainer_state.json", run_copy / "last" / "trainer_state.safetensors"
    tree = json.loads(js.read_text())
    if damage == "json":
        js.write_text("{not json")
    elif damage == "tag":
        tree["epoch"] = {"__cmn__": "object", "v": "os.system"}
        js.write_text(json.dumps(tree))
    elif damage == "tensors":
        ts.write_bytes(ts.read_bytes()[:20])
    else:
        del tree["optimizer"]
        js.write_text(json.dumps(tree))
    code, err = _resume(run_copy, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "trainer_state" in err

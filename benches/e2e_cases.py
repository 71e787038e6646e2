"""Models, inputs and timed callables shared by the end-to-end benchmarks.

Used by benches/bench_e2e.py (pytest-benchmark) and benches/run_e2e.py (one command, markdown
table). Also a script: ``python benches/e2e_cases.py SCENARIO CONFIG [options]`` builds one case
in this fresh process, times it and prints one JSON line (seconds per iteration, peak memory),
which is how CPU peak memory is measured: RSS only grows, so each case needs its own process.

Scenarios (``SCENARIOS``):
* ``train_full``: one training iteration of the whole model (ResNet included): forward,
  the reference's masked NLL, backward, Adam (amsgrad, the reference's two learning rates).
* ``train_encdec``: the same iteration from precomputed patch features (B, V*P, d_vf): the
  visual extractor is replaced by the identity, so ``CMN.forward`` runs unchanged from
  ``att_embed`` on.
* ``generate``: beam-3 search with trigram blocking over a batch of studies, ResNet included.

Configurations (``CONFIGS``):
* ``naive``: the reference's cost model: ``memory_impl="naive"`` (the reference's tensor
  ops) and the memory's key/value projections applied to a batch-expanded copy of the
  memory, once per sequence (``CMN.memory_kv(per_sequence=rows)``); generation decodes the
  reference's way (``start_decoding(..., reference=True)``: the whole prefix re-embedded,
  re-queried and re-decoded every step).
* ``default``: ``memory_impl="auto"``, the memory projected once per forward, cached
  incremental decoding through ``CMN.generate``.

Generation bans EOS (id 0) by setting its logit bias to -inf in both configurations: a
randomly initialised model could otherwise stop at any step, while the reference's search
always runs ``max_len`` steps. Both therefore decode exactly ``max_len`` steps and their
per-study costs compare like for like (the step count is reported with each result).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from cmn.config import ModelConfig
from cmn.decode import beam_search
from cmn.engine import autocast, masked_nll
from cmn.model.cmn import CMN, build_model

SCENARIOS = ("train_full", "train_encdec", "generate")
# checkpointed: default + --checkpoint-visual; jointbn: default + --joint-view-bn (BatchNorm
# statistics over both views, cmn 0.1's way; the default keeps them per view, as the reference)
CONFIGS = ("naive", "default", "checkpointed", "jointbn")
BLOCK_NGRAM = 3  # the reference's IU X-Ray runs block repeated trigrams


@dataclass(frozen=True)
class Sizes:
    visual_extractor: str
    image_size: int
    num_views: int
    batch: int  # studies per training iteration
    gen_batch: int  # studies per generation call
    d_model: int
    num_heads: int
    num_layers: int
    memory_size: int
    topk: int
    vocab_size: int  # ids including 0
    seq_len: int  # training targets, BOS and EOS included; generation max_len
    beam: int


SIZES = {
    # The reference's IU X-Ray settings (train_iu_xray.sh); vocabulary of IU X-Ray at threshold 3.
    "full": Sizes(
        visual_extractor="resnet101",
        image_size=224,
        num_views=2,
        batch=16,
        gen_batch=16,
        d_model=512,
        num_heads=8,
        num_layers=3,
        memory_size=2048,
        topk=32,
        vocab_size=761,
        seq_len=60,
        beam=3,
    ),
    # CI smoke run: the same code paths in a few seconds.
    "smoke": Sizes(
        visual_extractor="resnet18",
        image_size=32,
        num_views=2,
        batch=2,
        gen_batch=2,
        d_model=32,
        num_heads=4,
        num_layers=1,
        memory_size=64,
        topk=8,
        vocab_size=40,
        seq_len=8,
        beam=3,
    ),
}


def model_config(sizes: Sizes, config: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=sizes.vocab_size,
        visual_extractor=sizes.visual_extractor,
        num_views=sizes.num_views,
        d_model=sizes.d_model,
        d_ff=sizes.d_model,
        num_heads=sizes.num_heads,
        num_layers=sizes.num_layers,
        memory_size=sizes.memory_size,
        topk=sizes.topk,
        max_seq_length=sizes.seq_len,
        memory_impl="naive" if config == "naive" else "auto",
        joint_view_bn=config == "jointbn",
    )


def project_memory_per_sequence(model: CMN, rows: int) -> None:
    """Make every ``memory_kv()`` call project a ``rows``-fold copy of the memory, like the
    reference; explicit ``per_sequence`` values (the reference-way decoder's) are kept."""
    shared = model.memory_kv

    def memory_kv(per_sequence: int = 0):
        return shared(per_sequence=per_sequence or rows)

    model.memory_kv = memory_kv


def build(sizes: Sizes, config: str, scenario: str, device: torch.device, seed: int = 0) -> CMN:
    """The model of one case; the same ``seed`` gives both configurations the same weights."""
    torch.manual_seed(seed)
    model = build_model(model_config(sizes, config))
    if scenario == "train_encdec":
        model.visual = nn.Identity()  # inputs are already (B, V*P, d_vf) patch features
    model = model.to(device)
    if config == "naive":
        project_memory_per_sequence(model, sizes.gen_batch if scenario == "generate" else sizes.batch)
    if config == "checkpointed" and scenario == "train_full":
        model.visual.grad_checkpoint = True
    return model


def training_inputs(sizes: Sizes, scenario: str, device: torch.device, seed: int = 1):
    """images (B, V, 3, S, S) or patches (B, V*P, d_vf); targets, masks (B, T) of full length."""
    g = torch.Generator().manual_seed(seed)
    B, T = sizes.batch, sizes.seq_len
    if scenario == "train_encdec":
        patches_per_view = (sizes.image_size // 32) ** 2
        d_vf = model_config(sizes, "default").d_vf
        x = torch.rand(B, sizes.num_views * patches_per_view, d_vf, generator=g)  # post-ReLU features are >= 0
    else:
        x = torch.randn(B, sizes.num_views, 3, sizes.image_size, sizes.image_size, generator=g)
    targets = torch.randint(1, sizes.vocab_size, (B, T), generator=g)
    targets[:, 0] = 0  # BOS
    targets[:, -1] = 0  # EOS
    masks = torch.ones(B, T)
    return x.to(device), targets.to(device), masks.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: CMN, sizes: Sizes, scenario: str, device: torch.device, precision: str):
    """(step callable, target tokens per step)."""
    x, targets, masks = training_inputs(sizes, scenario, device)
    visual = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    groups = [{"params": rest, "lr": 5e-4}] + ([{"params": visual, "lr": 1e-4}] if visual else [])
    optimizer = torch.optim.Adam(groups, weight_decay=5e-5, betas=(0.9, 0.98), eps=1e-9, amsgrad=True)
    model.train()

    def step():
        with autocast(device, precision):
            logprobs = model(x, targets)  # (B, T-1, V)
        loss = masked_nll(logprobs, targets, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)

    return step, int(masks[:, 1:].sum())


class _CountingDecoder:
    """Passes through to a model decoder, counting decoding steps."""

    def __init__(self, inner, counter: list):
        self.inner, self.counter = inner, counter
        self.device = inner.device

    def step(self, tokens):
        self.counter[0] += 1
        return self.inner.step(tokens)

    def reorder(self, index):
        self.inner.reorder(index)


def generation_step(model: CMN, sizes: Sizes, config: str, device: torch.device, precision: str, result: dict):
    """(step callable, studies per step); each call stores ``steps`` (decoding steps) and
    ``digest`` (of the generated ids) in ``result``."""
    g = torch.Generator().manual_seed(2)
    G = sizes.gen_batch
    images = torch.randn(G, sizes.num_views, 3, sizes.image_size, sizes.image_size, generator=g).to(device)
    with torch.no_grad():
        model.logit.bias[0] = float("-inf")  # no EOS: both searches run max_len steps (module docstring)
    model.eval()
    counter = [0]
    start_decoding = model.start_decoding

    def counting_start_decoding(*args, **kwargs):
        return _CountingDecoder(start_decoding(*args, **kwargs), counter)

    model.start_decoding = counting_start_decoding

    def step():
        counter[0] = 0
        with torch.no_grad(), autocast(device, precision):
            if config == "naive":
                hyps = beam_search(
                    model.start_decoding(images, sizes.beam, reference=True),
                    G,
                    sizes.beam,
                    sizes.seq_len,
                    no_repeat_ngram_size=BLOCK_NGRAM,
                )
                seqs = [h[0].tokens for h in hyps]
            else:
                seqs = model.generate(images, beam_size=sizes.beam, max_len=sizes.seq_len, block_ngram=BLOCK_NGRAM)
        _sync(device)
        result["steps"] = counter[0]
        result["digest"] = hashlib.sha1(json.dumps(seqs).encode()).hexdigest()[:12]

    return step, G


def make_case(scenario: str, config: str, sizes: Sizes, device: torch.device, precision: str = "fp32"):
    """(step callable, work units per step, result dict the step fills in)."""
    if scenario not in SCENARIOS or config not in CONFIGS:
        raise ValueError(f"unknown case {scenario}/{config}")
    model = build(sizes, config, scenario, device)
    result: dict = {}
    if scenario == "generate":
        step, units = generation_step(model, sizes, config, device, precision, result)
    else:
        step, units = training_step(model, sizes, scenario, device, precision)
    return step, units, result


def time_step(step: Callable[[], None], reps: int, max_seconds: float) -> list[float]:
    """Seconds of each timed call after one warm-up call; stops early past ``max_seconds``."""
    step()
    times: list[float] = []
    while len(times) < reps and sum(times) < max_seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(
    scenario: str,
    config: str,
    sizes: Sizes,
    device: torch.device,
    precision: str = "fp32",
    reps: int = 3,
    max_seconds: float = 60.0,
) -> dict:
    """Build and time one case in this process; peak memory covers the warm-up and timed calls.

    CPU: ``peak_bytes`` is the process's RSS high-water mark (VmHWM, reset once the model and
    inputs exist), ``base_bytes`` the RSS at that point; only meaningful in a fresh process.
    CUDA: max allocated and allocated.
    """
    step, units, result = make_case(scenario, config, sizes, device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the parent's high-water mark is inherited across exec
        base = _status_bytes("VmRSS")
    times = time_step(step, reps, max_seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM")
    seconds = statistics.median(times)
    return dict(
        scenario=scenario,
        config=config,
        precision=precision,
        device=device.type,
        seconds=seconds,
        times=times,
        units=units,
        units_per_s=units / seconds,
        peak_bytes=peak,
        base_bytes=base,
        **result,
    )


def measure_in_subprocess(
    scenario: str,
    config: str,
    sizes_name: str,
    device: str,
    precision: str = "fp32",
    reps: int = 3,
    max_seconds: float = 60.0,
) -> dict:
    """:func:`measure` in a fresh Python process (clean peak memory); its JSON result."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        scenario,
        config,
        "--sizes",
        sizes_name,
        "--device",
        device,
        "--precision",
        precision,
        "--reps",
        str(reps),
        "--max-seconds",
        str(max_seconds),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{scenario}/{config}/{precision} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Time one end-to-end case in this process; print JSON.")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    out = measure(
        args.scenario,
        args.config,
        SIZES[args.sizes],
        torch.device(args.device),
        args.precision,
        args.reps,
        args.max_seconds,
    )
    out["sizes"] = asdict(SIZES[args.sizes])
    print(json.dumps(out))


if __name__ == "__main__":
    main()

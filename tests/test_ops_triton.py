"""The fused triton memory_query against the naive spec.

Without a GPU this runs the kernels on CPU tensors under TRITON_INTERPRET=1 (set by
tests/conftest.py before triton is imported). The interpreter sorts element by element, so
shapes stay tiny: N <= 256, B*L <= 32, H <= 2.
"""

import os

import pytest
import torch

from cmn.ops import memory_query
from helpers.memory_query_cases import assert_close_to_truth, make_leaves, max_err, run, sorted_by_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("out", "grad_q", "grad_M", "grad_Wk", "grad_Wv")


def setup_module():
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", (
        "tests/conftest.py must set TRITON_INTERPRET=1 on machines without CUDA"
    )


def compare(shape, dtype, seed=0, **kwargs):
    B, H, L, N, d, K, shared = shape
    leaves, grad_out = make_leaves(B, H, L, N, d, seed=seed, **kwargs)
    truth = run(leaves, grad_out, K, "naive", torch.float64, shared)
    ref = run(leaves, grad_out, K, "naive", dtype, shared)
    got = run(leaves, grad_out, K, "triton", dtype, shared, device=DEVICE)
    return got, ref, truth


# (B, H, L, N, d, K, shared memory); N is never a multiple of the key tile
@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 5, 37, 8, 4, True),  # d < 16: padded head dim
        (1, 2, 6, 20, 16, 16, False),  # per-batch memory, one key tile
        (1, 1, 7, 100, 8, 32, True),  # several key tiles merged into the running top K
        (2, 1, 3, 19, 8, 1, False),  # K = 1
    ],
    ids=str,
)
def test_triton_matches_naive_fp32(shape):
    got, ref, truth = compare(shape, torch.float32)
    assert_close_to_truth(got, ref, truth, torch.float32)
    # fp32 scores agree with the naive fp32 selection: compare the index sets
    got_idx, got_w = sorted_by_index(got["idx"], got["weights"])
    ref_idx, ref_w = sorted_by_index(ref["idx"], ref["weights"])
    assert torch.equal(got_idx, ref_idx)
    assert max_err(got_w, ref_w) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_matches_naive_half(dtype):
    got, ref, truth = compare((2, 2, 4, 37, 16, 8, True), dtype, seed=1)
    assert_close_to_truth(got, ref, truth, dtype)


def test_ties_go_to_the_lowest_index():
    # every key equal: all scores tie, so the winners are rows 0..K-1 in order
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    k = torch.ones(2, 40, 8, device=DEVICE)
    v = torch.randn(2, 40, 8, device=DEVICE)
    out, idx, weights = memory_query(q, k, v, 8, impl="triton", return_selection=True)
    assert idx.cpu().tolist() == [[[list(range(8))] * 5] * 2]
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 8))
    torch.testing.assert_close(out, v[:, :8].mean(1, keepdim=True).unsqueeze(0).expand_as(out))


def test_duplicated_memory_rows_select_the_same_content():
    block = 3
    got, ref, _ = compare((2, 2, 4, 30, 8, 8, True), torch.float32, seed=7, duplicate_every=block)
    assert torch.equal((got["idx"] // block).sort(-1).values, (ref["idx"] // block).sort(-1).values)
    for name in ("out", "grad_q", "grad_Wk", "grad_Wv"):
        assert max_err(got[name], ref[name]) < 1e-5, name
    # a tied copy may be picked instead of another: the gradient per memory *content* agrees
    per_block = [r["grad_M"].view(-1, block, r["grad_M"].size(-1)).sum(1) for r in (got, ref)]
    assert max_err(*per_block) < 1e-5


def test_dropout_matches_the_torch_path():
    # both paths draw the (B, H, L, K) mask the same way before running
    leaves, grad_out = make_leaves(2, 2, 4, 37, 8, seed=5)
    results = []
    for impl, device in (("torch", "cpu"), ("triton", DEVICE)):
        torch.manual_seed(0)
        if device == "cuda":
            torch.cuda.manual_seed(0)
        results.append(run(leaves, grad_out, 8, impl, torch.float32, device=device, dropout_p=0.3))
    ref, got = results
    if DEVICE == "cpu":  # the same generator drew both masks
        assert torch.equal(got["weights"] == 0, ref["weights"] == 0)
        for name in GRAD_NAMES:
            assert max_err(got[name], ref[name]) < 1e-5, name
    assert (got["weights"] == 0).any()


def test_deterministic_mode_scatters_without_atomics():
    leaves, grad_out = make_leaves(1, 2, 5, 37, 8, seed=9)
    atomic = run(leaves, grad_out, 4, "triton", torch.float32, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        first = run(leaves, grad_out, 4, "triton", torch.float32, device=DEVICE)
        second = run(leaves, grad_out, 4, "triton", torch.float32, device=DEVICE)
    finally:
        torch.use_deterministic_algorithms(False)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name
        assert max_err(first[name], atomic[name]) < 1e-5, name


def test_unsupported_topk_falls_back_to_torch_with_a_warning():
    leaves, grad_out = make_leaves(1, 2, 4, 30, 8, seed=2)
    with pytest.warns(UserWarning, match="topk=6 runs on the torch path"):
        got = run(leaves, grad_out, 6, "triton", torch.float32, device=DEVICE)
    ref = run(leaves, grad_out, 6, "torch", torch.float32, device=DEVICE)
    for name in GRAD_NAMES:
        assert torch.equal(got[name], ref[name]), name

"""memory_query: the naive spec, the torch path against it, and the public op's checks."""
import math

import pytest
import torch

from cmn.errors import ConfigError
from cmn.ops import _torch, memory_query, memory_query_ref, resolve_impl
from memory_query_cases import assert_close_to_truth, make_leaves, max_err, run, sorted_by_index

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (B, H, L, N, d, K, shared memory)
SHAPES = [
    (2, 2, 5, 37, 8, 4, True),
    (1, 2, 7, 64, 16, 8, False),
    (2, 1, 3, 130, 8, 32, True),
    (3, 2, 4, 16, 4, 16, False),  # K = N
    (1, 1, 6, 9, 4, 1, True),  # K = 1
    (2, 2, 3, 50, 8, 6, True),  # K not a power of two
]


def test_naive_matches_hand_computed_case():
    # one head, one query row, four memory rows, K = 2: worked out by hand
    q = torch.tensor([[[[2.0, 0.0]]]])  # (1, 1, 1, 2)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [-1.0, 0.0]]])  # (1, 4, 2)
    v = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [0.0, 2.0], [9.0, 9.0]]])
    out, idx, w = memory_query_ref(q, k, v, 2)
    # scores = [2, 0, 6, -2] / sqrt(2): the top two are rows 2 and 0
    assert idx.tolist() == [[[[2, 0]]]]
    e = math.exp(4 / math.sqrt(2))
    expect_w = torch.tensor([e / (e + 1), 1 / (e + 1)])
    torch.testing.assert_close(w[0, 0, 0], expect_w)
    torch.testing.assert_close(out[0, 0, 0], expect_w[0] * v[0, 2] + expect_w[1] * v[0, 0])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_naive(shape, dtype):
    B, H, L, N, d, K, shared = shape
    leaves, grad_out = make_leaves(B, H, L, N, d, seed=N + K)
    truth = run(leaves, grad_out, K, "naive", torch.float64, shared)
    ref = run(leaves, grad_out, K, "naive", dtype, shared)
    got = run(leaves, grad_out, K, "torch", dtype, shared)
    assert_close_to_truth(got, ref, truth, dtype)
    if dtype == torch.float64:  # same selection, compared as sets
        got_idx, got_w = sorted_by_index(got["idx"], got["weights"])
        ref_idx, ref_w = sorted_by_index(ref["idx"], ref["weights"])
        assert torch.equal(got_idx, ref_idx)
        assert max_err(got_w, ref_w) < 1e-12


def test_torch_path_chunks_rows(monkeypatch):
    # a tiny scratch budget forces one row per chunk: same selection, and the same
    # numbers up to the GEMM's rounding (BLAS may block a 1-row product differently)
    leaves, grad_out = make_leaves(2, 2, 5, 40, 8, seed=3)
    whole = run(leaves, grad_out, 8, "torch", torch.float64)
    monkeypatch.setattr(_torch, "CHUNK_BYTES", 1)
    chunked = run(leaves, grad_out, 8, "torch", torch.float64)
    assert torch.equal(whole["idx"], chunked["idx"])
    for name in ("out", "weights", "grad_q", "grad_M", "grad_Wk", "grad_Wv"):
        assert max_err(whole[name], chunked[name]) < 1e-12, name


@pytest.mark.parametrize("shared", [True, False])
def test_ties_select_the_same_memory_content(shared):
    # keys/values repeated in blocks of 3 tie exactly; which copy wins may differ, but the
    # selected contents (block ids, as multisets) and every output and gradient may not
    block = 3
    leaves, grad_out = make_leaves(2, 2, 4, 30, 8, seed=7, duplicate_every=block)
    ref = run(leaves, grad_out, 8, "naive", torch.float64, shared)
    got = run(leaves, grad_out, 8, "torch", torch.float64, shared)
    assert torch.equal((got["idx"] // block).sort(-1).values, (ref["idx"] // block).sort(-1).values)
    for name in ("out", "grad_q", "grad_M", "grad_Wk", "grad_Wv"):
        assert max_err(got[name], ref[name]) < 1e-12, name


def test_dropout_uses_the_same_mask_as_the_reference():
    # on CPU the op draws its mask like F.dropout does, so one seed gives one result
    leaves, grad_out = make_leaves(2, 2, 5, 40, 8, seed=11)
    results = []
    for impl in ("naive", "torch"):
        torch.manual_seed(0)
        results.append(run(leaves, grad_out, 8, impl, torch.float64, dropout_p=0.3))
    ref, got = results
    assert (ref["weights"] == 0).any()
    for name in ("out", "weights", "grad_q", "grad_M", "grad_Wk", "grad_Wv"):
        assert max_err(got[name], ref[name]) < 1e-12, name
    no_dropout = run(leaves, grad_out, 8, "torch", torch.float64)
    assert max_err(no_dropout["out"], got["out"]) > 1e-3


def test_auto_is_torch_on_cpu():
    assert resolve_impl("auto", torch.device("cpu"), 32) == "torch"


def test_triton_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 8, 4)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        memory_query(q, k, k, 4, impl="triton")


@pytest.mark.parametrize(
    "q_shape, k_shape, topk, kwargs, match",
    [
        ((1, 1, 2, 4), (1, 8, 4), 4, {"impl": "fused"}, "impl must be one of"),
        ((1, 2, 4), (1, 8, 4), 4, {}, "q must be"),
        ((1, 2, 2, 4), (1, 8, 4), 4, {}, "does not match"),
        ((2, 1, 2, 4), (3, 1, 8, 4), 4, {}, "does not match"),
        ((1, 1, 2, 4), (1, 8, 4), 9, {}, "topk must be"),
        ((1, 1, 2, 4), (1, 8, 4), 0, {}, "topk must be"),
        ((1, 1, 2, 4), (1, 8, 4), 4, {"dropout_p": 1.0}, "dropout_p"),
    ],
)
def test_bad_arguments_raise_config_errors(q_shape, k_shape, topk, kwargs, match):
    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    with pytest.raises(ConfigError, match=match):
        memory_query(q, k, k, topk, **kwargs)


def test_mixed_dtypes_raise_a_config_error():
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 8, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="dtype"):
        memory_query(q, k, k, 4)

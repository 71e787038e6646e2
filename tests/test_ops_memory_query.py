"""memory_query: the naive spec, the torch and cpu paths against it, and the public op's checks."""

import math

import pytest
import torch

from cmn.config import MEMORY_IMPLS
from cmn.errors import ConfigError
from cmn.ops import IMPLS, _torch, memory_query, memory_query_ref, resolve_impl
from helpers.memory_query_cases import assert_close_to_truth, make_leaves, max_err, run, sorted_by_index

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CPU_DTYPES = [torch.float64, torch.float32]  # the fused cpu path's types
# every fast CPU implementation with each dtype it runs
IMPL_DTYPES = [("torch", d) for d in DTYPES] + [("cpu", d) for d in CPU_DTYPES]
# (B, H, L, N, d, K, shared memory)
SHAPES = [
    (2, 2, 5, 37, 8, 4, True),
    (1, 2, 7, 64, 16, 8, False),
    (2, 1, 3, 130, 8, 32, True),
    (3, 2, 4, 16, 4, 16, False),  # K = N
    (1, 1, 6, 9, 4, 1, True),  # K = 1
    (2, 2, 3, 50, 8, 6, True),  # K not a power of two
]
# shapes aimed at the cpu path's tiling
CPU_SHAPES = [
    (1, 1, 3, 1500, 20, 32, True),  # fp64 rows need two score tiles; d not a multiple of 16
    (2, 1, 30, 70, 8, 5, False),  # 30 rows: not a multiple of the row panels
]
CASES = [(s, i, d) for s in SHAPES for i, d in IMPL_DTYPES] + [(s, "cpu", d) for s in CPU_SHAPES for d in CPU_DTYPES]


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


@pytest.mark.parametrize("shape, impl, dtype", CASES, ids=str)
def test_fast_paths_match_naive(shape, impl, dtype):
    B, H, L, N, d, K, shared = shape
    leaves, grad_out = make_leaves(B, H, L, N, d, seed=N + K)
    truth = run(leaves, grad_out, K, "naive", torch.float64, shared)
    ref = run(leaves, grad_out, K, "naive", dtype, shared)
    got = run(leaves, grad_out, K, impl, dtype, shared)
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


@pytest.mark.parametrize("impl", ["torch", "cpu"])
@pytest.mark.parametrize("shared", [True, False])
def test_ties_select_the_same_memory_content(shared, impl):
    # keys/values repeated in blocks of 3 tie exactly; which copy wins may differ, but the
    # selected contents (block ids, as multisets), the outputs, the gradients of q and the
    # projections, and the memory gradient summed over each block of copies may not
    block = 3
    leaves, grad_out = make_leaves(2, 2, 4, 30, 8, seed=7, duplicate_every=block)
    ref = run(leaves, grad_out, 8, "naive", torch.float64, shared)
    got = run(leaves, grad_out, 8, impl, torch.float64, shared)
    assert torch.equal((got["idx"] // block).sort(-1).values, (ref["idx"] // block).sort(-1).values)
    for name in ("out", "grad_q", "grad_Wk", "grad_Wv"):
        assert max_err(got[name], ref[name]) < 1e-12, name
    per_block = [r["grad_M"].view(-1, block, r["grad_M"].size(-1)).sum(1) for r in (got, ref)]
    assert max_err(*per_block) < 1e-12
    if impl == "torch":  # the same topk kernel as the reference: the same copies win
        assert max_err(got["grad_M"], ref["grad_M"]) < 1e-12


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_dropout_uses_the_same_mask_as_the_reference(impl):
    # on CPU the op draws its mask like F.dropout does, so one seed gives one result
    leaves, grad_out = make_leaves(2, 2, 5, 40, 8, seed=11)
    results = []
    for name in ("naive", impl):
        torch.manual_seed(0)
        results.append(run(leaves, grad_out, 8, name, torch.float64, dropout_p=0.3))
    ref, got = results
    assert (ref["weights"] == 0).any()
    for name in ("out", "weights", "grad_q", "grad_M", "grad_Wk", "grad_Wv"):
        assert max_err(got[name], ref[name]) < 1e-12, name
    no_dropout = run(leaves, grad_out, 8, impl, torch.float64)
    assert max_err(no_dropout["out"], got["out"]) > 1e-3


def test_cpu_ties_go_to_the_lowest_index():
    # all keys equal: every score ties, so the winners are slots 0..K-1 in that order
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 7, 8, generator=g)
    k = torch.ones(2, 40, 8)
    v = torch.randn(2, 40, 8, generator=g)
    _, idx, w = memory_query(q, k, v, 6, impl="cpu", return_selection=True)
    assert torch.equal(idx, torch.arange(6).expand(2, 2, 7, 6))
    assert torch.equal(w, torch.full_like(w, 1 / 6))


@pytest.mark.parametrize("shared", [True, False])
def test_cpu_selection_is_the_stable_sort_of_the_scores(shared):
    # fp64 with exact ties (duplicated keys): the selection is the first K of a stable
    # descending sort, i.e. best score first and the lowest slot among equal scores
    B, H, L, N, d, K = 2, 2, 5, 45, 8, 10
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
    k = torch.randn(H, N, d, generator=g, dtype=torch.float64)[:, torch.arange(N) // 3 * 3]  # (H, N, d)
    if not shared:
        k = k.expand(B, H, N, d).contiguous()
    v = torch.randn_like(k)
    _, idx, _ = memory_query(q, k, v, K, impl="cpu", return_selection=True)
    scores = q @ (k if not shared else k.unsqueeze(0)).transpose(-2, -1)  # (B, H, L, N)
    expect = scores.sort(dim=-1, descending=True, stable=True).indices[..., :K]
    assert torch.equal(idx, expect)


def test_cpu_nan_scores_rank_first_like_topk():
    # a NaN query row makes every score of that row NaN: its output is NaN as in the
    # reference (torch.topk ranks NaN above numbers); the other rows are unaffected
    leaves, _ = make_leaves(1, 2, 4, 30, 8, seed=2)
    q = leaves["q"].detach().clone()
    q[0, 1, 2, 0] = float("nan")
    k = torch.randn(2, 30, 8, dtype=torch.float64)
    ref = memory_query(q, k, k, 5, impl="naive")
    got, idx, _ = memory_query(q, k, k, 5, impl="cpu", return_selection=True)
    assert torch.equal(got.isnan(), ref.isnan()) and got[0, 1, 2].isnan().all()
    assert torch.equal(idx[0, 1, 2], torch.arange(5))
    ok = ~ref.isnan()
    assert max_err(got[ok], ref[ok]) < 1e-12


def test_cpu_weights_carry_gradients_like_the_reference():
    # a loss that uses the returned weights too: their gradient joins the output's
    leaves, grad_out = make_leaves(2, 2, 5, 40, 8, seed=13)
    grad_w = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    grads = []
    for impl in ("naive", "cpu"):
        x = {n: t.detach().clone().requires_grad_() for n, t in leaves.items() if n in ("q", "M")}
        kv = (x["M"] @ leaves["Wk"].detach().T).view(40, 2, 8).transpose(0, 1)  # (H, N, d)
        out, idx, w = memory_query(x["q"], kv, kv, 8, impl=impl, return_selection=True)
        order = idx.argsort(-1)  # compare the weights slot by slot, whatever their order
        loss = (out * grad_out).sum() + (w.gather(-1, order) * grad_w).sum()
        grads.append(torch.autograd.grad(loss, [x["q"], x["M"]]))
    for ref, got in zip(*grads):
        assert max_err(got, ref) < 1e-12


def test_cpu_path_gives_the_same_bits_on_any_thread_count():
    leaves, grad_out = make_leaves(2, 4, 9, 300, 16, seed=4)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(leaves, grad_out, 16, "cpu", torch.float32))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, t in results[0].items():
            assert torch.equal(t, other[name]), name


def test_auto_on_cpu_is_the_fused_path_for_fp32_and_fp64():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, 32) == "cpu"
    assert resolve_impl("auto", cpu, 32, torch.float64) == "cpu"
    assert resolve_impl("auto", cpu, 32, torch.bfloat16) == "torch"
    assert resolve_impl("auto", cpu, 32, torch.float16) == "torch"


def test_cpu_impl_with_a_half_dtype_is_a_config_error():
    q, k = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16), torch.zeros(1, 8, 4, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="impl='cpu' cannot run: it supports fp32 and fp64"):
        memory_query(q, k, k, 4, impl="cpu")


def test_model_config_accepts_every_impl():
    assert set(MEMORY_IMPLS) == set(IMPLS)


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


def _query_in_child(conn):
    leaves, grad_out = make_leaves(1, 2, 6, 50, 8, seed=21)
    conn.send(run(leaves, grad_out, 8, "cpu", torch.float32)["out"].tolist())  # plain data: no shared storage


# forking a process that has threads is the point here (Python >= 3.12 warns about it)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_cpu_path_runs_in_a_forked_child():
    # the parent's rayon threads do not survive fork: a child (a data-loader worker, say)
    # must start its own instead of waiting forever on threads that are not there
    import multiprocessing

    leaves, grad_out = make_leaves(1, 2, 6, 50, 8, seed=21)
    here = run(leaves, grad_out, 8, "cpu", torch.float32)["out"]  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_query_in_child, args=(child_end,))
    child.start()
    got = parent_end.recv() if parent_end.poll(120) else None
    child.join(10)
    if child.is_alive():
        child.kill()
    assert got is not None, "the forked child hung"
    assert torch.equal(torch.tensor(got, dtype=here.dtype), here)

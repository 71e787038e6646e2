"""Shared inputs and error measures for the memory_query tests (not a test module).

Tolerances follow flash-attention: the fp64 naive op is the ground truth; an
implementation run in dtype X may be off by at most twice what the naive op itself is off
in dtype X, plus a small floor. Gradients are checked for q, the memory matrix M and the
key/value projections Wk, Wv, with k = M Wk^T and v = M Wv^T split into heads, as the model
builds them.
"""

import torch

from cmn.ops import memory_query

# floor under the derived tolerance, per dtype (the naive op can be exact by luck)
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def make_leaves(B, H, L, N, d, seed, duplicate_every=0):
    """fp64 leaves: q (B, H, L, d), memory M (N, H*d), Wk, Wv (H*d, H*d), output grad (B, H, L, d).

    ``duplicate_every`` > 0 copies memory row i into rows i+1 .. of each block of that size,
    so those keys (and values) tie exactly.
    """
    g = torch.Generator().manual_seed(seed)
    D = H * d
    M = torch.randn(N, D, generator=g, dtype=torch.float64)
    if duplicate_every:
        M = M[torch.arange(N) // duplicate_every * duplicate_every]
    leaves = {
        "q": torch.randn(B, H, L, d, generator=g, dtype=torch.float64),
        "M": M,
        "Wk": torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5,
        "Wv": torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5,
    }
    grad_out = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
    return {n: t.requires_grad_() for n, t in leaves.items()}, grad_out


def run(leaves, grad_out, topk, impl, dtype, shared=True, device="cpu", **kwargs):
    """Run memory_query in ``dtype``; returns fp64 {out, idx, weights, grad_<leaf>...}."""
    B, H, L, d = leaves["q"].shape
    x = {n: t.to(device=device, dtype=dtype) for n, t in leaves.items()}
    N = x["M"].size(0)
    mem = x["M"] if shared else x["M"].expand(B, N, H * d)  # the reference batch-expands M

    def heads(W):
        t = (mem @ W.T).view(*mem.shape[:-1], H, d)  # (..., N, H, d)
        return t.transpose(-3, -2)  # (H, N, d) or (B, H, N, d)

    out, idx, weights = memory_query(
        x["q"], heads(x["Wk"]), heads(x["Wv"]), topk, impl=impl, return_selection=True, **kwargs
    )
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device=device, dtype=dtype))
    result = {"out": out, "idx": idx, "weights": weights}
    result.update({f"grad_{n}": gr for n, gr in zip(leaves, grads)})
    return {n: t.detach().cpu().double() if t.is_floating_point() else t.cpu() for n, t in result.items()}


def max_err(a, b):
    return (a - b).abs().max().item()


def assert_close_to_truth(got, ref, truth, dtype, names=("out", "grad_q", "grad_M", "grad_Wk", "grad_Wv")):
    """Each tensor of ``got`` is within 2x the same-dtype reference's error of the fp64 truth."""
    for name in names:
        allowed = 2 * max_err(ref[name], truth[name]) + EPS[dtype]
        err = max_err(got[name], truth[name])
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} ({dtype})"


def sorted_by_index(idx, weights):
    """Selection as sets: indices sorted ascending, weights reordered alongside."""
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), weights.gather(-1, order)

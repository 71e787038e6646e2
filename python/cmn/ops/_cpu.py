"""Fused memory querying on CPU: the Rust kernels of ``cmn._native`` behind an autograd.Function.

On the grouped layout of ``memory_query._to_groups`` (G groups of R query rows reading their
own (N, d) keys and values):

* forward, one pass per block of query rows: scores in cache-sized tiles, a running top-K
  per row that never sorts the N scores (a score is only looked at twice when it beats the
  row's current K-th best), softmax over the K winners, weighted sum of their value rows.
  Neither the (R, N) scores nor a gathered (R, K, d) copy is ever stored.
* backward, one pass per group: dq, and dK/dV scattered into the K selected rows of each
  query row in a fixed order (no atomics, no index sort): deterministic.

Tensors reach Rust as numpy views of torch's own memory (no copies beyond making inputs
contiguous); the kernels run without the GIL on a rayon pool of ``torch.get_num_threads()``
threads, so ``torch.set_num_threads`` sizes both and they never run at the same time.

How it differs from the reference: equal scores resolve to the lowest memory slot (the
reference's ``torch.topk`` may pick any of them), and the selected indices come out in
that order; a NaN score ranks above every number, as in ``torch.topk``. Scores are summed
over d in one fixed order (fused multiply-adds on CPUs with FMA), so they may differ from
torch's GEMM in the last bit, and a near-tie at the K-th place may then pick the other slot.
"""

import torch

from cmn import _native

DTYPES = (torch.float32, torch.float64)


def kernels_built():
    """Whether the installed ``cmn._native`` has the kernels (a stale build may not)."""
    return hasattr(_native, "memory_query_forward")


def _np(t):
    """A numpy view of a contiguous CPU tensor (shares its memory)."""
    return t.detach().numpy()


def _contiguous(t):
    return t.detach().contiguous()


class _MemoryQueryCPU(torch.autograd.Function):
    """(q (G, R, d), k, v (G, N, d), topk, mask (G, R, K) or None) -> out, idx, weights."""

    @staticmethod
    def forward(ctx, q, k, v, topk, mask):
        q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
        G, R, d = q.shape
        out = q.new_empty(G, R, d)  # (G, R, d)
        idx = torch.empty(G, R, topk, dtype=torch.long)  # (G, R, K)
        probs = q.new_empty(G, R, topk)  # (G, R, K) softmax weights before dropout
        mask = None if mask is None else _contiguous(mask)
        _native.memory_query_forward(
            _np(q),
            _np(k),
            _np(v),
            None if mask is None else _np(mask),
            _np(out),
            _np(idx),
            _np(probs),
            torch.get_num_threads(),
        )
        weights = probs if mask is None else probs * mask  # (G, R, K)
        ctx.save_for_backward(q, k, v, idx, probs, mask)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        return out, idx, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, _d_idx, d_weights):
        q, k, v, idx, probs, mask = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_out = q.new_zeros(q.shape) if d_out is None else _contiguous(d_out)
        d_weights = None if d_weights is None else _contiguous(d_weights)
        _native.memory_query_backward(
            _np(q),
            _np(k),
            _np(v),
            None if mask is None else _np(mask),
            _np(idx),
            _np(probs),
            _np(d_out),
            None if d_weights is None else _np(d_weights),
            _np(dq),
            _np(dk),
            _np(dv),
            torch.get_num_threads(),
        )
        return dq, dk, dv, None, None


def memory_query_cpu(q, k, v, topk, dropout_mask=None):
    """Fused memory querying with the arguments and results of ``_torch.memory_query_torch``.

    q (G, R, d), k and v (G, N, d): CPU tensors, all fp32 or all fp64; dropout_mask None
    or (G, R, K) in their dtype. Returns out (G, R, d), idx (G, R, K) int64 (best first;
    equal scores: lowest slot first) and weights (G, R, K) after dropout; ``out`` and
    ``weights`` carry gradients to q, k, v.
    """
    return _MemoryQueryCPU.apply(q, k, v, topk, dropout_mask)

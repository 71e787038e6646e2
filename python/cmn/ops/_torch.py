"""Memory querying in plain PyTorch without the (B, H, L, N, d) gather.

The reference expands the values to (B, H, L, N, d) to gather K rows per query, and its
backward allocates that whole tensor. Here, on a grouped layout (G groups of R query rows
reading their own (N, d) memory; see ``memory_query._to_groups``):

* ``_TopKSoftmax`` computes the scores one chunk of rows at a time, keeps the top K and
  their softmax; the (R, N) scores are never kept for backward. Its backward touches only
  the K selected key rows per query row: dq = sum_j ds_j k[idx_j] and dk[idx_j] += ds_j q
  are one ``F.embedding_bag`` and that bag's weight gradient.
* The weighted sum of the K value rows is ``F.embedding_bag`` with per-sample weights,
  under plain autograd: no gathered (R, K, d) copy forward or backward.

Dropout is an elementwise product on the (G, R, K) weights between the two, so autograd
handles it. Scratch memory is bounded by ``CHUNK_BYTES`` whatever N is. On CPU all these
kernels are deterministic.
"""

import math

import torch
import torch.nn.functional as F

# Scratch budget for one chunk of scores (G, rows, N): it bounds peak memory whatever N
# is (about 0.1 GB for forward+backward at the paper's sizes) while each GEMM keeps
# hundreds of rows. A GPU wants fewer, larger launches.
CHUNK_BYTES = 32 * 2**20
CHUNK_BYTES_CUDA = 512 * 2**20


def _flat_index(idx, N):
    """(G, R, K) per-group indices -> rows of the (G * N, d) flattened memory, (G * R, K)."""
    G, R, K = idx.shape
    offsets = torch.arange(G, device=idx.device).view(G, 1, 1) * N  # (G, 1, 1)
    return (idx + offsets).view(G * R, K)


def _weighted_rows(flat, memory, weights):
    """sum_j weights[m, j] * memory[flat[m, j]]: (M, K), (rows, d), (M, K) -> (M, d)."""
    return F.embedding_bag(flat, memory, mode="sum", per_sample_weights=weights)


class _TopKSoftmax(torch.autograd.Function):
    """(q (G, R, d), k (G, N, d)) -> softmax over the top-K scores (G, R, K), indices (G, R, K)."""

    @staticmethod
    def forward(ctx, q, k, topk):
        G, R, d = q.shape
        N = k.size(1)
        weights = q.new_empty(G, R, topk)  # (G, R, K)
        idx = torch.empty(G, R, topk, dtype=torch.long, device=q.device)  # (G, R, K)
        kt = k.transpose(1, 2)  # (G, d, N)
        budget = CHUNK_BYTES_CUDA if q.is_cuda else CHUNK_BYTES
        step = max(1, min(R, budget // (G * N * q.element_size())))
        for r0 in range(0, R, step):
            raw = torch.bmm(q[:, r0 : r0 + step], kt)  # (G, r, N)
            # x -> x / sqrt(d) is monotone in floating point, so ranking the raw scores and
            # scaling only the K winners gives the reference's top-K values exactly (up to
            # which of several equal scores wins) without a pass over all N
            top_raw, top_idx = raw.topk(topk)  # (G, r, K)
            del raw
            weights[:, r0 : r0 + step] = F.softmax(top_raw / math.sqrt(d), dim=-1)
            idx[:, r0 : r0 + step] = top_idx
        ctx.save_for_backward(q, k, weights, idx)
        ctx.mark_non_differentiable(idx)
        return weights, idx

    @staticmethod
    def backward(ctx, d_weights, _d_idx):
        q, k, weights, idx = ctx.saved_tensors
        G, R, d = q.shape
        N = k.size(1)
        # softmax backward, then the 1/sqrt(d) of the scores
        d_scores = weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True))  # (G, R, K)
        d_scores = (d_scores / math.sqrt(d)).view(G * R, -1)  # (G*R, K)
        flat = _flat_index(idx, N)  # (G*R, K)
        k_flat = k.detach().reshape(G * N, d).requires_grad_(ctx.needs_input_grad[1])
        with torch.enable_grad():
            dq = _weighted_rows(flat, k_flat, d_scores)  # (G*R, d)
            dk = None
            if ctx.needs_input_grad[1]:
                # the bag's weight gradient for output gradient q is sum ds_j q at row idx_j
                (dk,) = torch.autograd.grad(dq, k_flat, q.reshape(G * R, d))
                dk = dk.view(G, N, d)
        return dq.detach().view(G, R, d), dk, None


def memory_query_torch(q, k, v, topk, dropout_mask=None):
    """Memory-efficient memory querying on the grouped layout.

    Args:
        q: (G, R, d) query rows, G groups (heads, or batch x heads).
        k, v: (G, N, d) memory keys and values of each group, q's dtype.
        topk: K.
        dropout_mask: optional (G, R, K) multiplier (0 or 1/(1-p)) for the weights.

    Returns:
        out (G, R, d), idx (G, R, K) int64, weights (G, R, K) after dropout.
    """
    G, R, d = q.shape
    N = k.size(1)
    weights, idx = _TopKSoftmax.apply(q, k, topk)  # (G, R, K)
    if dropout_mask is not None:
        weights = weights * dropout_mask
    out = _weighted_rows(_flat_index(idx, N), v.reshape(G * N, d), weights.reshape(G * R, topk))  # (G*R, d)
    return out.view(G, R, d), idx, weights

"""The specification of memory querying: the reference code's tensor ops, unchanged.

``memory_query_ref`` reproduces ``memory_querying_responding`` of R2GenCMN step by step
(matmul, divide by sqrt(d), top-K, expand + gather, softmax, dropout, matmul), so every
faster implementation is tested against it. It is slow on purpose: gathering from the
value tensor expanded to (B, H, L, N, d) makes PyTorch's gather backward allocate that
whole tensor (about 6.6 GB at the paper's sizes, fp32).
"""

import math

import torch
import torch.nn.functional as F


def memory_query_ref(q, k, v, topk, dropout_p=0.0):
    """Reference memory querying (the spec).

    Args:
        q: (B, H, L, d) queries.
        k, v: (H, N, d) per-head memory keys / values shared by the batch, or (B, H, N, d).
        topk: K, the number of memory slots each query row reads.
        dropout_p: dropout on the softmax weights (inverted scaling); 0 disables it.

    Returns:
        out (B, H, L, d), idx (B, H, L, K) int64, weights (B, H, L, K) (after dropout),
        all in q's dtype except idx.
    """
    B, H, L, d = q.shape
    if k.dim() == 3:  # the reference projects a batch-expanded memory: do the same
        k = k.unsqueeze(0).expand(B, *k.shape)  # (B, H, N, d)
        v = v.unsqueeze(0).expand(B, *v.shape)  # (B, H, N, d)
    N = v.size(-2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, L, N)
    top_scores, idx = scores.topk(topk)  # (B, H, L, K)
    v_rows = v.unsqueeze(2).expand(B, H, L, N, d)  # (B, H, L, N, d), a view
    idx_rows = idx.unsqueeze(-1).expand(B, H, L, topk, d)  # (B, H, L, K, d)
    v_sel = torch.gather(v_rows, 3, idx_rows)  # (B, H, L, K, d)
    weights = F.softmax(top_scores, dim=-1)  # (B, H, L, K)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p, training=True)
    out = torch.matmul(weights.unsqueeze(3), v_sel).squeeze(3)  # (B, H, L, d)
    return out, idx, weights

"""The cross-modal memory: a learned matrix queried by image patches and by report tokens.

Per head ("thread"), each query row scores all N memory keys, keeps the top K, takes a
softmax over those K and returns the weighted sum of their values; an output projection maps
the heads back to d_model and the response is *added* to the features by the caller.

Differs from the reference (R2GenCMN ``MultiThreadMemory``): the key and value projections
of the memory are computed once per forward, in (H, N, d_k) form shared by every sequence
and beam, instead of once per sequence on a batch-expanded copy of the matrix (same result,
B times less work); the top-K query itself goes through :func:`cmn.ops.memory_query`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from cmn.ops import memory_query


class MemoryKV(NamedTuple):
    """Per-head projected memory, shared by the whole batch."""

    keys: torch.Tensor  # (H, N, d_k)
    values: torch.Tensor  # (H, N, d_k)


class MemoryMatrix(nn.Module):
    """N learned memory vectors of width d, initialised N(0, 1/d) like the reference."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dim))
        nn.init.normal_(self.weight, 0.0, 1.0 / dim)


class MemoryQuery(nn.Module):
    """Multi-thread memory querying and responding (query/key/value/output projections)."""

    def __init__(self, d_model: int, num_heads: int, topk: int, dropout: float, impl: str = "auto"):
        super().__init__()
        assert d_model % num_heads == 0
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.topk = topk
        self.dropout = dropout
        self.impl = impl
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def project_memory(self, memory: torch.Tensor) -> MemoryKV:
        """memory (N, d_model) -> per-head keys and values, each (H, N, d_k)."""
        N = memory.shape[0]
        k = self.k_proj(memory).view(N, self.num_heads, self.d_k).transpose(0, 1)  # (H, N, d_k)
        v = self.v_proj(memory).view(N, self.num_heads, self.d_k).transpose(0, 1)  # (H, N, d_k)
        return MemoryKV(k, v)

    def forward(self, x: torch.Tensor, kv: MemoryKV, return_selection: bool = False):
        """x (B, L, d_model) -> memory response (B, L, d_model).

        ``return_selection=True`` (for explanations) also returns the selected slots
        (B, H, L, K) int64 and their softmax weights (B, H, L, K), as :func:`cmn.ops.memory_query`.
        """
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.d_k).transpose(1, 2)  # (B, H, L, d_k)
        dropout_p = self.dropout if self.training else 0.0
        out = memory_query(
            q,
            kv.keys.to(q.dtype),
            kv.values.to(q.dtype),
            self.topk,
            impl=self.impl,
            dropout_p=dropout_p,
            return_selection=return_selection,
        )
        if return_selection:
            out, idx, weights = out
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_k)  # (B, L, d_model)
        if return_selection:
            return self.out_proj(out), idx, weights
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, d_k={self.d_k}, topk={self.topk}, impl={self.impl}"

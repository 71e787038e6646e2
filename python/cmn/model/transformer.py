"""Pre-norm Transformer encoder-decoder as in R2GenCMN, plus a key/value cache for decoding.

Kept from the reference: its LayerNorm (unbiased std, eps added to the std), pre-norm
residual blocks with dropout, ReLU feed-forward of width d_ff, sinusoidal positions, token
embeddings scaled by sqrt(d_model), a final LayerNorm on both stacks, xavier init. Dropout
where the reference applies it: ``dropout`` on residual branches, inside the feed-forward and
after the positional encoding; ``attn_dropout`` on attention probabilities (the reference
hard-codes 0.1 there, whatever its ``--dropout``).
Differs: attention runs through ``F.scaled_dot_product_attention``; decoding keeps each
layer's self-attention keys/values and the projected encoder output (``DecoderCache``) so a
step costs one token, where the reference re-decodes the whole prefix at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """The reference's LayerNorm: a * (x - mean) / (std + eps) + b with the unbiased std."""

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.d_k).transpose(1, 2)  # (B, H, L, d_k)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, d_model) -> keys, values (B, H, S, d_k)."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor],
        return_weights: bool = False,
    ):
        """x (B, L, d_model) queries projected keys/values (B, H, S, d_k); mask (B, 1|L, S) bool, True = visible.

        ``return_weights=True`` (eval only, for explanations) computes the attention explicitly
        and also returns its weights (B, H, L, S) fp32; the default path is SDPA's fused kernel.
        """
        q = self.split_heads(self.q_proj(x))  # (B, H, L, d_k)
        if mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, L|1, S)
        if return_weights:
            return self._attend_with_weights(q, k, v, mask)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, d_k)
        B, H, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * self.d_k))

    def _attend_with_weights(self, q, k, v, mask):
        if self.training:
            raise RuntimeError("attention weights are for eval mode (no dropout); call model.eval() first")
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, H, L, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(-1)  # (B, H, L, S)
        out = weights.to(v.dtype) @ v  # (B, H, L, d_k)
        B, H, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * self.d_k)), weights

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        k, v = self.project_kv(context)
        return self.attend(x, k, v, mask)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads, attn_dropout)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, mask))
        return x + self.drop(self.ff(self.norm2(x)))


@dataclass
class LayerCache:
    self_k: torch.Tensor  # (R, H, t, d_k) keys of the tokens decoded so far
    self_v: torch.Tensor  # (R, H, t, d_k)
    cross_k: torch.Tensor  # (R, H, S, d_k) projected encoder output
    cross_v: torch.Tensor  # (R, H, S, d_k)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads, attn_dropout)
        self.src_attn = MultiHeadAttention(d_model, num_heads, attn_dropout)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = LayerNorm(d_model), LayerNorm(d_model), LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, src_mask, tgt_mask):
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, tgt_mask))
        x = x + self.drop(self.src_attn(self.norm2(x), memory, src_mask))
        return x + self.drop(self.ff(self.norm3(x)))

    def step(self, x: torch.Tensor, cache: LayerCache, src_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (R, 1, d_model): the newest token only; appends its keys/values to the cache."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)  # (R, H, 1, d_k)
        cache.self_k = torch.cat([cache.self_k, k], dim=2)
        cache.self_v = torch.cat([cache.self_v, v], dim=2)
        x = x + self.drop(self.self_attn.attend(h, cache.self_k, cache.self_v, None))
        x = x + self.drop(self.src_attn.attend(self.norm2(x), cache.cross_k, cache.cross_v, src_mask))
        return x + self.drop(self.ff(self.norm3(x)))


class PositionalEncoding(nn.Module):
    pe: torch.Tensor  # (max_len, d_model) buffer

    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, L, d) gets positions offset..offset+L-1."""
        return self.dropout(x + self.pe[offset : offset + x.shape[1]])


class Encoder(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout, num_layers, attn_dropout=0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, d_ff, dropout, attn_dropout) for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout, num_layers, attn_dropout=0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, d_ff, dropout, attn_dropout) for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model)

    def forward(self, x, memory, src_mask, tgt_mask):
        for layer in self.layers:
            x = layer(x, memory, src_mask, tgt_mask)
        return self.norm(x)

    def start(self, memory: torch.Tensor) -> list[LayerCache]:
        """An empty cache for rows decoding against ``memory`` (R, S, d_model)."""
        caches = []
        for layer in self.layers:
            ck, cv = cast(DecoderLayer, layer).src_attn.project_kv(memory)  # (R, H, S, d_k)
            empty = ck.new_zeros(ck.shape[0], ck.shape[1], 0, ck.shape[3])
            caches.append(LayerCache(empty, empty, ck, cv))
        return caches

    def step(self, x: torch.Tensor, caches: list[LayerCache], src_mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer, cache in zip(self.layers, caches):
            x = cast(DecoderLayer, layer).step(x, cache, src_mask)
        return self.norm(x)


def subsequent_mask(size: int, device=None) -> torch.Tensor:
    """(1, size, size) bool, True where position j <= i is visible to i."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril().unsqueeze(0)

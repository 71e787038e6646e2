"""The report generator: ResNet patches -> (memory) -> Transformer encoder-decoder -> tokens.

Variants (``ModelConfig.variant``), as in the paper's Table 1:
- ``base``: the Transformer alone;
- ``mem``: two memories, one queried by the image patches, one by the report tokens;
- ``cmn``: one memory matrix and one set of query/key/value/output projections shared by both
  modalities (the paper's model).
In ``mem`` and ``cmn`` the memory response is added to the projected patch features before
the encoder, and to the (position-encoded) token embeddings before the decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmn.config import ModelConfig
from cmn.model.memory import MemoryKV, MemoryMatrix, MemoryQuery
from cmn.model.transformer import Decoder, Encoder, PositionalEncoding, subsequent_mask
from cmn.model.visual import VisualExtractor


class CMN(nn.Module):
    """Cross-modal Memory Network. Build with :func:`build_model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.visual = VisualExtractor(cfg.visual_extractor, joint_view_bn=cfg.joint_view_bn)
        # reference: att_embed = Linear(d_vf, d_model) -> ReLU -> Dropout(drop_prob_lm)
        self.att_embed = nn.Sequential(nn.Linear(cfg.d_vf, D), nn.ReLU(), nn.Dropout(cfg.drop_prob_lm))
        self.src_pos = PositionalEncoding(D, cfg.dropout)
        self.encoder = Encoder(D, cfg.num_heads, cfg.d_ff, cfg.dropout, cfg.num_layers, cfg.attention_dropout)
        self.tgt_embed = nn.Embedding(cfg.vocab_size, D)
        self.tgt_pos = PositionalEncoding(D, cfg.dropout)
        self.decoder = Decoder(D, cfg.num_heads, cfg.d_ff, cfg.dropout, cfg.num_layers, cfg.attention_dropout)

        def memory_query() -> MemoryQuery:
            return MemoryQuery(D, cfg.num_heads, cfg.topk, cfg.attention_dropout, cfg.memory_impl)

        if cfg.variant == "cmn":
            self.memory_query = memory_query()
        elif cfg.variant == "mem":
            self.visual_memory_query = memory_query()
            self.text_memory_query = memory_query()
        # The reference applies xavier to every matrix of its Transformer (memory projections
        # and token embedding included) before creating the memory matrix.
        for module in (self.encoder, self.decoder, self.tgt_embed):
            _xavier(module)
        for name in ("memory_query", "visual_memory_query", "text_memory_query"):
            if hasattr(self, name):
                _xavier(getattr(self, name))
        if cfg.variant == "cmn":
            self.memory = MemoryMatrix(cfg.memory_size, D)
        elif cfg.variant == "mem":
            self.visual_memory = MemoryMatrix(cfg.memory_size, D)
            self.text_memory = MemoryMatrix(cfg.memory_size, D)
        self.logit = nn.Linear(D, cfg.vocab_size)

    # ---- memory -------------------------------------------------------------------------
    def memory_kv(self, per_sequence: int = 0) -> tuple[Optional[MemoryKV], Optional[MemoryKV]]:
        """Projected memories (visual side, text side), computed once per forward.

        ``per_sequence > 0`` reproduces the reference's cost model (one projection of a
        batch-expanded copy per sequence, (R, H, N, d_k)); only benchmarks use it.
        """

        def project(query: MemoryQuery, memory: MemoryMatrix) -> MemoryKV:
            m: torch.Tensor = memory.weight  # (N, D)
            if per_sequence:
                m = m.unsqueeze(0).expand(per_sequence, *m.shape)  # (R, N, D)
                k = query.k_proj(m).view(per_sequence, -1, query.num_heads, query.d_k).transpose(1, 2)
                v = query.v_proj(m).view(per_sequence, -1, query.num_heads, query.d_k).transpose(1, 2)
                return MemoryKV(k, v)  # (R, H, N, d_k)
            return query.project_memory(m)

        if self.cfg.variant == "cmn":
            kv = project(self.memory_query, self.memory)
            return kv, kv
        if self.cfg.variant == "mem":
            return (
                project(self.visual_memory_query, self.visual_memory),
                project(self.text_memory_query, self.text_memory),
            )
        return None, None

    def _respond(self, x: torch.Tensor, kv: Optional[MemoryKV], side: str) -> torch.Tensor:
        if kv is None:
            return x
        query = self.memory_query if self.cfg.variant == "cmn" else getattr(self, f"{side}_memory_query")
        return x + query(x, kv)

    # ---- encoder / decoder --------------------------------------------------------------
    def encode(self, images: torch.Tensor, visual_kv: Optional[MemoryKV]) -> torch.Tensor:
        """images (B, V, 3, S, S) -> encoder output (B, V*P, d_model)."""
        return self.encode_patches(self.visual(images), visual_kv)

    def encode_patches(self, patches: torch.Tensor, visual_kv: Optional[MemoryKV]) -> torch.Tensor:
        """CNN patch features (B, V*P, d_vf) -> encoder output (B, V*P, d_model)."""
        x = self.att_embed(patches)  # (B, V*P, D)
        x = self._respond(x, visual_kv, "visual")
        return self.encoder(self.src_pos(x), None)

    def embed_tokens(self, tokens: torch.Tensor, text_kv: Optional[MemoryKV], offset: int = 0) -> torch.Tensor:
        """tokens (B, L) at positions offset.. -> embeddings with the memory response (B, L, D)."""
        x = self.tgt_pos(self.tgt_embed(tokens) * math.sqrt(self.cfg.d_model), offset)
        return self._respond(x, text_kv, "text")

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing.

        images (B, V, 3, S, S) float; targets (B, T) int64 = [0, w1, ..., 0, pad...].
        Returns log-probabilities (B, T-1, vocab) for targets[:, 1:]: fp32 (fp64 for an fp64 model).
        """
        return self.forward_patches(self.visual(images), targets)

    def forward_patches(self, patches: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from CNN patch features (B, V*P, d_vf)."""
        visual_kv, text_kv = self.memory_kv()
        memory = self.encode_patches(patches, visual_kv)  # (B, S, D)
        seq = targets[:, :-1]  # (B, T-1)
        keys_visible = seq > 0
        keys_visible[:, 0] = True  # BOS shares id 0 with padding
        tgt_mask = keys_visible.unsqueeze(1) & subsequent_mask(seq.shape[1], seq.device)  # (B, T-1, T-1)
        h = self.decoder(self.embed_tokens(seq, text_kv), memory, None, tgt_mask)  # (B, T-1, D)
        return _log_softmax(self.logit(h))

    # ---- generation ---------------------------------------------------------------------
    def start_decoding(self, images: torch.Tensor, rows_per_study: int = 1, *, reference: bool = False):
        """Encode once and return an incremental decoder over ``B * rows_per_study`` rows.

        Row ``b * rows_per_study + j`` belongs to study ``b``. ``reference=True`` returns the
        reference code's way of decoding (full prefix re-decoded every step, memory projected
        per sequence): same outputs, used only to test and benchmark against.
        """
        visual_kv, text_kv = self.memory_kv()
        memory = self.encode(images, visual_kv)  # (B, S, D)
        memory = memory.repeat_interleave(rows_per_study, dim=0)  # (R, S, D)
        if reference:
            return _FullRedecoder(self, memory)
        return _CachedDecoder(self, memory, text_kv)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        beam_size: int = 3,
        max_len: Optional[int] = None,
        block_ngram: int = 0,
        length_penalty: float = 0.0,
        decode: str = "cmn",
    ) -> list[list[int]]:
        """images (B, V, 3, S, S) -> one token-id list per study (no BOS/EOS), beam search
        (``beam_size`` 1 = greedy). Puts the model in eval mode for the call.

        ``decode="reference"`` runs the reference code's beam search step for step
        (:func:`cmn.decode.reference_beam_search`; beam_size >= 2, no blocking or penalty)."""
        from cmn.decode import beam_search, greedy_search, reference_beam_search

        was_training = self.training
        self.eval()
        try:
            B = images.shape[0]
            max_len = max_len or self.cfg.max_seq_length
            if decode == "reference":
                if block_ngram or length_penalty:
                    raise ValueError("decode='reference' has no n-gram blocking or length penalty")
                return reference_beam_search(self.start_decoding(images, 1), B, beam_size, max_len)
            if decode != "cmn":
                raise ValueError(f"decode must be 'cmn' or 'reference', got {decode!r}")
            if beam_size == 1 and not block_ngram:
                return greedy_search(self.start_decoding(images, 1), B, max_len)
            hyps = beam_search(
                self.start_decoding(images, beam_size),
                B,
                beam_size,
                max_len,
                no_repeat_ngram_size=block_ngram,
                length_penalty=length_penalty,
            )
            return [h[0].tokens for h in hyps]
        finally:
            self.train(was_training)


class _CachedDecoder:
    """Incremental decoder: each step embeds and queries the memory for the new token only."""

    def __init__(self, model: CMN, memory: torch.Tensor, text_kv: Optional[MemoryKV]):
        self.model, self.text_kv = model, text_kv
        self.device = memory.device
        self.caches = model.decoder.start(memory)
        self.t = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (R,) -> log-probs (R, vocab) fp32."""
        x = self.model.embed_tokens(tokens.unsqueeze(1), self.text_kv, offset=self.t)  # (R, 1, D)
        h = self.model.decoder.step(x, self.caches, None)  # (R, 1, D)
        self.t += 1
        return _log_softmax(self.model.logit(h[:, 0]))

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.caches:
            c.self_k, c.self_v = c.self_k.index_select(0, index), c.self_v.index_select(0, index)
            c.cross_k, c.cross_v = c.cross_k.index_select(0, index), c.cross_v.index_select(0, index)


class _FullRedecoder:
    """The reference's decoding: every step re-embeds, re-queries the memory (projected per
    sequence) and re-decodes the whole prefix."""

    def __init__(self, model: CMN, memory: torch.Tensor):
        self.model, self.memory = model, memory
        self.device = memory.device
        self.prefix = memory.new_zeros(memory.shape[0], 0, dtype=torch.long)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens.unsqueeze(1)], dim=1)  # (R, t)
        _, text_kv = self.model.memory_kv(per_sequence=self.prefix.shape[0])
        T = self.prefix.shape[1]
        x = self.model.embed_tokens(self.prefix, text_kv)
        h = self.model.decoder(x, self.memory, None, subsequent_mask(T, x.device))  # (R, t, D)
        return _log_softmax(self.model.logit(h[:, -1]))

    def reorder(self, index: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, index)
        self.memory = self.memory.index_select(0, index)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in fp32 at least (bf16/fp16 logits under autocast), fp64 for fp64 models."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def build_model(cfg: ModelConfig) -> CMN:
    """Construct a randomly initialised model (load weights with :mod:`cmn.checkpoint`)."""
    return CMN(cfg)

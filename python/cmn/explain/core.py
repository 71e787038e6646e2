"""Explanations as arrays: what the decoder looked at for each word, and what it read from memory.

After generating a report, one extra teacher-forced pass over it (in eval mode) keeps

- each decoder layer's cross-attention over the image patches, heads averaged (the reference's
  plot averages heads too), for the step that produced each word;
- the memory slots (top-K indices and softmax weights, per head) selected by every image
  patch and by every report word, as :func:`cmn.ops.memory_query` returns them.

The pass runs the model's own ``forward``; forward pre-hooks keep the inputs of the decoder's
cross-attention and of the memory query, and those two modules are called once more on them
with ``return_weights`` / ``return_selection``. The model code is not duplicated here.

Differs from the reference's plotting (R2GenCMN ``Tester.plot``): that records attention
while decoding greedily with batch size 1 and draws MIMIC-CXR images only; here any beam size
and batch, every view, the memory selections the paper's image-text mapping is about, and
finding phrases from the built-in labeler instead of a scispaCy entity model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from cmn.errors import DataError
from cmn.metrics.clinical import find_mentions, label_reports


@dataclass(frozen=True)
class Entity:
    """A finding phrase of the report the labeler read (e.g. "pleural effusion")."""

    observation: str  # CheXpert observation name
    label: float  # 1 positive, 0 negative, -1 uncertain
    text: str  # the phrase as it appears in the report
    words: tuple[int, ...]  # indices into Explanation.words


@dataclass(frozen=True, eq=False)
class Explanation:
    """One study's report with what produced it. T words, V views, (h, w) patch grid per view,
    Y decoder layers, H memory heads, K selected slots per head.

    Patch (v, i, j) covers rows i/h..(i+1)/h and columns j/w..(j+1)/w of view v's image (the
    model's eval transform is a square resize of the whole image).
    """

    study_id: str
    words: tuple[str, ...]  # T report tokens, in order
    report: str  # the words joined by spaces
    images: tuple[np.ndarray, ...]  # V decoded images, uint8 (rows, cols, 3), as loaded
    cross_attention: np.ndarray  # (Y, T, V, h, w) float32; sums to 1 over (V, h, w)
    patch_slots: Optional[np.ndarray]  # (V, h, w, H, K) int64; None for a model without memory
    patch_slot_weights: Optional[np.ndarray]  # (V, h, w, H, K) float32; sums to 1 over K
    word_slots: Optional[np.ndarray]  # (T, H, K) int64: slots read by each word's embedding
    word_slot_weights: Optional[np.ndarray]  # (T, H, K) float32
    shared_memory: bool  # True when patches and words query one memory (variant "cmn")
    labels: np.ndarray  # (14,) float64: the labeler's 1/0/-1/NaN, CHEXPERT_OBSERVATIONS order
    entities: tuple[Entity, ...]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.cross_attention.shape[3:5])

    def attention(self, words: Union[int, Sequence[int]], layer: Optional[int] = None) -> np.ndarray:
        """(V, h, w) float32 cross-attention of one word, or the mean over several words; the
        mean over layers when ``layer`` is None. Sums to 1 over (V, h, w)."""
        idx = [words] if isinstance(words, (int, np.integer)) else list(words)
        att = self.cross_attention[:, idx]  # (Y, n, V, h, w)
        att = att.mean(axis=0) if layer is None else att[layer]
        return att.mean(axis=0)

    def overlap(self, words: Union[int, Sequence[int]]) -> np.ndarray:
        """(V, h, w) float32 in [0, 1]: how much each patch's memory reading shares with the
        word's (:func:`memory_overlap`), averaged over several words. Needs a shared memory."""
        if not self.shared_memory or self.word_slots is None:
            raise ValueError("memory overlap needs a model whose patches and words query one memory (variant cmn)")
        idx = [words] if isinstance(words, (int, np.integer)) else list(words)
        word_slots, word_weights, patch_slots, patch_weights = self._memory_readings()
        V, h, w, H, K = patch_slots.shape
        ov = memory_overlap(
            word_slots[idx],
            word_weights[idx],
            patch_slots.reshape(-1, H, K),
            patch_weights.reshape(-1, H, K),
        )
        return ov.mean(axis=0).reshape(V, h, w)

    def overlap_matrix(self) -> np.ndarray:
        """(T, V, h, w) float32: :meth:`overlap` of every word."""
        word_slots, word_weights, patch_slots, patch_weights = self._memory_readings()
        V, h, w, H, K = patch_slots.shape
        ov = memory_overlap(
            word_slots,
            word_weights,
            patch_slots.reshape(-1, H, K),
            patch_weights.reshape(-1, H, K),
        )
        return ov.reshape(len(self.words), V, h, w)

    def _memory_readings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(word_slots, word_slot_weights, patch_slots, patch_slot_weights) of a model with memory."""
        assert self.word_slots is not None and self.word_slot_weights is not None, "a model without memory"
        assert self.patch_slots is not None and self.patch_slot_weights is not None, "a model without memory"
        return self.word_slots, self.word_slot_weights, self.patch_slots, self.patch_slot_weights


def memory_overlap(
    slots_a: np.ndarray, weights_a: np.ndarray, slots_b: np.ndarray, weights_b: np.ndarray
) -> np.ndarray:
    """Shared memory reading of every row of ``a`` with every row of ``b``.

    slots_* (n, H, K) int (distinct within a head), weights_* (n, H, K) float (each head's
    weights sum to 1). Per head the two selections are distributions over the N slots; their
    overlap is the mass they share, sum over slots of min(p_a, p_b) (1 = same slots, same
    weights; 0 = no slot in common), averaged over heads. Returns (n_a, n_b) float32.
    """
    slots_a, slots_b = np.asarray(slots_a, np.int64), np.asarray(slots_b, np.int64)
    wa, wb = np.asarray(weights_a, np.float32), np.asarray(weights_b, np.float32)
    n_a, H, _K = slots_a.shape
    N = int(max(slots_a.max(initial=0), slots_b.max(initial=0))) + 1
    dense_a = np.zeros((n_a, H, N), np.float32)  # (n_a, H, N): a's weight on every slot
    np.put_along_axis(dense_a, slots_a, wa, axis=2)
    a_at_b = dense_a[:, np.arange(H)[None, :, None], slots_b]  # (n_a, n_b, H, K)
    return np.minimum(a_at_b, wb[None]).sum(axis=3).mean(axis=2).astype(np.float32)  # (n_a, n_b)


def _memory_queries(model) -> tuple[Optional[torch.nn.Module], Optional[torch.nn.Module]]:
    variant = model.cfg.variant
    if variant == "cmn":
        return model.memory_query, model.memory_query
    if variant == "mem":
        return model.visual_memory_query, model.text_memory_query
    return None, None


@torch.no_grad()
def _traced_forward(model, images: torch.Tensor, targets: torch.Tensor):
    """Teacher-forced forward that keeps cross-attention and memory selections.

    images (B, V, 3, S, S) float, targets (B, T+2) int64 = [0, w1..wT, 0, pad...].
    Returns cross (B, Y, T+1, V*P) fp32 (heads averaged; row t is the step after token t),
    and for the image and text side (idx, weights) each (B, H, L, K) or None.
    """
    layers = list(model.decoder.layers)
    attn_inputs: list = [None] * len(layers)
    memory_inputs: dict[int, list] = {}
    handles = []

    def keep_attention(i):
        def hook(module, args):
            attn_inputs[i] = args

        return hook

    def keep_memory(module, args):
        memory_inputs.setdefault(id(module), []).append(args)

    for i, layer in enumerate(layers):
        handles.append(layer.src_attn.register_forward_pre_hook(keep_attention(i)))
    visual_q, text_q = _memory_queries(model)
    for q in {id(m): m for m in (visual_q, text_q) if m is not None}.values():
        handles.append(q.register_forward_pre_hook(keep_memory))
    try:
        model(images, targets)
    finally:
        for h in handles:
            h.remove()

    cross = []
    for layer, (x, context, mask) in zip(layers, attn_inputs):
        k, v = layer.src_attn.project_kv(context)  # (B, H, S, d_k)
        _, weights = layer.src_attn.attend(x, k, v, mask, return_weights=True)  # (B, H, L, S)
        cross.append(weights.mean(1))  # (B, L, S)
    selections: list = [None, None]
    if visual_q is not None:
        calls = memory_inputs[id(visual_q)] + (memory_inputs[id(text_q)] if text_q is not visual_q else [])
        # encode() queries the memory with the patches before embed_tokens() does with the words
        for side, (query, (x, kv)) in enumerate(zip((visual_q, text_q), calls)):
            assert query is not None  # text_q is set whenever visual_q is
            _, idx, weights = query(x, kv, return_selection=True)  # (B, H, L, K) each
            selections[side] = (idx, weights.float())
    return torch.stack(cross, 1), selections[0], selections[1]  # cross (B, Y, T+1, V*P)


def _to_display(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _from_tensor(images: torch.Tensor) -> list[np.ndarray]:
    """Undo the ImageNet normalisation of (V, 3, S, S) model inputs for display."""
    from cmn.data.images import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((images.detach().float().cpu() * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return [p.permute(1, 2, 0).numpy() for p in pixels]  # V x (S, S, 3)


def entities_of(words: Sequence[str]) -> tuple[Entity, ...]:
    """The labeler's finding phrases in a tokenized report, mapped to word indices."""
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    report = " ".join(words)
    out = []
    for m in find_mentions(report):
        idx = tuple(i for i, s in enumerate(starts) if s < m.end and s + len(words[i]) > m.start)
        if idx:
            out.append(Entity(m.observation, m.label, report[m.start : m.end], idx))
    return tuple(out)


@torch.no_grad()
def explain_batch(
    bundle,
    images: torch.Tensor,
    *,
    reports: Optional[Sequence[str]] = None,
    display: Optional[Sequence[Sequence]] = None,
    study_ids: Optional[Sequence[str]] = None,
    beam_size: int = 3,
    block_ngram: int = 0,
    max_len: Optional[int] = None,
) -> list[Explanation]:
    """Explain a batch of studies.

    Args:
        bundle: from :func:`cmn.load_checkpoint` (model and tokenizer); the model is put in
            eval mode for the call.
        images: (B, V, 3, S, S) float32, the model's input (see :func:`cmn.inference.load_study`).
        reports: explain these reports (e.g. the references) instead of generating them; words
            outside the vocabulary become ``<unk>``.
        display: per study, V PIL images to show (default: ``images`` un-normalised).
        study_ids: names for the studies (default "0", "1", ...).
        beam_size, block_ngram, max_len: as :meth:`cmn.model.CMN.generate`.
    """
    B = images.shape[0]
    model, tok = bundle.model, bundle.tokenizer
    was_training = model.training
    model.eval()
    try:
        if reports is None:
            seqs = model.generate(images, beam_size=beam_size, block_ngram=block_ngram, max_len=max_len)
        else:
            if len(reports) != B:
                raise DataError(f"{len(reports)} reports for {B} studies")
            seqs = [tok.encode(r)[1:-1] for r in reports]
        T = max((len(s) for s in seqs), default=0)
        targets = torch.zeros(B, T + 2, dtype=torch.long, device=images.device)  # (B, T+2)
        for b, s in enumerate(seqs):
            targets[b, 1 : 1 + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        cross, visual_sel, text_sel = _traced_forward(model, images, targets)
    finally:
        model.train(was_training)

    V = images.shape[1]
    P = cross.shape[-1] // V
    h = w = math.isqrt(P)
    if h * w != P:
        raise ValueError(f"patch count {P} per view is not a square grid")
    Y = cross.shape[1]
    cross = cross.cpu().numpy()
    word_lists = [tuple(tok.id_to_token(int(i)) for i in s) for s in seqs]
    texts = [" ".join(ws) for ws in word_lists]
    labels = label_reports(texts)  # (B, 14)

    def selection(sel, b, rows):
        if sel is None:
            return None, None
        idx, weights = sel  # (B, H, L, K)
        return (
            idx[b, :, rows].permute(1, 0, 2).cpu().numpy(),  # (L, H, K)
            weights[b, :, rows].permute(1, 0, 2).cpu().numpy(),
        )

    out = []
    for b in range(B):
        n = len(seqs[b])
        patch_idx, patch_w = selection(visual_sel, b, slice(None))
        word_idx, word_w = selection(text_sel, b, slice(1, n + 1))  # word i is input position i
        if patch_idx is not None:
            H, K = patch_idx.shape[1:]
            patch_idx, patch_w = patch_idx.reshape(V, h, w, H, K), patch_w.reshape(V, h, w, H, K)
        shown = display[b] if display is not None else None
        out.append(
            Explanation(
                study_id=str(study_ids[b]) if study_ids is not None else str(b),
                words=word_lists[b],
                report=texts[b],
                images=tuple(_to_display(p) for p in shown) if shown is not None else tuple(_from_tensor(images[b])),
                # the word produced at step t attended from row t (row 0 is the BOS step)
                cross_attention=np.ascontiguousarray(cross[b, :, :n].reshape(Y, n, V, h, w)),
                patch_slots=patch_idx,
                patch_slot_weights=patch_w,
                word_slots=word_idx,
                word_slot_weights=word_w,
                shared_memory=model.cfg.variant == "cmn",
                labels=labels[b],
                entities=entities_of(word_lists[b]),
            )
        )
    return out


def explain_study(bundle, images, *, report: Optional[str] = None, study_id: str = "0", **kwargs) -> Explanation:
    """Explain one study.

    ``images``: the study's V image files (paths) or PIL images, or the model's input tensor
    (V, 3, S, S) float32. ``report``: explain this text instead of a generated report. Other
    keyword arguments as :func:`explain_batch`.
    """
    if isinstance(images, torch.Tensor):
        tensor, display = images, None
    else:
        from cmn.inference import load_study

        tensor, display = load_study(bundle, list(images))
    return explain_batch(
        bundle,
        tensor.unsqueeze(0).to(bundle.device),
        reports=None if report is None else [report],
        display=None if display is None else [display],
        study_ids=[study_id],
        **kwargs,
    )[0]

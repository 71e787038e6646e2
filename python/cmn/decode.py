"""Search drivers: torch scores and ranks on the model's device, the native
:class:`cmn.text.BeamSearch` keeps the hypotheses on the CPU.

The model is reached through the incremental-decoder protocol::

    class IncrementalDecoder(Protocol):
        def step(self, tokens: LongTensor) -> Tensor   # (R,) last tokens -> fp32 log-probs (R, V)
        def reorder(self, index: LongTensor) -> None    # keep rows `index` (R',), R' <= R

Per step only ``(items, 2 * beam)`` candidate scores and indices cross to the CPU;
items that are finished are dropped from the decoder with :meth:`reorder`, and the
search stops as soon as every item is done.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Union

import torch

from cmn.text import BeamSearch


class IncrementalDecoder(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor) -> None: ...


class Hypothesis(NamedTuple):
    """A finished sequence: generated ids without BOS/EOS, and its (length-normalized) log-probability."""

    tokens: list[int]
    score: float


def _device(decoder, device) -> torch.device:
    # The protocol has no device; callers on a GPU pass it or the decoder exposes it.
    return torch.device(device if device is not None else getattr(decoder, "device", "cpu"))


def beam_search(
    decoder: IncrementalDecoder,
    batch_size: int,
    beam_size: int,
    max_len: int,
    *,
    bos_id: int = 0,
    eos_id: int = 0,
    length_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    n_best: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> list[list[Hypothesis]]:
    """Beam search; the decoder starts with ``batch_size * beam_size`` rows (row
    ``b * beam_size + j``), all fed ``bos_id`` first.

    ``max_len`` counts generated tokens (BOS excluded). ``no_repeat_ngram_size`` n > 0
    forbids any n-gram from appearing twice in a hypothesis (any beam size).
    ``length_penalty`` a divides final scores by ``length ** a`` (length with EOS).
    ``device``: where token tensors are created (default ``decoder.device`` if the
    decoder has one, else CPU). Returns per item the ``n_best`` hypotheses, best first.
    Selection rules: :class:`cmn.text.BeamSearch`; reference: :func:`cmn.text_ref.beam_search_ref`.
    """
    state = BeamSearch(
        batch_size, beam_size, max_len, eos_id=eos_id, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, n_best=n_best,
    )
    dev = _device(decoder, device)
    tokens = torch.full((batch_size * beam_size,), bos_id, dtype=torch.long, device=dev)  # (R,)
    cum = torch.from_numpy(state.cum_scores()).to(dev)  # (R,)
    while not state.done:
        logp = decoder.step(tokens)  # (R, V) fp32
        R, V = logp.shape
        if no_repeat_ngram_size > 0:
            rows, banned = state.banned()
            if rows.size:
                logp = logp.index_put(
                    (torch.from_numpy(rows).to(logp.device), torch.from_numpy(banned).to(logp.device)),
                    torch.tensor(float("-inf"), device=logp.device),
                )
        cand = (logp + cum.to(logp.device)[:, None]).view(R // beam_size, beam_size * V)  # (n, beam*V)
        k = min(2 * beam_size, beam_size * V)
        top_scores, top_index = cand.topk(k, dim=1)  # (n, k)
        next_tokens, reorder, next_cum = state.step(
            top_scores.float().cpu().numpy(), top_index.cpu().numpy(), V
        )
        if state.done:
            break
        dev = logp.device
        decoder.reorder(torch.from_numpy(reorder).to(dev))
        tokens = torch.from_numpy(next_tokens).to(dev)  # (R',)
        cum = torch.from_numpy(next_cum).to(dev)  # (R',)
    return [[Hypothesis(t, s) for t, s in item] for item in state.finalize()]


def greedy_search(
    decoder: IncrementalDecoder,
    batch_size: int,
    max_len: int,
    *,
    bos_id: int = 0,
    eos_id: int = 0,
    device: Optional[Union[str, torch.device]] = None,
) -> list[list[int]]:
    """Arg-max decoding (beam search with one beam); the decoder starts with
    ``batch_size`` rows. Returns the generated ids per item (no BOS/EOS)."""
    hyps = beam_search(decoder, batch_size, 1, max_len, bos_id=bos_id, eos_id=eos_id, device=device)
    return [h[0].tokens for h in hyps]


__all__ = ["Hypothesis", "IncrementalDecoder", "beam_search", "greedy_search"]

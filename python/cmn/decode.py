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
        batch_size,
        beam_size,
        max_len,
        eos_id=eos_id,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        n_best=n_best,
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
        next_tokens, reorder, next_cum = state.step(top_scores.float().cpu().numpy(), top_index.cpu().numpy(), V)
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


@torch.no_grad()
def reference_beam_search(
    decoder: IncrementalDecoder,
    batch_size: int,
    beam_size: int,
    max_len: int,
    *,
    bos_id: int = 0,
    eos_id: int = 0,
) -> list[list[int]]:
    """The reference code's beam search (R2GenCMN ``CaptionModel.beam_search`` with one group,
    no diversity, no length penalty), reproduced operation for operation.

    The decoder starts with ``batch_size`` rows (one per item); they are expanded to
    ``beam_size`` rows per item after the first step. How it differs from :func:`beam_search`:
    - the ``beam_size`` best candidates are taken whatever their token; one that is EOS is
      recorded as finished and its beam stays in the search with 1000 subtracted from its
      score, so fewer live beams continue for a step (cmn refills the beam instead);
    - it runs all ``max_len`` steps (cmn stops once no live beam can win), and at the last step
      every beam is recorded as finished;
    - the result is the best of all finished beams by summed log-probability.
    Returns the token ids per item without BOS/EOS. Used by ``--decode reference``.
    """
    if beam_size < 2:
        raise ValueError("the reference's beam search needs beam_size >= 2 (with 1 it samples at random)")
    dev = _device(decoder, None)
    tokens = torch.full((batch_size,), bos_id, dtype=torch.long, device=dev)  # (B,)
    logp = decoder.step(tokens)  # (B, V): one row per item at t = 0
    dev = logp.device
    seqs = torch.zeros(batch_size, beam_size, 0, dtype=torch.long, device=dev)  # (B, b, t)
    sums = torch.zeros(batch_size, beam_size, dtype=logp.dtype, device=dev)  # (B, b)
    done: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch_size)]
    offsets = torch.arange(batch_size, device=dev).unsqueeze(-1)  # (B, 1)
    for t in range(max_len):
        V = logp.shape[-1]
        lp = logp.reshape(batch_size, -1, V)  # (B, rows, V), rows = 1 at t = 0, b after
        prev = sums[:, :1] if t == 0 else sums  # (B, rows)
        cand = prev.unsqueeze(-1) + lp  # (B, rows, V)
        _ys, ix = torch.sort(cand.reshape(batch_size, -1), -1, True)
        ix = ix[:, :beam_size]  # (B, b)
        beam_ix = ix // V
        selected = ix % V
        rows = (beam_ix + offsets * lp.shape[1]).reshape(-1)  # (B*b,) rows of the old state
        if t > 0:
            seqs = seqs.gather(1, beam_ix.unsqueeze(-1).expand_as(seqs))
        seqs = torch.cat([seqs, selected.unsqueeze(-1)], -1)  # (B, b, t+1)
        sums = prev.gather(1, beam_ix) + lp.reshape(batch_size, -1).gather(1, ix)  # (B, b)
        decoder.reorder(rows)
        ended = seqs[:, :, t] == eos_id  # (B, b)
        if t == max_len - 1:
            ended.fill_(True)
        for b in range(batch_size):
            for j in range(beam_size):
                if ended[b, j]:
                    done[b].append((float(sums[b, j]), seqs[b, j].clone()))
        sums = sums - 1000.0 * ended.to(sums.dtype)
        if t == max_len - 1:
            break
        logp = decoder.step(seqs[:, :, t].reshape(-1))  # (B*b, V)
    results = []
    for item in done:
        best = sorted(item, key=lambda d: -d[0])[0][1].tolist()  # stable: first recorded wins ties
        results.append(best[: best.index(eos_id)] if eos_id in best else best)
    return results


__all__ = ["Hypothesis", "IncrementalDecoder", "beam_search", "greedy_search", "reference_beam_search"]

"""Batched sampling: every row's temperature, min-p, top-k and top-p in tensor ops over the whole
batch (after server/engine/penalties.py), seeded rows drawn from their own generator; logprobs
of the model's logits for generated and prompt tokens."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from server.engine.penalties import process
from server.engine.sequence import Sequence
from server.engine.types import Logprob, SamplingParams


@dataclass
class Sample:
    """A sampled token with its log-probability and the top alternatives when asked."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


def filtered_probs(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [M, V] of temperature-scaled logits [M, V] after each row's min-p, top-k and
    top-p (in vLLM's order); every row keeps its most likely token.

    bf16 logits tie often: a stable sort breaks ties by token id, as argmax does, so top_k=1 is
    greedy."""
    m, vocab = scaled.shape
    dev = scaled.device
    if all(not p.top_k and p.top_p >= 1.0 and not p.min_p for p in params):
        return torch.softmax(scaled, -1)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=dev)[:, None]  # [M, 1]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    # a top_p of 1 keeps everything (a cumulative sum can pass 1.0 by rounding)
    top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=dev)[:, None]
    ordered, order = torch.sort(scaled, descending=True, stable=True)  # [M, V], [M, V]
    drop = torch.arange(vocab, device=dev)[None, :] >= top_k  # [M, V]
    probs = torch.softmax(ordered, -1)
    drop |= probs < min_p * probs[:, :1]
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), -1)
    drop |= probs.cumsum(-1) - probs >= top_p  # keep the token that crosses p
    drop[:, 0] = False  # and the most likely one, whatever p (a tiny p rounds to 0 in float32)
    mask = torch.zeros_like(drop).scatter_(1, order, drop)  # back to vocabulary order
    return torch.softmax(scaled.masked_fill(mask, float("-inf")), -1)


def draw(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token id per row of logits [M, V] from its sequence's filtered distribution: [M].

    Exponential race: argmax(p / q) with q ~ Exp(1) samples p; a seeded sequence's q comes from
    its own generator, so its tokens do not depend on its neighbours in the batch."""
    params = [s.params for s in seqs]
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    probs = filtered_probs(logits / temperature, params)  # [M, V]
    race = torch.empty_like(probs).exponential_()  # [M, V]
    for row, seq in enumerate(seqs):
        if seq.params.seed is not None:
            if seq.generator is None:
                seq.generator = torch.Generator(logits.device).manual_seed(seq.params.seed)
            race[row].exponential_(generator=seq.generator)
    # exponential_ may return 0 (u = 0 exactly); 0 / 0 would be NaN, which argmax prefers
    return (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(-1)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    raw: torch.Tensor | None = None,
    eos_ids: Collection[int] = (),
) -> list[Sample]:
    """One token per row of logits [N, V] (float32), each with its sequence's own parameters;
    logprobs are those of raw [N, V] (the model's logits before any grammar mask), else of
    logits, before penalties, temperature and filtering."""
    processed = process(logits, seqs, eos_ids)  # [N, V]
    tokens = processed.argmax(-1)  # [N]: greedy rows keep theirs
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        tokens[index] = draw(processed[index], [seqs[i] for i in drawn])
    ids = tokens.tolist()
    samples = [Sample(token, None, []) for token in ids]
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        index = torch.tensor(want, device=logits.device)
        source = (logits if raw is None else raw)[index]  # [R, V]
        ks = [seqs[i].params.logprobs or 0 for i in want]
        for row, k, scored in zip(want, ks, score(source, tokens[index], max(ks)), strict=True):
            samples[row] = Sample(ids[row], scored.logprob, scored.top[:k])
    return samples


def score(logits: torch.Tensor, targets: torch.Tensor, top: int) -> list[Logprob]:
    """The logprob and rank of each row's target token under logits [R, V] (targets [R]), with
    the row's `top` most likely tokens."""
    logprobs = torch.log_softmax(logits, -1)  # [R, V]
    chosen = logprobs.gather(1, targets[:, None])  # [R, 1]
    ranks = (logprobs >= chosen).sum(-1).tolist()  # [R]
    tops: list[list[tuple[int, float]]] = [[] for _ in ranks]
    if top:
        values, ids = torch.topk(logprobs, top)  # [R, top]
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        tops = [list(zip(i, v, strict=True)) for i, v in pairs]
    return [
        Logprob(lp, rank, t) for lp, rank, t in zip(chosen[:, 0].tolist(), ranks, tops, strict=True)
    ]

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

CANDIDATES = 1024  # top-p without top-k looks for the nucleus among this many tokens first


@dataclass
class Sample:
    """A sampled token with its log-probability and the top alternatives when asked."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


def ranked(
    scaled: torch.Tensor, params: list[SamplingParams], candidates: int = CANDIDATES
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's distribution after its min-p, top-k and top-p (vLLM's order) over
    temperature-scaled logits [M, V]: probabilities [M, K] and their token ids [M, K] (most likely
    first; 0 where filtered out, every row keeps its first), or the plain softmax [M, V] and None
    when no row filters. K is the largest top_k when every row has one; else the `candidates`
    most likely tokens when every row's top-k or top-p nucleus lies among them (filtering them
    then equals filtering the full sort); else V (one stable sort of the batch).

    bf16 logits tie often: the full sort is stable, breaking ties by token id as argmax does."""
    m, vocab = scaled.shape
    dev = scaled.device
    if all(not p.top_k and p.top_p >= 1.0 and not p.min_p for p in params):
        return torch.softmax(scaled, -1), None
    top_k = torch.tensor([p.top_k or vocab for p in params], device=dev)[:, None]  # [M, 1]
    log_min_p = torch.tensor([p.min_p for p in params], device=dev).log()[:, None]  # -inf: off
    width = max(p.top_k for p in params) if all(p.top_k for p in params) else vocab
    free_lse = None  # rows without top_k: log of their kept tokens' mass over the vocabulary
    if width == vocab and candidates < vocab // 2:
        if all(p.top_k <= candidates and (p.top_k or p.top_p < 1.0) for p in params):
            width = candidates
            floor = scaled.max(-1, keepdim=True).values + log_min_p  # [M, 1]: min-p's cut
            free_lse = torch.logsumexp(scaled.masked_fill(scaled < floor, float("-inf")), -1)
    if width < vocab:
        ordered, order = torch.topk(scaled, width)  # [M, K], [M, K], sorted
    else:
        ordered, order = torch.sort(scaled, descending=True, stable=True)  # [M, V], [M, V]
    drop = torch.arange(width, device=dev)[None, :] >= top_k  # [M, K]
    if any(p.min_p for p in params):  # p < min_p * p_max, in logits: l < l_max + log(min_p)
        drop |= ordered < ordered[:, :1] + log_min_p
    masked = ordered.masked_fill(drop, float("-inf"))  # [M, K]
    probs = torch.softmax(masked, -1)  # [M, K]
    free = torch.tensor([not p.top_k for p in params], device=dev)[:, None]  # [M, 1]
    if free_lse is not None:  # normalized over the whole vocabulary, not the candidates only
        probs = torch.where(free, (masked - free_lse[:, None]).exp(), probs)
    if any(p.top_p < 1.0 for p in params):
        # a top_p of 1 keeps everything (a cumulative sum can pass 1.0 by rounding)
        top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=dev)
        cumulative = probs.cumsum(-1)  # [M, K]
        if free_lse is not None and not bool(
            ((cumulative[:, -1:] >= top_p[:, None]) | ~free).all()
        ):
            return ranked(scaled, params, candidates=vocab)  # a nucleus reaches past them
        drop = cumulative - probs >= top_p[:, None]  # keep the token crossing p
        drop[:, 0] = False  # and the most likely one, whatever p (a tiny p rounds to 0 in float32)
        probs = probs.masked_fill(drop, 0.0)
        probs /= probs.sum(-1, keepdim=True)
    return probs, order


def draw(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token id per row of logits [M, V] from its sequence's filtered distribution: [M].

    Inverse CDF: one uniform number per row, drawn for all unseeded rows at once; a seeded
    sequence's comes from its own generator, so its tokens do not depend on its neighbours."""
    params = [s.params for s in seqs]
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    probs, ids = ranked(logits / temperature, params)  # [M, K], [M, K] or None
    # the CDF runs in token-id order whatever the batch made K, so a row draws the same token
    # with or without neighbours
    if ids is not None and ids.shape[1] == logits.shape[1]:
        probs, ids = torch.zeros_like(probs).scatter_(1, ids, probs), None  # [M, V]
    elif ids is not None:
        ids, order = ids.sort(-1)  # [M, K]
        probs = probs.gather(1, order)
    cdf = probs.cumsum(-1)  # [M, K]
    uniform = torch.rand(len(seqs), 1, device=dev)  # [M, 1]
    for row, seq in enumerate(seqs):
        if seq.params.seed is not None:
            if seq.generator is None:
                seq.generator = torch.Generator(dev).manual_seed(seq.params.seed)
            uniform[row] = torch.rand(1, generator=seq.generator, device=dev)
    # the first position whose CDF passes u * total: never a token of probability 0
    pick = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)[:, 0]  # [M]
    pick.clamp_(max=cdf.shape[1] - 1)
    return pick if ids is None else ids.gather(1, pick[:, None])[:, 0]


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
    # top_k 1 is greedy (argmax breaks ties by token id)
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy and s.params.top_k != 1]
    if len(drawn) == len(seqs):
        tokens = draw(processed, seqs)  # [N]
    else:
        tokens = processed.argmax(-1)  # [N]: greedy rows keep theirs
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
        scores = score(source, tokens[index], max(ks), ranked=False)
        for row, k, scored in zip(want, ks, scores, strict=True):
            samples[row] = Sample(ids[row], scored.logprob, scored.top[:k])
    return samples


def score(
    logits: torch.Tensor, targets: torch.Tensor, top: int, ranked: bool = True
) -> list[Logprob]:
    """The logprob of each row's target token under logits [R, V] (targets [R]), its rank unless
    not ranked (a pass over [R, V] that generated tokens do not report), and the row's `top` most
    likely tokens."""
    logprobs = torch.log_softmax(logits, -1)  # [R, V]
    chosen = logprobs.gather(1, targets[:, None])  # [R, 1]
    ranks = (logprobs >= chosen).sum(-1).tolist() if ranked else [None] * len(targets)  # [R]
    tops: list[list[tuple[int, float]]] = [[] for _ in ranks]
    if top:
        values, ids = torch.topk(logprobs, top)  # [R, top]
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        tops = [list(zip(i, v, strict=True)) for i, v in pairs]
    return [
        Logprob(lp, rank, t) for lp, rank, t in zip(chosen[:, 0].tolist(), ranks, tops, strict=True)
    ]

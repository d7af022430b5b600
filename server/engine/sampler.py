"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.sequence import Sequence


@dataclass
class Sample:
    """A sampled token with its log-probability and the top alternatives when asked."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k and outside the top-p nucleus with -inf.

    bf16 logits tie often: a stable sort breaks ties by token id, as argmax does, so top_k=1 is greedy.
    """
    if not top_k and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)  # [V], [V]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k:
        drop[top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), -1)
        drop |= probs.cumsum(-1) - probs >= top_p  # keep the token that crosses p
        drop[0] = False  # and the most likely one, whatever p (a tiny p rounds to 0 in float32)
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def sample(
    logits: torch.Tensor, seqs: list[Sequence], raw: torch.Tensor | None = None
) -> list[Sample]:
    """One token per row of logits [N, V] (float32), each with its sequence's own parameters;
    logprobs are those of raw [N, V] (the model's logits before any grammar mask), else of
    logits, before temperature and top-k/top-p."""
    greedy_ids = logits.argmax(-1).tolist()  # [N]
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    source = logits if raw is None else raw
    logprobs = torch.log_softmax(source, -1) if want_logprobs else None  # [N, V]
    samples = []
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.greedy:
            token = greedy_ids[row]
        else:
            scaled = _filter(logits[row] / params.temperature, params.top_k, params.top_p)
            probs = torch.softmax(scaled, -1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        logprob, top = None, []
        if logprobs is not None and params.logprobs is not None:
            logprob = float(logprobs[row, token])
            if params.logprobs:
                values, ids = torch.topk(logprobs[row], params.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
        samples.append(Sample(token, logprob, top))
    return samples

"""Logits processors that change which token is likely, per request, in batched tensor ops: logit
bias, the min-tokens mask, and repetition / frequency / presence penalties (vLLM's order)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from server.engine.sequence import Sequence


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each list: [M, vocab] float32."""
    width = max((len(t) for t in token_lists), default=0) + 1
    padded = torch.full((len(token_lists), width), vocab, dtype=torch.int64)  # [M, L + 1]
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)  # [M, V + 1], pad column last
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [M, V] of penalized sequences after their repetition penalty (every token of prompt
    and output: positive logits divided, negative ones multiplied), then frequency and presence
    penalties (subtracted per occurrence / once per token generated so far)."""
    vocab, dev = logits.shape[-1], logits.device
    params = [s.params for s in seqs]
    output = token_counts([s.output_ids for s in seqs], vocab, dev)  # [M, V]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    if bool((repetition != 1.0).any()):
        seen = (output + token_counts([s.prompt_ids for s in seqs], vocab, dev)) > 0  # [M, V]
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    return logits - frequency * output - presence * (output > 0)


def process(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Collection[int]) -> torch.Tensor:
    """logits [N, V] after each row's logit bias, min-tokens mask (its stop tokens and, unless it
    ignores EOS, the EOS tokens at -inf while it has fewer than min_tokens outputs) and penalties;
    logits itself when no row asks for any of them."""
    bias = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias]
    banned = [
        (i, t)
        for i, s in enumerate(seqs)
        if len(s.output_ids) < s.params.min_tokens
        for t in {*s.params.stop_token_ids, *(() if s.params.ignore_eos else eos_ids)}
    ]
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not (bias or banned or penalized):
        return logits
    out = logits.clone()  # [N, V]
    dev = logits.device
    if bias:
        rows, ids, values = zip(*bias, strict=True)
        index = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
        out.index_put_(index, torch.tensor(values, device=dev), accumulate=True)
    if banned:
        rows, ids = zip(*banned, strict=True)
        out[torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)] = float("-inf")
    if penalized:
        index = torch.tensor(penalized, device=dev)
        out[index] = penalize(out[index], [seqs[i] for i in penalized])
    return out

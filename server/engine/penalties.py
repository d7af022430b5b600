"""Logits processors that change which token is likely, per request, in batched tensor ops: logit
bias, the min-tokens mask, and repetition / frequency / presence penalties (vLLM's order)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from server.engine.sequence import Sequence


def padded(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists as a matrix [M, L] of token ids, each row padded with its first token (0 when
    empty), and the mask [M, L] of its real entries."""
    width = max((len(t) for t in token_lists), default=0) or 1
    ids = torch.zeros(len(token_lists), width, dtype=torch.int64)  # [M, L]
    valid = torch.zeros(len(token_lists), width, dtype=torch.bool)  # [M, L]
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row] = tokens[0]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            valid[row, : len(tokens)] = True
    return ids.to(device), valid.to(device)


def penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply, in place on logits [M, V] of penalized sequences, their repetition penalty (every
    token of prompt and output: positive logits divided, negative ones multiplied), then frequency
    and presence penalties (subtracted per occurrence / once per token generated so far). Only the
    logits of the sequences' own tokens are read and written; returns logits."""
    dev = logits.device
    params = [s.params for s in seqs]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    if bool((repetition != 1.0).any()):
        ids, _ = padded([s.prompt_ids + s.output_ids for s in seqs], dev)  # [M, L]
        seen = logits.gather(1, ids)  # [M, L]; a padded repeat writes the same value again
        logits.scatter_(1, ids, torch.where(seen > 0, seen / repetition, seen * repetition))
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        ids, valid = padded([s.output_ids for s in seqs], dev)  # [M, L]
        # each entry's token count in its row: equal ids bracket it in the row sorted
        ordered = torch.where(valid, ids, -1).sort(-1).values  # [M, L]
        occurrences = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(
            ordered, ids
        )  # [M, L]
        occurrences = occurrences.clamp_(min=1).float()
        frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        # each occurrence carries its share, so a token's total is c * frequency + presence
        share = (frequency * occurrences + presence) / occurrences
        logits.scatter_add_(1, ids, -share * valid)
    return logits


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
    if len(penalized) == len(seqs):
        penalize(out, seqs)
    elif penalized:
        index = torch.tensor(penalized, device=dev)
        out[index] = penalize(out[index], [seqs[i] for i in penalized])
    return out

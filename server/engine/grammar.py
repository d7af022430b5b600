"""Constrained decoding: each constrained sequence holds an xgrammar matcher whose token bitmask
masks its logits row before sampling; unconstrained rows in the same batch are left untouched."""

from __future__ import annotations

import torch
import xgrammar as xgr

from server.engine.sequence import Sequence


def constrain(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [N, V] with every constrained row's disallowed tokens at -inf (a copy when any row
    is constrained, else logits itself)."""
    rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])  # [N, ceil(V / 32)] int32
    for i in rows:
        seqs[i].matcher.fill_next_token_bitmask(bitmask, i)
    masked = logits.clone()  # [N, V]
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), indices=rows)
    return masked


def advance(seq: Sequence, token: int) -> bool:
    """Feed a sampled token to seq's matcher; False if the grammar refuses it."""
    return seq.matcher is None or seq.matcher.accept_token(token)

"""A request's state inside the engine: tokens, KV blocks, adapter slot, sampling generator."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from server.engine.types import Logprob, SamplingParams

_arrival = itertools.count()


class Status(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request. Tokens [0, num_computed) have KV in the pool; the rest are still to process."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    slot: int = -1
    status: Status = Status.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    generator: torch.Generator | None = None  # a seeded request's, made on its first draw
    preempted: int = 0
    # prefix caching: the namespace the server put the request in, its chain root (set at first
    # admission, from its adapter slot's weights), the keys of its full blocks, how many leading
    # blocks it has offered to the cache, and the prompt tokens found cached at first admission
    cache_namespace: str = ""
    cache_root: bytes = b""
    block_keys: list[bytes] = field(default_factory=list)
    cached_blocks: int = 0
    cached_tokens: int | None = None
    matcher: Any = None  # xgrammar.GrammarMatcher of a constrained request (its state so far)
    # when the request asked for them: the logprobs of its prompt tokens scored so far (None for
    # the first token)
    prompt_logprobs: list[Logprob | None] = field(default_factory=lambda: [None])

    def __post_init__(self) -> None:
        if self.params.grammar is not None:
            self.matcher = xgr.GrammarMatcher(self.params.grammar)

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        """Number of prompt + generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens not yet in the KV cache (1 while decoding, more while prefilling)."""
        return self.length - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Whether only the last sampled token is left to process."""
        return self.remaining == 1 and bool(self.output_ids)
